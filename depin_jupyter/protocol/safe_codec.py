"""A pickle-free encoding for results that come back from untrusted volunteer workers.

Unpickling runs code chosen by whoever wrote the bytes, so a kernel must never unpickle what a
volunteer sends. This codec carries plain data only: None, bool, int (any size), float, complex,
str, bytes, bytearray, list, tuple, dict, set, frozenset, numpy arrays and scalars of non-object
dtypes (kinds b i u f c m M S U), and cupy arrays. Decoding builds nothing but those types.

Wire format: msgpack. A payload is the array ``[Ext(0, version), value]``. Python types msgpack has
no type for are tagged with small ext types: big ints and complex numbers are leaf exts; tuples,
sets, frozensets, bytearrays, arrays and numpy scalars are msgpack arrays whose first element is an
empty "marker" ext, so array bytes are written as plain msgpack ``bin`` without an extra copy.

Decoding hostile bytes raises `DecodeError` (a `ValueError`): unknown ext codes, markers anywhere
but first in an array, msgpack timestamps, dtype strings outside a whitelist or of kind object,
array data whose length is not ``prod(shape) * itemsize``, payloads over ``max_bytes``.

cupy arrays are encoded from host memory (``.get()``) and marked as device arrays; `decode` returns
them as cupy arrays when cupy can be imported and used on the decoding side, else as numpy arrays.
"""

from __future__ import annotations

import itertools
import math
import re
import struct
import sys
from typing import Any

import msgpack
import numpy as np

__all__ = ["MAX_DEPTH", "DecodeError", "UnsafeValueError", "decode", "encodable", "encode"]

MAX_DEPTH = 100  # containers nested deeper than this (or referring to themselves) are refused
FORMAT_VERSION = 1

# Ext codes. Leaves carry their value; markers are empty and only valid first in a msgpack array.
_EXT_ENVELOPE = 0  # payload: one byte, FORMAT_VERSION
_EXT_BIGINT = 1  # payload: ASCII hex text, e.g. b"-1f" (linear time both ways, no digit limit)
_EXT_COMPLEX = 2  # payload: real and imaginary part as two big-endian float64
_MARK_TUPLE = 3  # [mark, *items]
_MARK_SET = 4  # [mark, *items]
_MARK_FROZENSET = 5  # [mark, *items]
_MARK_BYTEARRAY = 6  # [mark, bin]
_MARK_NDARRAY = 7  # [mark, dtype str, shape list, fortran bool, bin]
_MARK_NPSCALAR = 8  # [mark, dtype str, bin]
_MARK_CUPY = 9  # as _MARK_NDARRAY; decoded to cupy where available

_ARRAY_KINDS = frozenset("biufcmMSU")
_DEVICE_KINDS = frozenset("biufc")
_DTYPE_RE = re.compile(r"[<>|=]?[biufcmMSU]\d{1,9}(\[\w{1,16}\])?")
_BIGINT_RE = re.compile(rb"-?[0-9a-f]{1,}")
_MAX_NDIM = 64
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what msgpack stores natively (int64 and uint64)
_PLAIN = frozenset({type(None), bool, float, str, bytes})

_FIX = (
    "Convert it to numpy arrays, numbers, str, bytes, lists, tuples or dicts, or run the cell on a cluster "
    "of your own (`%depin connect local`), whose results travel by pickle."
)


