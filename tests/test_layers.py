"""The import contract of pyproject.toml ([tool.importlinter], docs/architecture.md) holds, and
it is not vacuous: one back edge model -> convert and one tool script importing another, added
to a copy of the tree, break it."""

import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOTS = ("llm3d_jax", "data_pipeline", "experiments", "tools")


def _lint_imports(root):
    """`lint-imports` on the tree at `root` (its own pyproject.toml, its packages first)."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_repository_keeps_its_import_contract():
    proc = _lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout and "8 kept" in proc.stdout


def test_a_back_edge_from_model_to_convert_breaks_it(tmp_path):
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ROOTS:
        shutil.copytree(os.path.join(REPO, name), tmp_path / name, ignore=ignore)
    shutil.copy(os.path.join(REPO, "pyproject.toml"), tmp_path / "pyproject.toml")
    assert _lint_imports(tmp_path).returncode == 0  # the copy alone is fine
    posembed = tmp_path / "llm3d_jax" / "model" / "posembed.py"
    with open(posembed, "a", encoding="utf-8") as f:
        f.write("\n\ndef _back_edge():\n    from llm3d_jax.convert import hf  # noqa: F401\n")
    # and one tool script reaching into another (what belongs to both goes into a package)
    with open(tmp_path / "tools" / "export.py", "a", encoding="utf-8") as f:
        f.write("\n\ndef _script_edge():\n    from tools import visualize  # noqa: F401\n")
    proc = _lint_imports(tmp_path)
    assert proc.returncode != 0
    assert "llm3d_jax layers" in proc.stdout and "BROKEN" in proc.stdout
    assert "llm3d_jax.model.posembed -> llm3d_jax.convert.hf" in proc.stdout
    assert "tools.export -> tools.visualize" in proc.stdout
