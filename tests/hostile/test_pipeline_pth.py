"""Issue 22, cases 5 and 8 (released): hostile `.pth` files end in one line, quickly and small.

The restricted reader bounds nesting depth, object count, total bytes and per-tensor bytes
before it allocates; `data_pipeline.released` reports such a file and imports the rest.
"""

from __future__ import annotations

import os
import struct
import sys
import time
import zipfile

import numpy as np
import pytest

from llm3d_jax.convert import pth
from llm3d_jax.fileio import InputError
from tests.hostile.pipeline_inputs import assert_no_traceback, error_lines, run_module

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "convert"))
from test_pth import _tensor_pickle, _write_zip  # noqa: E402

SELF_LIST = b"\x80\x02]q\x00h\x00a."  # L = []; L.append(L)
DEEP_LIST = b"\x80\x02" + b"(" * 150 + b"l" * 150 + b"."  # [[[...]]] 150 levels deep


def shared_halves(levels: int) -> bytes:
    """L0 = 1, L(k) = [L(k-1), L(k-1)]: a pickle of ~8 bytes per level, 2**levels leaves."""
    out = b"\x80\x02J\x01\x00\x00\x00q\x00"
    for k in range(1, levels + 1):
        out += b"(h" + bytes([k - 1]) + b"h" + bytes([k - 1]) + b"lq" + bytes([k])
    return out + b"."


def huge_tensor() -> bytes:
    """One float storage element viewed as a [2**14, 2**15] tensor with stride 0 (2 GiB)."""
    return _tensor_pickle(0, (2**14, 2**15), (0, 0), 1)