class UnsafeValueError(TypeError):
    """A value that cannot leave a volunteer worker without pickle; the message names its path and type."""

    def __init__(self, message: str, *, path: str = "", type_name: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.type_name = type_name


class DecodeError(ValueError):
    """A payload that is not a well-formed safe_codec encoding (truncated, hostile, or over the size cap)."""


class _Refusal(Exception):
    """Raised at the refused value; containers add their path segment while it unwinds."""

    def __init__(self, type_name: str, why: str) -> None:
        super().__init__(why)
        self.type_name = type_name
        self.why = why
        self.segments: list[str] = []


# -- encoding -----------------------------------------------------------------------------------------


def encode(obj: Any, *, name: str = "result") -> bytes:
    """Encode `obj` as safe_codec bytes; raises UnsafeValueError (naming the path under `name`) for anything else."""
    packer = msgpack.Packer(autoreset=False, use_bin_type=True, unicode_errors="surrogatepass")
    packer.pack_array_header(2)
    packer.pack(msgpack.ExtType(_EXT_ENVELOPE, bytes([FORMAT_VERSION])))
    try:
        _encode(packer, obj, 0, set())
    except _Refusal as r:
        path = _short_path(name + "".join(reversed(r.segments)))
        raise UnsafeValueError(f"{path} {r.why} {_FIX}", path=path, type_name=r.type_name) from None
    return packer.bytes()


def encodable(obj: Any, *, name: str = "result") -> str | None:
    """None when `encode(obj)` works, else the reason (the UnsafeValueError message); a pre-flight check."""
    try:
        encode(obj, name=name)
    except UnsafeValueError as e:
        return str(e)
    return None


def _encode(p: msgpack.Packer, obj: Any, depth: int, active: set[int]) -> None:
    t = type(obj)
    if t in _PLAIN:
        p.pack(obj)
    elif t is int:
        if _INT_MIN <= obj <= _INT_MAX:
            p.pack(obj)
        else:
            p.pack_ext_type(_EXT_BIGINT, format(obj, "x").encode("ascii"))
    elif t is np.ndarray:
        _encode_array(p, obj, _MARK_NDARRAY)
    elif t is list or t is tuple or t is set or t is frozenset:
        _enter(obj, depth, active)
        try:
            if t is list:
                p.pack_array_header(len(obj))
            else:
                p.pack_array_header(len(obj) + 1)
                p.pack_ext_type(_MARK_TUPLE if t is tuple else _MARK_SET if t is set else _MARK_FROZENSET, b"")
            i = -1
            try:
                for i, item in enumerate(obj):  # noqa: B007 - i names the element in a refusal
                    _encode(p, item, depth + 1, active)
            except _Refusal as r:
                r.segments.append(f"[{i}]" if t is list or t is tuple else f"{{element #{i}}}")
                raise
        finally:
            active.discard(id(obj))
    elif t is dict:
        _enter(obj, depth, active)
        try:
            p.pack_map_header(len(obj))
            i, key, in_key = -1, None, True
            try:
                for i, (key, value) in enumerate(obj.items()):  # noqa: B007 - i names the key in a refusal
                    in_key = True
                    _encode(p, key, depth + 1, active)
                    in_key = False
                    _encode(p, value, depth + 1, active)
            except _Refusal as r:
                r.segments.append(f"{{key #{i}}}" if in_key else f"[{_short_repr(key)}]")
                raise
        finally:
            active.discard(id(obj))
    elif t is complex:
        p.pack_ext_type(_EXT_COMPLEX, struct.pack(">dd", obj.real, obj.imag))
    elif t is bytearray:
        p.pack_array_header(2)
        p.pack_ext_type(_MARK_BYTEARRAY, b"")
        p.pack(memoryview(obj))
    elif isinstance(obj, np.generic):
        _encode_scalar(p, obj)
    else:
        cupy = sys.modules.get("cupy")
        if cupy is not None and t is getattr(cupy, "ndarray", None):
            _encode_array(p, obj.get(order="A"), _MARK_CUPY)
        else:
            raise _refusal(obj)


def _enter(obj: Any, depth: int, active: set[int]) -> None:
    if id(obj) in active:
        raise _Refusal(_type_name(obj), f"is a {_type_name(obj)} that contains itself (a reference cycle).")
    if depth >= MAX_DEPTH:
        raise _Refusal(_type_name(obj), f"is a {_type_name(obj)} nested more than {MAX_DEPTH} containers deep.")
    active.add(id(obj))


def _encode_array(p: msgpack.Packer, arr: np.ndarray, mark: int) -> None:
    dt = arr.dtype
    if dt.kind not in _ARRAY_KINDS or dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        raise _array_dtype_refusal(dt, "numpy array")
    fortran = bool(arr.flags.f_contiguous and not arr.flags.c_contiguous and arr.ndim > 1)
    flat = arr.T if fortran else arr  # .T of a Fortran-ordered array is C-contiguous: same bytes, no copy
    flat = np.ascontiguousarray(flat).reshape(-1).view(np.uint8)
    p.pack_array_header(5)
    p.pack_ext_type(mark, b"")
    p.pack(dt.str)
    p.pack(list(arr.shape))
    p.pack(fortran)
    p.pack(memoryview(flat))  # type: ignore[arg-type]  # numpy stubs: an ndarray is a buffer


def _encode_scalar(p: msgpack.Packer, obj: np.generic) -> None:
    dt = obj.dtype
    if dt.kind not in _ARRAY_KINDS or dt.fields is not None or dt.subdtype is not None:
        raise _array_dtype_refusal(dt, "numpy scalar")
    if type(obj) is not dt.type:  # a subclass of a numpy scalar type would come back as its base
        raise _refusal(obj)
    p.pack_array_header(3)
    p.pack_ext_type(_MARK_NPSCALAR, b"")
    p.pack(dt.str)
    p.pack(obj.tobytes() if dt.itemsize else b"")  # np.str_("").tobytes() is 4 bytes for itemsize 0


def _array_dtype_refusal(dt: np.dtype, what: str) -> _Refusal:
    if dt.hasobject or dt.kind == "O":
        why = f"is a {what} of dtype object (it holds arbitrary Python objects)."
    elif dt.fields is not None or dt.kind == "V":
        why = f"is a {what} of structured/void dtype {dt}; send each field as its own array."
    else:
        why = f"is a {what} of dtype {dt}, which is not supported."
    return _Refusal(f"{what} (dtype {dt})", why)


def _refusal(obj: Any) -> _Refusal:
    name = _type_name(obj)
    hint = ""
    if isinstance(obj, np.ndarray) and obj.dtype.fields is not None:
        hint = " It is a record array (structured dtype): send each field as its own plain numpy array."
    elif isinstance(obj, np.ndarray):
        hint = " It is a subclass of numpy.ndarray: pass np.asarray(value) instead."
    elif isinstance(obj, (dict, list, tuple, set, frozenset, str, bytes, int, float, complex)):
        hint = " Subclasses of built-in types are refused: convert it to the plain built-in type."
    return _Refusal(name, f"is of type {name}, which cannot be sent back from a volunteer worker without pickle.{hint}")


def _type_name(obj: Any) -> str:
    t = type(obj)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _short_repr(key: Any) -> str:
    r = repr(key)
    return r if len(r) <= 40 else r[:37] + "..."


def _short_path(path: str) -> str:
    return path if len(path) <= 160 else path[:80] + "..." + path[-70:]


# -- decoding -----------------------------------------------------------------------------------------


class _Marker:
    """What a marker ext decodes to until the array it heads is turned into its value."""

    __slots__ = ("code",)

    def __init__(self, code: int) -> None:
        self.code = code


class _Envelope:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


_MARKERS = {
    code: _Marker(code)
    for code in (_MARK_TUPLE, _MARK_SET, _MARK_FROZENSET, _MARK_BYTEARRAY, _MARK_NDARRAY, _MARK_NPSCALAR, _MARK_CUPY)
}
_ENVELOPE_MARK = _Marker(_EXT_ENVELOPE)
# Types that must never appear as values: leftover markers or envelopes, and msgpack's own Timestamp
# (ext -1 is decoded by msgpack itself, without calling ext_hook).
_FORBIDDEN = frozenset({_Marker, _Envelope, msgpack.Timestamp})


def decode(data: bytes | bytearray | memoryview, *, max_bytes: int | None = None) -> Any:
    """Decode bytes from `encode`, building only plain data types; DecodeError for anything malformed or hostile."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected bytes to decode, got {_type_name(data)}")
    n = memoryview(data).nbytes
    if max_bytes is not None and n > max_bytes:
        raise DecodeError(f"result payload is {n} bytes, over the limit of max_bytes={max_bytes} bytes")
    try:
        out = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=False,
            unicode_errors="surrogatepass",
            ext_hook=_ext_hook,
            list_hook=_list_hook,
            object_hook=_map_hook,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n,
            max_ext_len=n,
        )
    except DecodeError:
        raise
    except msgpack.StackError:
        raise DecodeError("not a safe_codec payload (containers nested too deeply)") from None
    except (msgpack.ExtraData, msgpack.FormatError) as e:
        raise DecodeError(f"not a safe_codec payload ({type(e).__name__}: {e})") from None
    except (ValueError, TypeError, OverflowError, MemoryError, RecursionError) as e:
        raise DecodeError(f"malformed safe_codec payload ({type(e).__name__}: {e})") from None
    if type(out) is not _Envelope:
        raise DecodeError("not a safe_codec payload (no depin envelope); refusing to interpret it")
    return out.value


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_BIGINT:
        if len(data) > 1 << 24 or not _BIGINT_RE.fullmatch(data):
            raise DecodeError("malformed big-integer ext in payload")
        return int(data, 16)
    if code == _EXT_COMPLEX:
        if len(data) != 16:
            raise DecodeError(f"complex ext must be 16 bytes, got {len(data)}")
        real, imag = struct.unpack(">dd", data)
        return complex(real, imag)
    if code == _EXT_ENVELOPE:
        if data != bytes([FORMAT_VERSION]):
            raise DecodeError(f"unsupported safe_codec format version {data[:8]!r} (this side reads {FORMAT_VERSION})")
        return _ENVELOPE_MARK
    marker = _MARKERS.get(code)
    if marker is None:
        raise DecodeError(f"unknown ext type code {code} in payload")
    if data:
        raise DecodeError(f"marker ext {code} must be empty, got {len(data)} bytes")
    return marker


def _list_hook(items: list[Any]) -> Any:
    head = items[0] if items else None
    if type(head) is not _Marker:
        if not _FORBIDDEN.isdisjoint(map(type, items)):
            raise DecodeError("misplaced marker, envelope or msgpack timestamp inside an array")
        return items
    if not _FORBIDDEN.isdisjoint(map(type, itertools.islice(items, 1, None))):
        raise DecodeError("misplaced marker, envelope or msgpack timestamp inside an array")
    code = head.code
    if code == _MARK_TUPLE:
        return tuple(itertools.islice(items, 1, None))
    if code == _MARK_SET:
        return set(itertools.islice(items, 1, None))
    if code == _MARK_FROZENSET:
        return frozenset(itertools.islice(items, 1, None))
    if code == _MARK_BYTEARRAY:
        if len(items) != 2 or type(items[1]) is not bytes:
            raise DecodeError("malformed bytearray in payload")
        return bytearray(items[1])
    if code in (_MARK_NDARRAY, _MARK_CUPY):
        return _decode_array(items, device=code == _MARK_CUPY)
    if code == _MARK_NPSCALAR:
        return _decode_scalar(items)
    if code == _EXT_ENVELOPE:
        if len(items) != 2:
            raise DecodeError("malformed envelope in payload")
        return _Envelope(items[1])
    raise DecodeError(f"unexpected marker {code}")  # pragma: no cover - every marker is handled above


def _map_hook(d: dict[Any, Any]) -> dict[Any, Any]:
    if not (_FORBIDDEN.isdisjoint(map(type, d)) and _FORBIDDEN.isdisjoint(map(type, d.values()))):
        raise DecodeError("misplaced marker, envelope or msgpack timestamp inside a map")
    return d


def _parse_dtype(s: Any) -> np.dtype:
    if type(s) is not str or not _DTYPE_RE.fullmatch(s):
        raise DecodeError(f"dtype {_short_repr(s)} is not an allowed dtype string")
    try:
        dt = np.dtype(s)
    except (TypeError, ValueError) as e:
        raise DecodeError(f"dtype {s!r} is not valid: {e}") from None
    if dt.kind not in _ARRAY_KINDS or dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        raise DecodeError(f"dtype {s!r} (kind {dt.kind!r}) is not allowed")
    return dt


def _decode_array(items: list[Any], *, device: bool) -> Any:
    if len(items) != 5:
        raise DecodeError("malformed array in payload: expected [marker, dtype, shape, fortran, data]")
    _, dtype_s, shape, fortran, data = items
    dt = _parse_dtype(dtype_s)
    if dt.itemsize == 0:
        raise DecodeError(f"array dtype {dtype_s!r} has itemsize 0")
    if type(shape) is not list or len(shape) > _MAX_NDIM or any(type(d) is not int or d < 0 for d in shape):
        raise DecodeError(f"array shape must be a list of at most {_MAX_NDIM} non-negative ints")
    if type(fortran) is not bool or type(data) is not bytes:
        raise DecodeError("malformed array in payload: bad order flag or data")
    expected = math.prod(shape) * dt.itemsize
    if len(data) != expected:
        raise DecodeError(
            f"array data is {len(data)} bytes but shape {tuple(shape)} of dtype {dt.str} needs {expected}"
        )
    if device and dt.kind not in _DEVICE_KINDS:
        raise DecodeError(f"device array of dtype {dt.str} is not allowed")
    order = "F" if fortran else "C"
    arr = np.frombuffer(data, dtype=dt).reshape(tuple(shape), order=order).copy(order=order)  # type: ignore[call-overload]  # owns data
    return _to_device(arr) if device else arr


def _decode_scalar(items: list[Any]) -> np.generic:
    if len(items) != 3 or type(items[2]) is not bytes:
        raise DecodeError("malformed numpy scalar in payload")
    dt = _parse_dtype(items[1])
    data = items[2]
    if len(data) != dt.itemsize:
        raise DecodeError(f"numpy scalar of dtype {dt.str} needs {dt.itemsize} bytes, got {len(data)}")
    if dt.itemsize == 0:  # np.str_("") and np.bytes_(b"")
        return dt.type()
    return np.frombuffer(data, dtype=dt).reshape(())[()]  # type: ignore[return-value]


_cupy_module: Any = None  # False once cupy was found unusable here


def _to_device(arr: np.ndarray) -> Any:
    """A cupy array from `arr` when cupy imports and has a device here; otherwise `arr` itself (numpy)."""
    global _cupy_module
    if _cupy_module is None:
        try:
            import cupy

            _cupy_module = cupy
        except Exception:  # noqa: BLE001 - not installed, or a broken CUDA install: fall back to numpy
            _cupy_module = False
    if _cupy_module is False:
        return arr
    try:
        return _cupy_module.asarray(arr, order="A")
    except Exception:  # noqa: BLE001 - cupy installed but no usable device: numpy instead
        return arr
