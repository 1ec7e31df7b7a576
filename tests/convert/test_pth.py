"""The restricted .pth reader: torch-written fixtures import exactly, unsafe pickles are refused."""

import os
import struct
import zipfile

import numpy as np
import pytest

from llm3d_jax.convert.pth import load_pth, read_pth
from llm3d_jax.fileio import InputError

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "goldens", "lavis")


# Hand-written protocol-2 pickle opcodes: lets the tests build checkpoints without torch.
def _str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)


def _tuple(items) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _tensor_pickle(offset, size, stride, numel, storage_type=b"FloatStorage") -> bytes:
    storage = (
        _tuple(
            [
                _str("storage"),
                b"ctorch\n" + storage_type + b"\n",
                _str("0"),
                _str("cpu"),
                _int(numel),
            ]
        )  # fmt: skip
        + b"Q"
    )
    args = _tuple(
        [
            storage,
            _int(offset),
            _tuple(map(_int, size)),
            _tuple(map(_int, stride)),
            b"\x89",
            b"ccollections\nOrderedDict\n)R",
        ]  # fmt: skip
    )
    return b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n" + args + b"R."


def _write_zip(path, pickle_bytes: bytes, storages: dict[str, bytes] = ()) -> str:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/byteorder", "little")
        for key, data in dict(storages).items():
            z.writestr(f"archive/data/{key}", data)
    return os.fspath(path)


def test_torch_fixture_matches_saved_numbers():
    got = read_pth(os.path.join(FIXTURES, "tensors.pth"))
    with np.load(os.path.join(FIXTURES, "tensors.npz"), allow_pickle=False) as f:
        want = {k: f[k] for k in f.files}
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert got["model.bf16"].dtype == np.float32  # bf16 comes back as float32, exactly
    assert got["model.transposed"].flags.c_contiguous  # views are materialised


def test_load_keeps_structure_and_plain_values():
    obj = load_pth(os.path.join(FIXTURES, "tensors.pth"))
    assert obj["epoch"] == 3
    assert obj["config"] == {"lr": 1e-4, "name": "tiny", "betas": (0.9, 0.999)}
    assert isinstance(obj["extra"], list) and obj["extra"][1].dtype == np.int64


def test_non_tensor_global_refused():
    with pytest.raises(InputError, match="refused unsafe pickle global argparse.Namespace"):
        read_pth(os.path.join(FIXTURES, "unsafe.pth"))


@pytest.mark.parametrize(
    "module,name", [("os", "system"), ("builtins", "eval"), ("subprocess", "Popen")]
)
def test_code_execution_refused_and_not_run(tmp_path, module, name):
    marker = tmp_path / "ran"
    payload = (
        b"\x80\x02c" + f"{module}\n{name}\n".encode() + _tuple([_str(f"touch {marker}")]) + b"R."
    )
    path = _write_zip(tmp_path / "evil.pth", payload)
    with pytest.raises(InputError) as err:
        load_pth(path)
    assert str(err.value) == f"{path}: refused unsafe pickle global {module}.{name}"
    assert not marker.exists()


def test_strided_view_rebuilt_from_hand_written_pickle(tmp_path):
    data = np.arange(10, dtype="<f4")
    path = _write_zip(
        tmp_path / "t.pt", _tensor_pickle(1, (2, 3), (1, 3), 10), {"0": data.tobytes()}
    )
    got = load_pth(path)  # a bare tensor: load_pth returns the array, read_pth keys it ""
    want = np.lib.stride_tricks.as_strided(data[1:], shape=(2, 3), strides=(4, 12))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(read_pth(path)[""], want)


def test_bf16_storage_becomes_float32(tmp_path):
    values = np.array([1.0, -2.5, 3.140625], dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype("<u2")
    path = _write_zip(
        tmp_path / "b.pt", _tensor_pickle(0, (3,), (1,), 3, b"BFloat16Storage"),
        {"0": bits.tobytes()},
    )  # fmt: skip
    got = load_pth(path)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, values)


@pytest.mark.parametrize(
    "offset,size,stride,numel,problem",
    [
        (0, (4, 4), (4, 1), 10, "overruns a storage of 10 elements"),
        (8, (3,), (1,), 10, "overruns"),
        (0, (2,), (-1,), 10, "malformed tensor"),
        (0, (3,), (1,), 100, "holds 40 bytes, expected 400"),
    ],
)
def test_malformed_tensor_refused(tmp_path, offset, size, stride, numel, problem):
    path = _write_zip(
        tmp_path / "m.pt",
        _tensor_pickle(offset, size, stride, numel),
        {"0": np.zeros(10, "<f4").tobytes()},
    )
    with pytest.raises(InputError, match=problem):
        load_pth(path)


def test_missing_storage_file(tmp_path):
    path = _write_zip(tmp_path / "s.pt", _tensor_pickle(0, (2,), (1,), 2))
    with pytest.raises(InputError, match="storage archive/data/0 is missing"):
        load_pth(path)


def test_legacy_missing_and_corrupt_files(tmp_path):
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.")  # pre-1.6 magic number
    with pytest.raises(InputError, match="not a torch zip checkpoint"):
        load_pth(legacy)
    with pytest.raises(InputError, match="file not found"):
        load_pth(tmp_path / "nope.pth")
    with zipfile.ZipFile(tmp_path / "nopkl.pth", "w") as z:
        z.writestr("archive/other", "x")
    with pytest.raises(InputError, match="expected one data.pkl"):
        load_pth(tmp_path / "nopkl.pth")
    truncated = _write_zip(tmp_path / "trunc.pth", _tensor_pickle(0, (2,), (1,), 2)[:20])
    with pytest.raises(InputError, match="unreadable pickle"):
        load_pth(truncated)
