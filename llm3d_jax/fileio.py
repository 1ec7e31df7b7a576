"""Safe file I/O shared by every stage: atomic writes, pickle-free reads, one-line input errors.

Every command line wraps its `main` with `cli_main`, so bad input ends as one line on stderr
(`error: <file>: <problem>`) and exit status 1, never a traceback and never a partial file.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np


class InputError(Exception):
    """Bad user input. `str(err)` is the one-line message, naming the file and the problem."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


def cli_main(main: Callable[[], Any]) -> None:
    """Runs `main()`; an `InputError` becomes one line on stderr and exit status 1."""
    try:
        code = main()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)


def _atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp"
    )
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes owner-only files; outputs are shared data, so use the usual umask mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_npz_atomic(path: str | os.PathLike, **arrays: Any) -> None:
    """`np.savez` to a temp file in the same folder, then rename: no partial file on failure."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    _atomic(path, write)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic(path, write)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic(path, write)


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def load_npz(path: str | os.PathLike, required: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Reads a whole .npz without pickle; a missing file, a corrupt file or a missing key is an InputError."""
    if not os.path.exists(path):
        raise InputError(path, "file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {k: data[k] for k in data.files}
    except Exception as err:  # zipfile/ValueError/OSError: all mean the file is unreadable
        raise InputError(path, f"not a readable .npz file ({type(err).__name__}: {err})") from None
    missing = [k for k in required if k not in out]
    if missing:
        raise InputError(path, f"missing keys {missing}")
    return out


def name_problem(name: object) -> str | None:
    """Why `name` (an id read from a file) is not a plain file name, or None when it is one."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if name.startswith("."):
        return "must not start with '.'"  # '..', hidden files and our own temp files
    if any(c in name for c in ("/", "\\", "\0")) or any(ord(c) < 32 for c in name):
        return "must not hold a path separator or a control character"
    if len(name.encode("utf-8", "surrogatepass")) > 200:
        return "is longer than 200 bytes"
    return None


def child_path(
    folder: str | os.PathLike,
    name: object,
    suffix: str = "",
    source: str | os.PathLike | None = None,
) -> str:
    """`folder/<name><suffix>` for an id read from a file (a scene id, a record's scene_id).

    The one place an id from a file becomes a path: anything but a plain file name (absolute,
    `..`, a separator, NUL, empty, a leading dot) is an InputError naming `source` (the file the
    id came from, default `folder`), so no file outside `folder` is ever read or written.
    """
    problem = name_problem(name)
    if problem:
        raise InputError(source if source is not None else folder, f"id {name!r:.80} {problem}")
    return os.path.join(os.fspath(folder), name + suffix)


def output_folder(path: str | os.PathLike, option: str = "--out") -> str:
    """Creates `path` if needed and checks a file can be made in it; InputError (one line) if not.

    Run before the first output is written, so an `--out` that is a file, unwritable or on a
    read-only file system (`/proc/x`) is one line instead of a traceback after the work.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(path, f"{option} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test.")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise InputError(
            path, f"{option} is not a writable folder ({err.strerror or err})"
        ) from None
    return path


@contextlib.contextmanager
def writing(path: str | os.PathLike):
    """An OSError while writing `path` (disk full, file too large, no permission) becomes an
    InputError naming it: one line from `cli_main`, or one skipped item in a batch."""
    try:
        yield
    except OSError as err:
        raise InputError(path, f"cannot write ({err.strerror or err})") from None


def check_output_file(path: str | os.PathLike, folder: bool = False) -> None:
    """Before the work starts: InputError when `path` cannot become an output file (it is a
    folder, or a file stands where one of its folders should be). `folder`: the output is a
    folder (whether an existing one may be replaced is the caller's to judge)."""
    full = os.path.abspath(os.fspath(path))
    if not folder and os.path.isdir(full):
        raise InputError(path, "is a directory, not an output file")
    parent = os.path.dirname(full)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InputError(path, f"{parent} is a file, not a directory")
