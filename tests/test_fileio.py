import os
import subprocess
import sys

import numpy as np
import pytest

from llm3d_jax.fileio import InputError, load_npz, save_npz_atomic


def test_npz_round_trip_and_errors(tmp_path):
    path = tmp_path / "a.npz"
    save_npz_atomic(path, x=np.arange(3, dtype=np.int32), s=np.array("hi"))
    data = load_npz(path, required=["x"])
    np.testing.assert_array_equal(data["x"], [0, 1, 2])
    assert str(data["s"]) == "hi"
    assert os.listdir(tmp_path) == ["a.npz"]  # no temp file left
    with pytest.raises(InputError, match="missing keys"):
        load_npz(path, required=["y"])
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="bad.npz: not a readable"):
        load_npz(tmp_path / "bad.npz")
    with pytest.raises(InputError, match="file not found"):
        load_npz(tmp_path / "none.npz")


def test_pickled_object_arrays_are_refused(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="not a readable"):
        load_npz(path)


def test_cli_main_prints_one_line(tmp_path):
    code = (
        "from llm3d_jax.fileio import cli_main, InputError\n"
        "def main():\n    raise InputError('x.ply', 'empty mesh')\n"
        "cli_main(main)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: x.ply: empty mesh"
