"""Read PyTorch checkpoints (``.pth`` / ``.pth.tar``) into numpy arrays without importing torch.

Two on-disk formats exist:

* **Zip** (``torch.save`` default since 1.6): a zip archive whose entries share one prefix folder.
  ``<prefix>/data.pkl`` is a pickle of the object tree in which every storage is a *persistent id*
  ``('storage', storage_type, key, location, numel)``; its raw bytes are the stored entry
  ``<prefix>/data/<key>``. ``<prefix>/byteorder`` (``little``/``big``) says how they are ordered.
  Dtypes without a legacy storage class (uint16, float8, ...) are written as an untyped byte
  storage plus ``_rebuild_tensor_v3(..., dtype)``.
* **Legacy** (``_use_new_zipfile_serialization=False``, pre-1.6): a stream of pickles -- a magic
  number, the protocol version (1001), a sys-info dict, the object tree (persistent ids
  ``('storage', storage_type, root_key, location, numel, view_metadata)``), the list of storage
  keys -- followed, for each key in that order, by an 8-byte little-endian element count and the
  raw little-endian bytes.

Pickles can run arbitrary code, so the unpickler here maps the handful of globals a checkpoint
needs to our own small, argument-checking implementations and refuses everything else. Objects
built while unpickling are inert placeholders; tensors become numpy arrays only afterwards, once
all storage bytes are known to be present and every size has been checked against a budget.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from grad_jax.errors import TorchFileError

__all__ = ["TorchFileError", "UnsafePickleError", "load"]


class UnsafePickleError(TorchFileError):
    """The pickle asks for a global (or a trick) outside the allow-list."""


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# torch stores zip entries uncompressed; above 1 MiB, a >200:1 compression ratio is a zip bomb.
_BOMB_MIN = 1 << 20
_CHUNK = 1 << 24  # read zip entries in pieces so no second full-size copy is made
_UNSAFE_HINT = (
    "only PyTorch tensors and plain containers are allowed "
    "(this file may be malicious or not a PyTorch checkpoint)"
)

# ``torch.<dtype>`` globals (passed to _rebuild_tensor_v3) -> numpy dtype.
_TORCH_DTYPES = {
    n: np.dtype(getattr(ml_dtypes, n, None) or n)
    for n in "float64 float32 float16 bfloat16 int64 int32 int16 int8 uint8 uint16 uint32 uint64 "
    "bool complex64 complex128 float8_e4m3fn float8_e5m2 float8_e4m3fnuz float8_e5m2fnuz".split()
}
# Legacy storage classes named in persistent ids (``torch.FloatStorage``) -> torch dtype name.
_STORAGE_TYPES = dict(
    Double="float64", Float="float32", Half="float16", BFloat16="bfloat16", Long="int64",
    Int="int32", Short="int16", Char="int8", Byte="uint8", Bool="bool",
    ComplexFloat="complex64", ComplexDouble="complex128",
)  # fmt: skip
# numpy scalar dtypes accepted in ``numpy.dtype(name, ...)``: plain numbers only, no objects.
_NUMPY_SCALAR_NAMES = frozenset("b1 i1 i2 i4 i8 u1 u2 u4 u8 f2 f4 f8 c8 c16".split())


class _Inert:
    """Base of every non-builtin object the unpickler can create.

    No ``__dict__`` and a class-level ``__setstate__`` that refuses, so a BUILD opcode can
    neither call anything nor plant attributes (which would outlive this load for the shared,
    allow-listed callables).
    """

    __slots__: tuple[str, ...] = ()

    def __init__(self, *values: Any) -> None:
        for slot, value in zip(self.__slots__, values, strict=True):
            setattr(self, slot, value)

    def __setstate__(self, state: Any) -> None:
        raise UnsafePickleError(f"refusing BUILD on {type(self).__name__}: {_UNSAFE_HINT}")


class _Func(_Inert):
    __slots__ = ("fn",)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


class _DType(_Inert):
    """A ``torch.FooStorage`` class or ``torch.<dtype>``: a dtype marker (None: untyped bytes)."""

    __slots__ = ("dtype",)


class _Storage(_Inert):
    # root: a legacy storage view points at its root; base: its byte offset in the root;
    # data: the bytes, filled in after unpickling; units: element byte-swap sizes seen.
    __slots__ = ("key", "dtype", "nbytes", "base", "root", "data", "units")


class _Tensor(_Inert):
    __slots__ = ("storage", "dtype", "offset", "shape", "strides")


class _Scalar(_Inert):
    __slots__ = ("value",)


class _NumpyDType(_Inert):
    __slots__ = ("dtype", "order")

    def __setstate__(self, state: Any) -> None:
        # numpy pickles a dtype as numpy.dtype(name, align, copy) then BUILD with a state tuple
        # (version, byteorder, subdtype, names, fields, ...); only plain numbers are allowed.
        plain = type(state) is tuple and len(state) >= 5 and state[2:5] == (None, None, None)
        if not plain or state[1] not in ("<", ">", "|", "="):
            raise UnsafePickleError(f"refusing numpy dtype state {state!r:.80}: {_UNSAFE_HINT}")
        self.order = state[1]


class _StateDict(dict):
    """Stand-in for OrderedDict while unpickling (a dict keeps insertion order)."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        # state_dict() carries a `_metadata` attribute that OrderedDict.__reduce__ emits as BUILD
        # state. It is only version info, so plain data attributes are accepted and dropped;
        # dunder names (a planted __setstate__, __class__, ...) are an attack.
        names = state if isinstance(state, dict) else {None: None}
        if any(not isinstance(k, str) or k.startswith("__") for k in names):
            raise UnsafePickleError(f"refusing BUILD state on OrderedDict: {_UNSAFE_HINT}")


