"""Reading PyTorch `.pth` / `.pt` checkpoints without torch and without running pickle code.

A torch checkpoint (torch >= 1.6, `torch.save`) is a zip archive:
  `<name>/data.pkl`      a pickle of the saved object, in which every tensor is a call
                         `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
                         and every storage a persistent id `("storage", torch.FloatStorage,
                         key, location, numel)`;
  `<name>/data/<key>`    the raw bytes of storage `key`;
  `<name>/byteorder`     "little" or "big" (absent in old files: little).
The pickle is read by an `Unpickler` whose `find_class` hands out only a few harmless stand-ins
(the tensor rebuild functions, storage types, `collections.OrderedDict`, `_codecs.encode`): any
other global (`os.system`, `builtins.eval`, a model class, ...) is refused, so no code of the file
ever runs. Tensors come back as numpy arrays (bfloat16 becomes float32, exactly).

`load_pth(path)` returns the saved object as given (dicts, lists, numbers, strings, arrays);
`read_pth(path)` flattens it into `{dotted.key: array}`: nested dict keys are joined with "."
(so a LAVIS checkpoint `{"model": state_dict, ...}` gives `model.Qformer.bert...`), list items
use their index, non-tensor leaves (epoch numbers, config strings) are dropped, and a bare saved
tensor comes back under the key "".

A checkpoint from a stranger can be hostile without running code, so every read is bounded by
`PthLimits` before anything is allocated: the archive's declared sizes (and its compression
ratio: torch stores storages uncompressed, a zip bomb inflates 1000:1), each tensor's bytes
(a stride-0 view of one element may not declare gigabytes), the bytes of all tensors, and the
nesting depth and node count of the saved object (a self-referencing list, or 60 levels of
shared halves that flatten to 2**60 leaves). Each breach is one InputError line.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import pickle
import zipfile
from typing import Any

import numpy as np

from llm3d_jax.fileio import InputError


@dataclasses.dataclass(frozen=True)
class PthLimits:
    """Bounds on what one checkpoint may make the reader allocate or visit."""

    max_total_bytes: int = 64 << 30  # archive contents, and all rebuilt tensors together
    max_tensor_bytes: int = 16 << 30  # one rebuilt tensor
    # A tensor may repeat its storage's elements (stride 0, e.g. an expanded tensor) by this much.
    max_view_slack_bytes: int = 64 << 20
    # All rebuilt tensors together may hold this many times the archive's bytes (tensors sharing
    # a storage, e.g. tied weights, each get a copy) plus the slack above, once per file.
    max_rebuilt_ratio: float = 4.0
    max_compression_ratio: float = 200.0
    max_depth: int = 100
    max_objects: int = 10_000_000  # nodes of the expanded object, shared ones counted each time


# torch storage class name -> numpy dtype (little-endian form); bfloat16 is read as uint16 bits.
STORAGE_DTYPES = {
    "DoubleStorage": "<f8",
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "BFloat16Storage": "bf16",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
    "ComplexFloatStorage": "<c8",
    "ComplexDoubleStorage": "<c16",
    "UntypedStorage": "u1",  # bytes; `_rebuild_tensor_v3` names the real dtype
}
# `torch.<dtype>` globals that `_rebuild_tensor_v3` passes (dtypes without a legacy storage class).
TORCH_DTYPES = {
    "uint16": "<u2",
    "uint32": "<u4",
    "uint64": "<u8",
    "float32": "<f4",
    "float16": "<f2",
    "bfloat16": "bf16",
    "int64": "<i8",
    "int32": "<i4",
    "int8": "i1",
    "uint8": "u1",
    "bool": "?",
}


class _StorageType:
    """Stand-in for a `torch.*Storage` class: only carries the element dtype."""

    def __init__(self, name: str, dtype: str):
        self.name, self.dtype = name, dtype


class _TorchDtype:
    """Stand-in for a `torch.<dtype>` object."""

    def __init__(self, dtype: str):
        self.dtype = dtype


class _Storage:
    """A storage as a flat numpy array of its elements (dtype "bf16" = raw uint16 bits)."""

    def __init__(self, data: np.ndarray, dtype: str):
        self.data, self.dtype = data, dtype


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _numpy_dtype(dtype: str, big_endian: bool) -> np.dtype:
    out = np.dtype("<u2" if dtype == "bf16" else dtype)
    return out.newbyteorder(">") if big_endian and out.itemsize > 1 else out


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str, limits: PthLimits):
        super().__init__(file)
        self.archive, self.prefix, self.path, self.limits = archive, prefix, path, limits
        self.tensor_bytes = 0  # bytes of all tensors rebuilt so far
        archive_bytes = sum(info.file_size for info in archive.infolist())
        self.tensor_budget = min(
            limits.max_total_bytes,
            int(limits.max_rebuilt_ratio * archive_bytes) + limits.max_view_slack_bytes,
        )
        byteorder = prefix + "byteorder"
        names = set(archive.namelist())
        self.big_endian = byteorder in names and archive.read(byteorder).decode().strip() == "big"
        self.storages: dict[str, _Storage] = {}

    # --- globals: a fixed allow-list of stand-ins, nothing imported ------------------------
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _REBUILD:
            return getattr(self, _REBUILD[(module, name)])
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name, STORAGE_DTYPES[name])
        if module in ("torch", "torch.storage") and name == "UntypedStorage":
            return _StorageType(name, "u1")
        if module == "torch" and name in TORCH_DTYPES:
            return _TorchDtype(TORCH_DTYPES[name])
        raise InputError(self.path, f"refused unsafe pickle global {module}.{name}")

    # --- storages: ("storage", type, key, location, numel) -> bytes of <prefix>data/<key> --
    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise InputError(self.path, f"unsupported persistent id {str(pid)[:60]}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise InputError(self.path, f"malformed storage reference {str(pid)[:60]}")
        if key not in self.storages:
            entry = f"{self.prefix}data/{key}"
            try:
                raw = self.archive.read(entry)
            except KeyError:
                raise InputError(
                    self.path, f"storage {entry} is missing from the archive"
                ) from None
            dtype = _numpy_dtype(storage_type.dtype, self.big_endian)
            if not isinstance(numel, int) or numel < 0:
                raise InputError(self.path, f"malformed storage reference {str(pid)[:60]}")
            if len(raw) < int(numel) * dtype.itemsize:
                raise InputError(
                    self.path,
                    f"storage {entry} holds {len(raw)} bytes, expected {int(numel) * dtype.itemsize}",
                )
            data = np.frombuffer(raw, dtype=dtype, count=int(numel))
            self.storages[key] = _Storage(data, storage_type.dtype)
        return self.storages[key]

    # --- tensors ----------------------------------------------------------------------------
    def _rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad=False,
                           backward_hooks=None, metadata=None):  # fmt: skip
        return self._tensor(storage, storage.dtype, offset, size, stride, metadata)

    def _rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad, backward_hooks,
                           dtype, metadata=None):  # fmt: skip
        if not isinstance(dtype, _TorchDtype):
            raise InputError(self.path, "malformed tensor: dtype is not a torch dtype")
        return self._tensor(storage, dtype.dtype, offset, size, stride, metadata)

    def _rebuild_parameter(self, data, requires_grad=False, backward_hooks=None, state=None):
        return data

    def _tensor(self, storage, dtype, offset, size, stride, metadata) -> np.ndarray:
        if not isinstance(storage, _Storage):
            raise InputError(self.path, "malformed tensor: its storage is not a storage reference")
        try:
            offset, size, stride = int(offset), tuple(map(int, size)), tuple(map(int, stride))
        except (TypeError, ValueError):
            raise InputError(
                self.path, "malformed tensor: offset/size/stride not integers"
            ) from None
        flat = storage.data
        if storage.dtype != dtype:  # v3: untyped byte storage, reinterpret
            flat = flat.view(_numpy_dtype(dtype, self.big_endian))
        # Bounds check before `as_strided`, which would otherwise read outside the buffer.
        if len(size) != len(stride) or min((*size, *stride, offset), default=0) < 0:
            raise InputError(self.path, f"malformed tensor: size {size} stride {stride}")
        # Bounds on what the copy below allocates, checked before it: a tiny file may declare
        # a huge stride-0 view of one element.
        nbytes = math.prod(size) * flat.itemsize
        if nbytes > storage.data.nbytes + self.limits.max_view_slack_bytes:
            raise InputError(
                self.path,
                f"tensor of size {size} declares {nbytes} bytes, more than its storage holds "
                f"({storage.data.nbytes} bytes)",
            )
        if nbytes > self.limits.max_tensor_bytes:
            raise InputError(
                self.path,
                f"tensor of size {size} declares {nbytes} bytes, more than the limit of "
                f"{self.limits.max_tensor_bytes} bytes per tensor",
            )
        self.tensor_bytes += nbytes
        if self.tensor_bytes > self.tensor_budget:
            raise InputError(
                self.path,
                f"tensors total more than {self.tensor_budget} bytes (the limit for a file of "
                "this size: a tiny file may not rebuild into gigabytes)",
            )
        if 0 not in size:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= flat.size:
                raise InputError(
                    self.path,
                    f"malformed tensor: size {size} stride {stride} offset {offset} "
                    f"overruns a storage of {flat.size} elements",
                )
            out = np.lib.stride_tricks.as_strided(
                flat[offset:], shape=size, strides=[s * flat.itemsize for s in stride]
            )
            out = np.array(out, dtype=flat.dtype.newbyteorder("="), order="C")
        else:
            out = np.zeros(size, dtype=flat.dtype.newbyteorder("="))
        if dtype == "bf16":
            out = _bf16_to_f32(out)
        if isinstance(metadata, dict) and metadata.get("neg"):
            out = -out
        if isinstance(metadata, dict) and metadata.get("conj"):
            out = np.conj(out)
        return out


# The only callables a checkpoint may name: our own numpy rebuilders ...
_REBUILD = {
    ("torch._utils", "_rebuild_tensor_v2"): "_rebuild_tensor_v2",
    ("torch._utils", "_rebuild_tensor_v3"): "_rebuild_tensor_v3",
    ("torch._utils", "_rebuild_parameter"): "_rebuild_parameter",
    ("torch._utils", "_rebuild_parameter_with_state"): "_rebuild_parameter",
}
# ... and these harmless constructors.
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    # protocol-2 pickles write `bytes` objects as _codecs.encode(str, "latin1").
    ("_codecs", "encode"): lambda text, encoding="utf-8": str(text).encode(str(encoding)),
}


def _check_archive(archive: zipfile.ZipFile, path: str, limits: PthLimits) -> None:
    """Refuses an archive whose declared contents are too big or inflate like a zip bomb."""
    total = 0
    for info in archive.infolist():
        total += info.file_size
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > (1 << 20) and ratio > limits.max_compression_ratio:
            raise InputError(
                path,
                f"{info.filename} has compression ratio {ratio:.0f}:1 (a zip bomb?); "
                "torch.save stores tensors uncompressed",
            )
    if total > limits.max_total_bytes:
        raise InputError(
            path,
            f"archive holds {total} bytes, more than the limit of {limits.max_total_bytes} bytes",
        )


def _children(node: Any) -> list | None:
    if isinstance(node, dict):
        return [x for item in node.items() for x in item]
    if isinstance(node, (list, tuple, set, frozenset)):
        return list(node)
    return None


def _check_structure(obj: Any, path: str, limits: PthLimits) -> None:
    """Bounds the depth and the node count (shared nodes counted each time) of the saved object.

    `flatten` and any other walk visit every path through the object, so a self-referencing
    list never ends and 60 levels of shared halves give 2**60 leaves; both stop here instead.
    Each container is visited once (its expanded size is memoised), so this takes time linear
    in the pickle, whatever it expands to.
    """
    sizes: dict[int, int] = {}  # id -> nodes of the expanded tree rooted there
    ancestors: set[int] = set()
    stack = [(obj, False)]
    while stack:
        node, children_done = stack.pop()
        children = _children(node)
        if children is None or (not children_done and id(node) in sizes):
            continue
        if children_done:
            ancestors.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes.get(id(c), 1) for c in children)
            if sizes[id(node)] > limits.max_objects:
                raise InputError(
                    path,
                    f"the saved object expands to more than {limits.max_objects} nodes "
                    "(shared ones counted each time)",
                )
            continue
        if id(node) in ancestors:
            raise InputError(path, "the saved object refers to itself (a cycle)")
        ancestors.add(id(node))
        if len(ancestors) > limits.max_depth:
            raise InputError(
                path, f"the saved object is nested deeper than {limits.max_depth} levels"
            )
        stack.append((node, True))
        stack.extend((c, False) for c in children)


def load_pth(path: str | os.PathLike, limits: PthLimits = PthLimits()) -> Any:
    """The object saved with `torch.save`, tensors as numpy arrays; refuses unsafe pickles.

    Refuses as well (one InputError line) anything past `limits` (see the module doc).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(path, "file not found")
    if not zipfile.is_zipfile(path):
        raise InputError(
            path,
            "not a torch zip checkpoint (legacy pre-1.6 torch pickles and tar files are not "
            "read; re-save it with torch.save from a current torch)",
        )
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise InputError(path, f"unreadable zip archive ({type(err).__name__}: {err})") from None
    with archive:
        _check_archive(archive, path, limits)
        pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise InputError(path, f"expected one data.pkl in the archive, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        with archive.open(pickles[0]) as f:
            unpickler = _RestrictedUnpickler(f, archive, prefix, path, limits)
            try:
                obj = unpickler.load()
            except InputError:
                raise
            except Exception as err:  # truncated or corrupt pickle data
                raise InputError(path, f"unreadable pickle ({type(err).__name__}: {err})") from None
    _check_structure(obj, path, limits)
    return obj


def flatten(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """{dotted key: array} of every array in nested dicts / lists / tuples; other leaves dropped."""
    if isinstance(obj, np.ndarray):
        return {prefix: obj}
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return {}
    out: dict[str, np.ndarray] = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def read_pth(path: str | os.PathLike, limits: PthLimits = PthLimits()) -> dict[str, np.ndarray]:
    """All tensors of a `.pth` / `.pt` file as `{dotted.key: np.ndarray}` (see module doc)."""
    return flatten(load_pth(path, limits))
