"""tools/export.py, tools/visualize.py and experiments/eval.py as users type them: relative
paths, outputs that cannot be written (issue 22 case 9), no orbax/asyncio noise (case 11)."""

import os
import sys

import pytest

from llm3d_jax.fileio import InputError
from tests.hostile.cli_model import REPO, make_scene, run_cli
from tests.test_export import run  # noqa: F401  (a training run with a checkpoint, tfds data)
from tools import export, visualize

sys.path.insert(0, os.path.join(REPO, "tests", "data_pipeline"))


def _quiet(proc):
    assert "Event loop is closed" not in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_export_and_eval_take_relative_paths_quietly(run):  # noqa: F811
    root = str(run["root"])
    workdir = os.path.relpath(run["workdir"], root)
    proc = run_cli(
        [os.path.join(REPO, "tools", "export.py"), "--workdir", workdir, "--out", "rel_model"],
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _quiet(proc)
    assert proc.stderr.strip() == "", proc.stderr[-3000:]
    assert os.path.exists(os.path.join(root, "rel_model", "llm3d_config.json"))
    scene = make_scene(os.path.join(root, "rel_scene.npz"), dim=run["module"].config.feature_dim)
    proc = run_cli(
        [
            os.path.join(REPO, "tools", "ask.py"),
            "--model",
            "rel_model",
            "--scene",
            os.path.basename(scene),
            "where is the chair",
        ],
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _quiet(proc)
    proc = run_cli(
        [
            os.path.join(REPO, "experiments", "eval.py"),
            "--workdir",
            workdir,
            "--batch_size",
            "4",
            "--split",
            "val",
            "--limit",
            "4",
        ],
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _quiet(proc)
    assert os.path.exists(os.path.join(run["workdir"], "eval", "metrics.json"))


def test_export_out_that_cannot_be_written_is_one_line(run, tmp_path):  # noqa: F811
    existing = tmp_path / "a_file"
    existing.write_text("keep me")
    with pytest.raises(InputError, match="not an exported model") as err:
        export.main(["--workdir", run["workdir"], "--out", str(existing)])
    assert err.value.path == str(existing)
    assert existing.read_text() == "keep me"
    with pytest.raises(InputError, match="cannot write") as err:
        export.main(["--workdir", run["workdir"], "--out", "/proc/llm3d_no/model"])
    assert err.value.path == "/proc/llm3d_no/model"
    # Below a file: refused before restoring anything.
    with pytest.raises(InputError, match="is a file"):
        export.main(["--workdir", run["workdir"], "--out", str(existing / "model")])
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_visualize_out_that_cannot_be_written_is_one_line(tmp_path):
    scene = make_scene(str(tmp_path / "scene.npz"))
    for out, message in (
        (str(tmp_path), "is a directory"),
        ("/proc/llm3d_no/scene.png", "cannot write"),
        (str(tmp_path / "scene.npz" / "x.png"), "is a file"),
    ):
        with pytest.raises(InputError, match=message) as err:
            visualize.main(["--scene", scene, "--out", out])
        assert err.value.path == out
    assert sorted(os.listdir(tmp_path)) == ["scene.npz"]
    proc = run_cli(["tools/visualize.py", "--scene", scene, "--out", "/proc/llm3d_no/s.png"])
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: /proc/llm3d_no/s.png: cannot write (No such file or directory)"
    ]