def _swap_unit(dtype: np.dtype) -> int:
    return dtype.itemsize // (2 if dtype.kind == "c" else 1)  # complex = pair of floats


def _new_storage(key: str, dtype: np.dtype | None, nbytes: int, base: int) -> _Storage:
    units = set() if dtype is None else {_swap_unit(dtype)}
    st = _Storage(key, dtype, nbytes, base, None, None, units)
    st.root = st
    return st


def _is_index(x: Any) -> bool:
    return type(x) is int and x >= 0


def _index_tuple(x: Any, what: str) -> tuple[int, ...]:
    if type(x) is not tuple or not all(_is_index(v) for v in x):
        raise TorchFileError(f"tensor {what} must be a tuple of non-negative ints, got {x!r:.80}")
    return x


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, meta=None):
    if not isinstance(storage, _Storage) or not isinstance(dtype, _DType) or dtype.dtype is None:
        raise TorchFileError("_rebuild_tensor called without a storage and dtype")
    if not _is_index(offset) or type(requires_grad) is not bool or not isinstance(hooks, dict):
        raise TorchFileError("_rebuild_tensor called with malformed arguments")
    if meta is not None and not isinstance(meta, dict):
        raise TorchFileError("_rebuild_tensor called with malformed metadata")
    size, stride = _index_tuple(size, "size"), _index_tuple(stride, "stride")
    if len(size) != len(stride):
        raise TorchFileError(f"tensor {size=} and {stride=} differ in length")
    # The element one past the furthest one the view touches must lie inside the storage.
    end = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if 0 not in size and end * dtype.dtype.itemsize > storage.nbytes:
        raise TorchFileError(f"tensor {size=} {stride=} {offset=} reaches past its storage")
    storage.root.units.add(_swap_unit(dtype.dtype))
    return _Tensor(storage, dtype.dtype, offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, meta=None):
    if not isinstance(storage, _Storage) or storage.dtype is None:
        raise TorchFileError("_rebuild_tensor_v2 called without a typed storage")
    dtype = _DType(storage.dtype)
    return _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, meta)


def _rebuild_tensor(storage, offset, size, stride):  # torch < 1.0
    return _rebuild_tensor_v2(storage, offset, size, stride, False, {})


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    # A Parameter is just its tensor here; any Python attributes in `state` are dropped.
    if not isinstance(data, _Tensor) or type(requires_grad) is not bool:
        raise TorchFileError("_rebuild_parameter called without a tensor")
    if not isinstance(hooks, dict) or not isinstance(state, dict | tuple | type(None)):
        raise TorchFileError("_rebuild_parameter called with malformed arguments")
    return data


def _ordered_dict() -> _StateDict:
    return _StateDict()  # OrderedDict.__reduce__ always passes no arguments


def _torch_size(dims: Any) -> tuple[int, ...]:
    return _index_tuple(tuple(dims) if type(dims) in (list, tuple) else dims, "torch.Size")


def _numpy_dtype(name: Any, align: Any = False, copy: Any = False) -> _NumpyDType:
    plain = type(name) is str and name in _NUMPY_SCALAR_NAMES
    if not plain or {type(align), type(copy)} != {bool}:
        raise UnsafePickleError(f"refusing numpy dtype {name!r:.40}: {_UNSAFE_HINT}")
    return _NumpyDType(np.dtype(name), "=")