def write_zip_bomb(path, megabytes: int) -> str:
    """A checkpoint whose storage inflates `megabytes` MiB of zeros from ~1/1000 of that."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(
            "archive/data.pkl", _tensor_pickle(0, (megabytes * 2**18,), (1,), megabytes * 2**18)
        )
        with z.open("archive/data/0", "w", force_zip64=True) as f:
            zeros = bytes(2**20)
            for _ in range(megabytes):
                f.write(zeros)
    return os.fspath(path)


@pytest.fixture(scope="module")
def zip_bomb(tmp_path_factory):
    return write_zip_bomb(tmp_path_factory.mktemp("bomb") / "bomb.pt", 256)


@pytest.mark.parametrize(
    "pickle_bytes,storages,problem",
    [
        (SELF_LIST, {}, "refers to itself"),
        (DEEP_LIST, {}, "nested deeper than 100 levels"),
        (shared_halves(60), {}, "more than"),
        (huge_tensor(), {"0": np.zeros(1, "<f4").tobytes()}, "declares"),
    ],
    ids=["self-reference", "deep", "2^60-leaves", "huge-tensor"],
)
def test_hostile_pickles_are_one_line_errors(tmp_path, pickle_bytes, storages, problem):
    path = _write_zip(tmp_path / "h.pt", pickle_bytes, storages)
    start = time.perf_counter()
    with pytest.raises(InputError, match=problem) as err:
        pth.read_pth(path)
    assert time.perf_counter() - start < 1.0
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_zip_bomb_refused_before_inflating(zip_bomb):
    start = time.perf_counter()
    with pytest.raises(InputError, match="compression ratio") as err:
        pth.read_pth(zip_bomb)
    assert time.perf_counter() - start < 1.0  # inflating 256 MiB would take longer
    assert "\n" not in str(err.value)


def test_declared_sizes_bounded(tmp_path):
    data = np.arange(1000, dtype="<f4")
    path = _write_zip(
        tmp_path / "t.pt", _tensor_pickle(0, (1000,), (1,), 1000), {"0": data.tobytes()}
    )
    np.testing.assert_array_equal(pth.read_pth(path)[""], data)
    small = pth.PthLimits(max_total_bytes=2000)
    with pytest.raises(InputError, match="more than the limit of 2000 bytes"):
        pth.read_pth(path, small)
    tensors_only = pth.PthLimits(max_rebuilt_ratio=0.5, max_view_slack_bytes=0)
    with pytest.raises(InputError, match="tensors total more than"):
        pth.read_pth(path, tensors_only)
    with pytest.raises(InputError, match="more than the limit of 1000 bytes per tensor"):
        pth.read_pth(path, pth.PthLimits(max_tensor_bytes=1000))


def many_views(n: int) -> bytes:
    """A list of `n` stride-0 [4096, 4096] float views (64 MiB each) of one 4-byte storage."""
    one = _tensor_pickle(0, (4096, 4096), (0, 0), 1)[2:-1]  # without header and STOP
    return b"\x80\x02](" + one * n + b"e."


def test_memory_stays_small_for_many_views_of_one_element(tmp_path):
    path = _write_zip(tmp_path / "v.pt", many_views(20), {"0": np.zeros(1, "<f4").tobytes()})
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))\n"
        "from llm3d_jax.convert.pth import read_pth\n"
        "from llm3d_jax.fileio import cli_main\n"
        f"cli_main(lambda: read_pth({path!r}))\n"
    )
    proc = run_module_code(code)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "tensors total more than" in proc.stderr and "MemoryError" not in proc.stderr


def test_memory_stays_small_for_a_huge_declared_tensor(tmp_path):
    """Under a 1 GiB address-space limit a 2 GiB allocation would fail differently (MemoryError)."""
    path = _write_zip(tmp_path / "h.pt", huge_tensor(), {"0": np.zeros(1, "<f4").tobytes()})
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))\n"
        "from llm3d_jax.convert.pth import read_pth\n"
        "from llm3d_jax.fileio import cli_main\n"
        f"cli_main(lambda: read_pth({path!r}))\n"
    )
    proc = run_module_code(code)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "declares" in proc.stderr and "MemoryError" not in proc.stderr


def run_module_code(code: str):
    import subprocess

    from tests.hostile.pipeline_inputs import REPO

    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
    )  # fmt: skip


def test_released_reports_hostile_files_and_imports_the_rest(tmp_path, zip_bomb):
    features, voxels, out = tmp_path / "pt", tmp_path / "npy", tmp_path / "out"
    features.mkdir()
    voxels.mkdir()
    rng = np.random.default_rng(0)
    good = rng.normal(size=(6, 8)).astype("<f4")
    _write_zip(features / "good.pt", _tensor_pickle(0, (6, 8), (8, 1), 48), {"0": good.tobytes()})
    np.save(voxels / "good.npy", rng.integers(0, 256, (6, 3)))
    _write_zip(features / "a_self.pt", SELF_LIST)
    _write_zip(features / "b_leaves.pt", shared_halves(60))
    _write_zip(features / "c_huge.pt", huge_tensor(), {"0": np.zeros(1, "<f4").tobytes()})
    os.symlink(zip_bomb, features / "d_bomb.pt")
    _write_zip(features / "e_empty.pt", _tensor_pickle(0, (0, 8), (8, 1), 0), {"0": b""})
    np.save(voxels / "e_empty.npy", np.zeros((0, 3), np.int64))
    start = time.perf_counter()
    proc = run_module(
        "data_pipeline.released", "--features", str(features), "--voxels", str(voxels),
        "--out", str(out), timeout=60,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    assert_no_traceback(proc)
    assert proc.returncode == 1
    errors = error_lines(proc.stderr)
    assert [e.split(": ")[1].rsplit("/", 1)[1] for e in errors] == [
        "a_self.pt", "b_leaves.pt", "c_huge.pt", "d_bomb.pt", "e_empty.pt"
    ], proc.stderr  # fmt: skip
    assert "holds no rows" in errors[-1]
    assert "1 imported, 5 failed" in proc.stdout
    assert os.listdir(out) == ["good.npz"]
    assert elapsed < 30


def test_pickle_opcode_helpers_build_what_they_say():
    import pickle

    assert pickle.loads(shared_halves(3)) == [[[1, 1], [1, 1]], [[1, 1], [1, 1]]]
    deep, levels = pickle.loads(DEEP_LIST), 0
    while deep:
        deep, levels = deep[0], levels + 1
    assert levels == 149
    lst = pickle.loads(SELF_LIST)
    assert lst[0] is lst
    assert struct.calcsize("<i") == 4
