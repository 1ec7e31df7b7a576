"""The repository stands on its own: every path the docs cite exists, nothing cites outside it.

Checked in README.md and docs/*.md: markdown links `[text](path)` (relative to the file) and
repository paths in inline code (`tools/ask.py`, `pytest tests/x.py`, `docs/reference.md`, and
the module of `python -m tools.demo`), a path counting when its first folder is one of the
repository's top-level folders (ROOTS).
Ignored: URLs, anchors, globs (`*`), placeholders (`<area>`, `...`, `$VAR`) and paths outside
ROOTS (OUT/, FEATURES/, demo_out/: made at run time). Fenced code blocks are not read (their
commands are run by the tests of the commands themselves). Every .py and .md file of the
repository (not .venv) is also searched for the folder name of files kept outside it.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOTS = ("llm3d_jax", "data_pipeline", "experiments", "tools", "tests", "docs", "assets", ".ci")
OUTSIDE = "shared" + "/"  # spelt in two pieces so this file does not match itself

_FENCE = re.compile(r"^ *```.*?^ *```", re.DOTALL | re.MULTILINE)
_CODE = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
_SPLIT = re.compile(r"[\s=,;()'\"]+")
_PLACEHOLDER = re.compile(r"[*?<>{}$\[\]]|\.\.\.|^[A-Z_]+/")
_MODULE = re.compile(r"(?:^|\s)-m\s+([A-Za-z_][\w.]*)")


def markdown_files(root: str = REPO) -> list[str]:
    docs = os.path.join(root, "docs")
    names = [os.path.join(root, "README.md")]
    if os.path.isdir(docs):
        names += [os.path.join(docs, n) for n in sorted(os.listdir(docs)) if n.endswith(".md")]
    return [n for n in names if os.path.isfile(n)]


def _clean(path: str) -> str:
    """A cited path without its anchor, `:line` / `::test` suffix and trailing punctuation."""
    path = path.split("#", 1)[0].split("::", 1)[0]
    path = re.sub(r":\d+(?::\d+)?$", "", path)
    return path.rstrip(".,:;")


def cited_paths(text: str) -> tuple[list[str], list[str]]:
    """(link targets, repository paths in inline code) of a Markdown text, fences left out."""
    text = _FENCE.sub("", text)
    links = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (http:, mailto:, ...) or an anchor in the same file
        target = _clean(target)
        if target and not _PLACEHOLDER.search(target):
            links.append(target)
    paths = []
    for span in _CODE.findall(text):
        for word in _SPLIT.split(span):
            word = _clean(word)
            if "://" in word or _PLACEHOLDER.search(word) or "/" not in word:
                continue
            if word.removeprefix("./").split("/", 1)[0] in ROOTS:
                paths.append(word.removeprefix("./"))
        for module in _MODULE.findall(span):
            if module.split(".", 1)[0] in ROOTS:
                paths.append(module.replace(".", "/") + ".py")
    return links, paths


def _exists(root: str, path: str) -> bool:
    """A path, or for `python -m a.b` (cited as a/b.py) a module file or package folder."""
    if os.path.exists(os.path.join(root, path)):
        return True
    return path.endswith(".py") and os.path.isdir(os.path.join(root, path[: -len(".py")]))


def broken_paths(md_path: str, root: str = REPO) -> list[str]:
    """The cited paths of one Markdown file that do not exist in the repository at `root`."""
    with open(md_path, encoding="utf-8") as f:
        links, paths = cited_paths(f.read())
    here = os.path.dirname(md_path)
    broken = [t for t in links if not os.path.exists(os.path.normpath(os.path.join(here, t)))]
    broken += [p for p in paths if not _exists(root, p)]
    return sorted(set(broken))


def repo_text_files(root: str = REPO) -> list[str]:
    """Every .py and .md file of the repository: git's view when there is one, else a walk."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        names = [os.path.join(root, n) for n in listed]
    except (OSError, subprocess.CalledProcessError):
        names = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
            names += [os.path.join(folder, n) for n in files]
    return sorted(n for n in names if n.endswith((".py", ".md")) and os.path.isfile(n))


def files_citing_outside(root: str = REPO) -> list[str]:
    hits = []
    for name in repo_text_files(root):
        with open(name, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if OUTSIDE in line:
                    hits.append(f"{os.path.relpath(name, root)}:{number}: {line.strip()}")
    return hits


@pytest.mark.parametrize("md_path", markdown_files(), ids=lambda p: os.path.relpath(p, REPO))
def test_markdown_cites_only_paths_that_exist(md_path):
    assert broken_paths(md_path) == [], f"{os.path.relpath(md_path, REPO)} cites missing paths"


def test_nothing_cites_files_outside_the_repository():
    assert files_citing_outside() == []


def test_markdown_files_are_found():
    names = [os.path.relpath(n, REPO) for n in markdown_files()]
    assert "README.md" in names
    assert os.path.join("docs", "reference.md") in names


def test_checker_catches_broken_paths_and_ignores_the_rest(tmp_path):
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "ask.py").write_text("")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text("")
    md = tmp_path / "docs" / "page.md"
    md.write_text(
        "Run `python tools/ask.py --model OUT/model` or `tools/ask.py:12`; see [guide](guide.md),\n"
        "[the site](https://example.com/x.md), [top](#top), `tools/bench/<area>.py`,\n"
        "`experiments/configs/*.py`, `llm3d_jax/...py`, `demo_out/run1`, `FEATURES/x.npz`.\n"
        "Broken: `tools/gone.py`, [missing](missing.md), `--config=tests/nothere.py`.\n"
        "Modules: `python -m tools.ask`, `python -m tools` (a folder), `python -m tools.lost`.\n"
        "```\npython tools/in_a_fence.py\n```\n"
    )
    assert broken_paths(str(md), root=str(tmp_path)) == [
        "missing.md",
        "tests/nothere.py",
        "tools/gone.py",
        "tools/lost.py",
    ]


def test_checker_catches_a_citation_outside_the_repository(tmp_path):
    (tmp_path / "a.py").write_text('"""See docs/reference.md."""\n')
    (tmp_path / "b.md").write_text(f"As written in {OUTSIDE}NOTES.md.\n")
    (tmp_path / "c.txt").write_text(f"{OUTSIDE}ignored.md\n")
    assert files_citing_outside(str(tmp_path)) == [f"b.md:1: As written in {OUTSIDE}NOTES.md."]