def _numpy_scalar(dtype: Any, data: Any) -> _Scalar:
    if not isinstance(dtype, _NumpyDType) or type(data) is not bytes:
        raise TorchFileError("numpy scalar needs a numeric dtype and bytes")
    if len(data) != dtype.dtype.itemsize:
        raise TorchFileError(f"numpy scalar of dtype {dtype.dtype} with {len(data)} bytes")
    order = "<" if dtype.order == "|" else dtype.order  # '|' only for 1-byte types
    return _Scalar(np.frombuffer(data, dtype.dtype.newbyteorder(order))[0])


def _codecs_encode(text: Any, encoding: Any) -> bytes:
    # numpy scalars pickled with protocol 2 carry their bytes as a latin-1 str.
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refusing _codecs.encode(..., {encoding!r:.20}): {_UNSAFE_HINT}")
    return text.encode("latin-1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _Func(_ordered_dict),
    ("torch._utils", "_rebuild_tensor"): _Func(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _Func(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): _Func(_rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _Func(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Func(_rebuild_parameter),
    ("torch", "Size"): _Func(_torch_size),
    ("torch", "UntypedStorage"): _DType(None),
    ("torch.storage", "UntypedStorage"): _DType(None),
    ("numpy", "dtype"): _Func(_numpy_dtype),
    ("numpy.core.multiarray", "scalar"): _Func(_numpy_scalar),
    ("numpy._core.multiarray", "scalar"): _Func(_numpy_scalar),
    ("_codecs", "encode"): _Func(_codecs_encode),
}
_ALLOWED.update(
    {("torch", k + "Storage"): _DType(_TORCH_DTYPES[v]) for k, v in _STORAGE_TYPES.items()}
)
_ALLOWED.update({("torch", k): _DType(v) for k, v in _TORCH_DTYPES.items()})


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, loader: _Loader | None) -> None:
        super().__init__(file, encoding="utf-8")
        self._loader = loader  # None: a header pickle, which may use no globals at all

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name)) if self._loader is not None else None
        if found is None:
            qual = f"{module}.{name}"[:120].encode("unicode_escape").decode("ascii")
            raise UnsafePickleError(f"refusing to load global '{qual}': {_UNSAFE_HINT}")
        return found

    def persistent_load(self, pid: Any) -> _Storage:
        if self._loader is None:
            raise TorchFileError("unexpected persistent id in a header pickle")
        return self._loader.storage(pid)


class _Loader:
    def __init__(self, max_total_bytes: int) -> None:
        self.cap = max_total_bytes
        self.storages: dict[str, _Storage] = {}  # root storages by key
        self.copied = 0  # bytes allocated for non-contiguous copies, budgeted separately

    def storage(self, pid: Any) -> _Storage:
        if type(pid) is not tuple or len(pid) not in (5, 6) or pid[0] != "storage":
            raise TorchFileError(f"unsupported persistent id {pid!r:.80}")
        _, stype, key, location, numel = pid[:5]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(stype, _DType) or type(key) is not str or type(location) is not str:
            raise TorchFileError(f"malformed storage id {pid!r:.80}")
        if not _is_index(numel):
            raise TorchFileError(f"storage {key!r:.40} has invalid size {numel!r:.40}")
        itemsize = 1 if stype.dtype is None else stype.dtype.itemsize
        nbytes = numel * itemsize
        if nbytes > self.cap:  # checked before anything is allocated
            raise TorchFileError(
                f"storage {key!r:.40} declares {nbytes} bytes > max_total_bytes={self.cap}"
            )
        root = self.storages.get(key)
        if root is None:
            root = self.storages[key] = _new_storage(key, stype.dtype, nbytes, 0)
        elif root.dtype != stype.dtype or root.nbytes != nbytes:
            raise TorchFileError(f"storage {key!r:.40} is declared twice with different types")
        if view is None:
            return root
        # Very old legacy files: (view_key, element offset, element count) into the root.
        if type(view) is not tuple or len(view) != 3 or not all(map(_is_index, view[1:])):
            raise TorchFileError(f"malformed storage view {view!r:.80}")
        if (view[1] + view[2]) * itemsize > nbytes:
            raise TorchFileError(f"storage view {view!r:.80} reaches past its root storage")
        sub = _new_storage(key, stype.dtype, view[2] * itemsize, view[1] * itemsize)
        sub.root = root
        return sub

    def check_total(self) -> None:
        total = sum(s.nbytes for s in self.storages.values())
        if total > self.cap:
            raise TorchFileError(f"storages total {total} bytes, over max_total_bytes={self.cap}")

    @staticmethod
    def swap_to_native(st: _Storage, little: bool) -> None:
        if little == np.little_endian or max(st.units, default=1) == 1:
            return
        if len(st.units) > 1:
            raise TorchFileError(f"storage {st.key!r:.40} is viewed with mixed element sizes")
        (unit,) = st.units
        np.frombuffer(st.data, np.dtype(f"u{unit}")).byteswap(inplace=True)

    def array(self, t: _Tensor) -> np.ndarray:
        data = t.storage.root.data
        if data is None:
            raise TorchFileError(f"no data for storage {t.storage.key!r:.40}")
        n, isz = math.prod(t.shape), t.dtype.itemsize
        if n == 0:
            return np.zeros(t.shape, t.dtype)
        start = t.storage.base + t.offset * isz
        contiguous = [1] * len(t.shape)  # Python ints: no overflow on hostile shapes
        for i in range(len(t.shape) - 2, -1, -1):
            contiguous[i] = contiguous[i + 1] * t.shape[i + 1]
        if all(n_ == 1 or s == c for n_, s, c in zip(t.shape, t.strides, contiguous, strict=True)):
            # Zero-copy view into the storage, as torch does (tensors sharing it alias).
            return np.ndarray(t.shape, t.dtype, buffer=data, offset=start)
        self.copied += n * isz
        if self.copied > self.cap:  # e.g. a stride-0 "expanded" tensor of 2**40 elements
            raise TorchFileError(f"tensors need over max_total_bytes={self.cap} bytes of copies")
        strides = tuple(s * isz for s in t.strides)
        return np.ndarray(t.shape, t.dtype, buffer=data, offset=start, strides=strides).copy()

    def finish(self, obj: Any, memo: dict[int, Any]) -> Any:
        """Replace placeholders by numpy objects and OrderedDicts by dicts, keeping sharing."""
        kind = type(obj)
        if kind in (str, bytes, int, float, bool, complex, bytearray) or obj is None:
            return obj
        if id(obj) in memo:
            if memo[id(obj)] is memo:
                raise TorchFileError("self-referencing tuple")
            return memo[id(obj)]
        if kind is list:
            out = memo[id(obj)] = []
            out.extend(self.finish(v, memo) for v in obj)
        elif kind is dict or kind is _StateDict:
            out = memo[id(obj)] = {}
            for k, v in obj.items():
                out[self.finish(k, memo)] = self.finish(v, memo)
        elif kind is tuple or kind is frozenset or kind is set:
            memo[id(obj)] = memo  # in-progress marker
            out = kind(self.finish(v, memo) for v in obj)
        elif kind is _Tensor:
            out = self.array(obj)
        elif kind is _Scalar:
            out = obj.value
        elif kind is _Storage and obj.dtype is not None:  # a bare (typed) storage was saved
            out = self.array(_Tensor(obj, obj.dtype, 0, (obj.nbytes // obj.dtype.itemsize,), (1,)))
        elif kind is _Storage:
            out = self.array(_Tensor(obj, np.dtype(np.uint8), 0, (obj.nbytes,), (1,)))
        else:
            raise TorchFileError(f"unexpected {kind.__name__} object in the checkpoint")
        memo[id(obj)] = out
        return out


def _check_entry(info: zipfile.ZipInfo, cap: int) -> None:
    # Decide from the declared sizes alone, before decompressing a byte.
    if info.file_size > cap:
        raise TorchFileError(f"zip entry {info.filename!r:.80} declares {info.file_size} bytes")
    ratio = info.file_size / max(info.compress_size, 1)
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > _BOMB_MIN and ratio > 200:
        raise TorchFileError(f"zip entry {info.filename!r:.80} looks like a zip bomb")


def _read_into(fh: BinaryIO, nbytes: int, what: str) -> bytearray:
    buf = bytearray(nbytes)
    view, pos = memoryview(buf), 0
    while pos < nbytes:
        got = fh.readinto(view[pos : pos + _CHUNK])
        if not got:
            raise TorchFileError(f"{what} is truncated ({pos} of {nbytes} bytes)")
        pos += got
    return buf


def _load_zip(f: BinaryIO, loader: _Loader) -> Any:
    with zipfile.ZipFile(f) as zf:
        return _load_zip_entries(zf, loader)


def _load_zip_entries(zf: zipfile.ZipFile, loader: _Loader) -> Any:
    names = set(zf.namelist())
    pkls = sorted((n for n in names if n.rsplit("/", 1)[-1] == "data.pkl"), key=len)
    if not pkls or pkls[0].count("/") > 1:
        raise TorchFileError("zip archive has no data.pkl: not a PyTorch checkpoint")
    prefix = pkls[0][: -len("data.pkl")]
    little = True
    if prefix + "byteorder" in names:
        info = zf.getinfo(prefix + "byteorder")
        _check_entry(info, 16)
        order = zf.read(info)
        if order not in (b"little", b"big"):
            raise TorchFileError(f"unknown byteorder {order!r:.20}")
        little = order == b"little"
    info = zf.getinfo(pkls[0])
    _check_entry(info, loader.cap)
    obj = _Unpickler(io.BytesIO(zf.read(info)), loader).load()
    loader.check_total()
    for key, st in loader.storages.items():
        name = f"{prefix}data/{key}"
        if name not in names:
            raise TorchFileError(f"storage entry {name!r:.80} is missing")
        info = zf.getinfo(name)
        _check_entry(info, loader.cap)
        if info.file_size < st.nbytes:
            raise TorchFileError(f"{name!r:.80} holds {info.file_size} of {st.nbytes} bytes")
        with zf.open(info) as fh:
            st.data = _read_into(fh, st.nbytes, repr(name))
        loader.swap_to_native(st, little)
    return obj


def _load_legacy(f: BinaryIO, loader: _Loader, size: int) -> Any:
    magic = _Unpickler(f, None).load()
    if type(magic) is not int or magic != _LEGACY_MAGIC:
        raise TorchFileError("bad magic number: not a PyTorch checkpoint")
    protocol = _Unpickler(f, None).load()
    if protocol != _LEGACY_PROTOCOL:
        raise TorchFileError(f"unsupported legacy protocol version {protocol!r:.40}")
    if not isinstance(_Unpickler(f, None).load(), dict):
        raise TorchFileError("malformed sys-info header")
    obj = _Unpickler(f, loader).load()
    loader.check_total()
    keys = _Unpickler(f, None).load()
    if type(keys) is not list or not all(type(k) is str for k in keys):
        raise TorchFileError("malformed storage key list")
    for key in keys:
        st = loader.storages.get(key)
        if st is None or st.data is not None:
            raise TorchFileError(f"unexpected storage key {key!r:.40}")
        head = f.read(8)
        if len(head) != 8:
            raise TorchFileError(f"storage {key!r:.40} is truncated")
        (count,) = struct.unpack("<q", head)
        itemsize = 1 if st.dtype is None else st.dtype.itemsize
        if count != st.nbytes // itemsize:
            raise TorchFileError(f"storage {key!r:.40} holds {count} elements, not as declared")
        if st.nbytes > size - f.tell():  # checked before allocating
            raise TorchFileError(f"storage {key!r:.40} is truncated ({st.nbytes} bytes needed)")
        st.data = _read_into(f, st.nbytes, f"storage {key!r:.40}")
        loader.swap_to_native(st, little=True)  # torch always writes legacy data little-endian
    missing = [k for k, s in loader.storages.items() if s.data is None]
    if missing:
        raise TorchFileError(f"no data for storage {missing[0]!r:.40}")
    return obj


def load(path: str | os.PathLike[str], *, max_total_bytes: int = 8 * 2**30) -> Any:
    """Load a PyTorch checkpoint as plain containers with numpy arrays for tensors.

    Raises FileNotFoundError for a missing file, UnsafePickleError for a global outside the
    allow-list, and TorchFileError (one line, naming the file) for anything else wrong with it.
    ``max_total_bytes`` bounds the storage bytes read, and separately the copies made for
    non-contiguous views, so a hostile file cannot make us allocate without limit.
    """
    name = os.fsdecode(path)
    with open(path, "rb") as f:  # FileNotFoundError / PermissionError propagate as they are
        size = os.fstat(f.fileno()).st_size
        loader = _Loader(max_total_bytes)
        try:
            head = f.read(4)
            f.seek(0)
            if not head:
                raise TorchFileError("empty file")
            if head.startswith(b"PK"):
                obj = _load_zip(f, loader)
            elif head[0] == 0x80:  # pickle protocol opcode: the legacy stream
                obj = _load_legacy(f, loader, size)
            else:
                raise TorchFileError("unrecognised header: not a PyTorch checkpoint")
            return loader.finish(obj, {})
        except TorchFileError as e:
            raise type(e)(f"{name}: {e}".replace("\n", " ")) from None
        except Exception as e:  # pickle/zip/struct/EOF/Recursion/Memory errors from hostile bytes
            reason = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
            raise TorchFileError(f"{name}: corrupt or truncated PyTorch file ({reason})") from e
