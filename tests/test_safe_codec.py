"""safe_codec: exact round trips of plain data and numpy, refusals that name the path, hostile payloads rejected."""

from __future__ import annotations

import collections
import enum
import math
import pickle
import re
import struct
import warnings
from typing import Any

import msgpack
import numpy as np
import pytest

from depin_jupyter.protocol.safe_codec import MAX_DEPTH, DecodeError, UnsafeValueError, decode, encodable, encode

ENVELOPE = msgpack.ExtType(0, b"\x01")


def assert_same(a: Any, b: Any) -> None:
    """Equal in type and value, recursively: float bits (nan, -0.0), dtype with byte order, memory order, dict order."""
    assert type(a) is type(b), f"{type(a)} != {type(b)}"
    if isinstance(a, np.ndarray):
        assert a.dtype.str == b.dtype.str
        assert a.shape == b.shape
        assert a.tobytes(order="A") == b.tobytes(order="A")
        assert (a.flags.c_contiguous, a.flags.f_contiguous) == (b.flags.c_contiguous, b.flags.f_contiguous)
    elif isinstance(a, np.generic):
        assert a.dtype.str == b.dtype.str
        assert a.tobytes() == b.tobytes()
    elif type(a) is float:
        assert struct.pack(">d", a) == struct.pack(">d", b)
    elif type(a) is complex:
        assert struct.pack(">dd", a.real, a.imag) == struct.pack(">dd", b.real, b.imag)
    elif type(a) in (list, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif type(a) is dict:
        assert len(a) == len(b)
        for (ka, va), (kb, vb) in zip(a.items(), b.items()):
            assert_same(ka, kb)
            assert_same(va, vb)
    elif type(a) in (set, frozenset):
        assert a == b
        assert sorted(map(repr, a)) == sorted(map(repr, b))  # repr shows numpy scalar types
    else:
        assert a == b


def roundtrip(obj: Any) -> Any:
    data = encode(obj)
    assert type(data) is bytes
    assert encodable(obj) is None
    return decode(data)


ROUND_TRIPS = {
    "none": None,
    "true": True,
    "false": False,
    "int": 42,
    "negative-int": -7,
    "int64-min": -(2**63),
    "uint64-max": 2**64 - 1,
    "big-int": 2**64,
    "big-negative-int": -(2**63) - 1,
    "huge-int": 3**20000,  # more digits than Python's int<->str limit
    "float": 1.25,
    "nan": float("nan"),
    "inf": float("inf"),
    "-inf": float("-inf"),
    "-0.0": -0.0,
    "complex": complex(1.5, -0.0),
    "complex-nan": complex(float("nan"), float("inf")),
    "str": "héllo ✓",
    "str-surrogate": "bad\udcffname",
    "empty-str": "",
    "bytes": b"\x00\xff raw",
    "bytearray": bytearray(b"\x01\x02"),
    "empty-bytearray": bytearray(),
    "list": [1, "a", None, [2.5]],
    "empty-list": [],
    "tuple": (1, (2, (3,)), []),
    "empty-tuple": (),
    "one-tuple": (None,),
    "list-of-tuples": [(1, 2), (3, 4)],
    "dict": {"b": 1, "a": 2, "c": {"nested": [1, 2]}},
    "dict-any-keys": {3: "int", (1, "t"): "tuple", None: "none", 2.5: "float", b"k": "bytes",
                      frozenset({1}): "frozenset", 2**70: "big", 1j: "complex", np.int32(9): "np-int32"},
    "empty-dict": {},
    "set": {1, "two", (3, 4)},
    "empty-set": set(),
    "frozenset": frozenset({b"x", 1.5}),
    "shared-refs": [[1], [1]] * 2,
    "np-float32": np.float32(1.5),
    "np-float64": np.float64(-0.0),
    "np-float16": np.float16(0.5),
    "np-int8": np.int8(-3),
    "np-uint64": np.uint64(2**64 - 1),
    "np-bool": np.True_,
    "np-complex64": np.complex64(1 - 2j),
    "np-datetime64": np.datetime64("2024-02-29T12:34:56.789", "ms"),
    "np-nat": np.datetime64("NaT", "ns"),
    "np-timedelta64": np.timedelta64(-5, "us"),
    "np-str": np.str_("ü"),
    "np-empty-str": np.str_(""),
    "np-bytes": np.bytes_(b"ab"),
    "array-f8": np.linspace(0, 1, 7),
    "array-2d-int": np.arange(12, dtype=np.int16).reshape(3, 4),
    "array-bool": np.array([True, False, True]),
    "array-uint8": np.arange(256, dtype=np.uint8),
    "array-complex": np.array([1 + 2j, np.nan * 1j], dtype=np.complex128),
    "array-float16": np.array([1.5, -np.inf], dtype=np.float16),
    "array-datetime": np.array(["2020-01-01", "NaT"], dtype="M8[D]"),
    "array-timedelta": np.array([1, -2], dtype="m8[ns]"),
    "array-bytes": np.array([b"ab", b"c"]),
    "array-unicode": np.array(["αβ", "c"]),
    "array-fortran": np.asfortranarray(np.arange(24, dtype=np.float32).reshape(2, 3, 4)),
    "array-big-endian": np.arange(5, dtype=">f8"),
    "array-big-endian-int": np.arange(6, dtype=">i4").reshape(2, 3),
    "array-big-endian-unicode": np.array(["ab", "c"], dtype=">U2"),
    "array-big-endian-complex": np.array([1 + 1j], dtype=">c16"),
    "array-big-endian-datetime": np.array([0, 1], dtype=">M8[s]"),
    "array-0d": np.array(3.5),
    "array-0d-str": np.array("x"),
    "array-0d-nat": np.array(np.datetime64("NaT")),
    "array-empty-0x3": np.zeros((0, 3)),
    "array-empty-3x0-int": np.zeros((3, 0), dtype=np.int64),
    "array-empty-1d": np.array([], dtype="<U3"),
    "arrays-in-containers": {"a": (np.ones(2), [np.zeros((1, 1), dtype=np.int8)]), "s": {np.float32(2.0)}},
}


@pytest.mark.parametrize("value", list(ROUND_TRIPS.values()), ids=list(ROUND_TRIPS))
def test_round_trip_is_exact(value: Any) -> None:
    assert_same(value, roundtrip(value))


def test_dict_order_and_key_types_survive() -> None:
    d = {(2, 1): "x", 1: "y", "z": 0, (1, 2): "w"}
    out = roundtrip(d)
    assert list(out) == [(2, 1), 1, "z", (1, 2)]
    assert [type(k) for k in out] == [tuple, int, str, tuple]


def test_decoded_arrays_are_writeable_owned_and_keep_memory_order() -> None:
    f = np.asfortranarray(np.arange(6, dtype=">i8").reshape(2, 3))
    out = roundtrip(f)
    assert out.flags.writeable and out.flags.owndata
    assert out.flags.f_contiguous and not out.flags.c_contiguous
    assert out.dtype.str == ">i8" and out.dtype.byteorder == ">"
    np.testing.assert_array_equal(out, [[0, 1, 2], [3, 4, 5]])
    out[0, 0] = 99  # writeable for real
    assert out[0, 0] == 99


def test_non_contiguous_view_round_trips_by_value() -> None:
    base = np.arange(20, dtype=np.float64).reshape(4, 5)
    view = base[::2, 1::2]
    out = roundtrip(view)
    assert out.dtype == view.dtype and out.shape == view.shape
    np.testing.assert_array_equal(out, view)
    assert out.flags.c_contiguous and out.flags.owndata


def test_large_array_round_trips_bytes_equal() -> None:
    arr = np.random.default_rng(0).random(1024 * 1024)  # 8 MiB
    out = roundtrip(arr)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    assert out.tobytes() == arr.tobytes()


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = encode({"a": np.arange(3)})
    for buf in (bytearray(data), memoryview(data)):
        out = decode(buf)
        np.testing.assert_array_equal(out["a"], np.arange(3))


def test_decoded_numpy_scalars_keep_their_type() -> None:
    out = roundtrip([np.float32(1.5), np.int64(2), np.datetime64("2021-05-05", "D"), 1.5, 2])
    assert [type(x) for x in out] == [np.float32, np.int64, np.datetime64, float, int]
    assert out[2].dtype.str == "<M8[D]"


# -- refusals -----------------------------------------------------------------------------------------


class _Custom:
    pass


class _Color(enum.IntEnum):
    RED = 1


class _MyFloat(np.float64):
    pass


with warnings.catch_warnings():
    warnings.simplefilter("ignore", PendingDeprecationWarning)  # np.matrix is deprecated: all the more reason
    _MATRIX = np.matrix([[1, 2]])


REFUSED = {
    "object": (object(), "result", "object"),
    "custom-class": ({"x": [0, 1, _Custom()]}, "result['x'][2]", "_Custom"),
    "function": ([len], "result[0]", "builtin_function_or_method"),
    "object-dtype": ({"a": np.array([1, None], dtype=object)}, "result['a']", "dtype object"),
    "structured-dtype": ((np.zeros(2, dtype="i4,f8"),), "result[0]", "structured"),
    "void-dtype": (np.zeros(2, dtype="V4"), "result", "structured/void"),
    "matrix": (_MATRIX, "result", "numpy.matrix"),
    "recarray": (np.rec.array([(1, 2.0)]), "result", "record array"),
    "masked-array": ([np.ma.array([1, 2])], "result[0]", "MaskedArray"),
    "dict-subclass": (collections.OrderedDict(a=1), "result", "OrderedDict"),
    "defaultdict": ({"d": collections.defaultdict(list)}, "result['d']", "defaultdict"),
    "namedtuple": (collections.namedtuple("P", "x y")(1, 2), "result", "P"),
    "int-enum": ([_Color.RED], "result[0]", "_Color"),
    "numpy-scalar-subclass": (_MyFloat(1.0), "result", "_MyFloat"),
    "numpy-void-scalar": (np.zeros(1, dtype="i4,i4")[0], "result", "structured"),
    "bad-dict-key": ({"k": {"ok": 1, _Custom(): 2}}, "result['k']{key #1}", "_Custom"),
    "bad-set-element": ({"s": frozenset({_Custom()})}, "result['s']{element #0}", "_Custom"),
    "deep-path": ({1: ({2: (0, range(3))},)}, "result[1][0][2][1]", "range"),
}


@pytest.mark.parametrize(("value", "path", "type_text"), list(REFUSED.values()), ids=list(REFUSED))
def test_refusal_names_path_type_and_fix(value: Any, path: str, type_text: str) -> None:
    with pytest.raises(UnsafeValueError) as info:
        encode(value)
    message = str(info.value)
    assert message.startswith(path + " ")
    assert info.value.path == path
    assert type_text in message
    assert "numpy arrays" in message and "%depin connect local" in message
    assert isinstance(info.value, TypeError)
    assert encodable(value) == message


def test_refusal_uses_the_given_name() -> None:
    with pytest.raises(UnsafeValueError, match=r"^df\['col'\] is of type"):
        encode({"col": _Custom()}, name="df")


def test_self_referencing_containers_are_refused_not_hung() -> None:
    lst: list[Any] = [1]
    lst.append(lst)
    with pytest.raises(UnsafeValueError, match=r"^result\[1\] is a list that contains itself"):
        encode(lst)
    d: dict[str, Any] = {}
    d["me"] = [d]
    with pytest.raises(UnsafeValueError, match=r"^result\['me'\]\[0\] is a dict that contains itself"):
        encode(d)


def _nested(depth: int) -> list[Any]:
    root: list[Any] = []
    inner = root
    for _ in range(depth - 1):
        inner.append([])
        inner = inner[0]
    return root


def test_nesting_deeper_than_the_limit_is_refused() -> None:
    assert_same(_nested(MAX_DEPTH), roundtrip(_nested(MAX_DEPTH)))
    with pytest.raises(UnsafeValueError, match=f"nested more than {MAX_DEPTH} containers deep"):
        encode(_nested(MAX_DEPTH + 1))
    with pytest.raises(UnsafeValueError):
        encode(_nested(5000))  # no RecursionError


def test_encodable_is_none_for_supported_values() -> None:
    assert encodable({"x": np.arange(3), "y": (1, 2.0, "s")}) is None


# -- hostile payloads ---------------------------------------------------------------------------------


class _CreatesFile:
    """Unpickling this opens (creates) a file: the stand-in for arbitrary code in a hostile result."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_payload_is_rejected_and_never_runs(tmp_path: Any, protocol: int) -> None:
    live = tmp_path / "proof.txt"
    pickle.loads(pickle.dumps(_CreatesFile(str(live)), protocol=protocol)).close()
    assert live.exists()  # the payload really is live under pickle

    target = tmp_path / "pwned.txt"
    payload = pickle.dumps(_CreatesFile(str(target)), protocol=protocol)
    with pytest.raises(DecodeError):
        decode(payload)
    # Carried inside a valid payload, it is plain bytes.
    assert decode(encode({"blob": payload})) == {"blob": payload}
    assert not target.exists()


def _payload(value: Any) -> bytes:
    return msgpack.packb([ENVELOPE, value], use_bin_type=True)


def _array(dtype: Any, shape: Any, data: Any, *, fortran: Any = False, code: int = 7) -> bytes:
    return _payload([msgpack.ExtType(code, b""), dtype, shape, fortran, data])


def test_crafted_payloads_decode_as_intended() -> None:
    # The helpers above build real payloads: hostile variants of them fail for the reason tested.
    out = decode(_array("<f8", [2], struct.pack("<2d", 1.0, 2.0)))
    assert out.dtype.str == "<f8" and out.tolist() == [1.0, 2.0]
    assert decode(_payload([msgpack.ExtType(3, b""), 1, 2])) == (1, 2)


@pytest.mark.parametrize("dtype", ["O", "|O", "<O8", "O8", "V8", "|V8", "f8,i4", "(2,)f8", "<f8[s]", "M8[ns]x",
                                   "i4 ", "S0", "U0", "<f3", "float64", "object", 8, None, ["f8"]])
def test_array_with_forbidden_dtype_is_rejected(dtype: Any) -> None:
    with pytest.raises(DecodeError):
        decode(_array(dtype, [2], b"\x00" * 16))


@pytest.mark.parametrize("dtype", ["O", "|O", "V4"])
def test_numpy_scalar_with_forbidden_dtype_is_rejected(dtype: Any) -> None:
    with pytest.raises(DecodeError):
        decode(_payload([msgpack.ExtType(8, b""), dtype, b"\x00" * 8]))


@pytest.mark.parametrize(
    ("shape", "data", "fortran"),
    [
        ([3], b"\x00" * 16, False),  # too few bytes for the shape
        ([1], b"\x00" * 16, False),  # too many
        ([-2], b"\x00" * 16, False),
        ([2.0], b"\x00" * 16, False),
        ([True, 2], b"\x00" * 16, False),
        ([1] * 65, b"\x00" * 8, False),
        ([2**62, 2**62], b"", False),
        ([2], "not bytes", False),
        ([2], b"\x00" * 16, 1),
    ],
)
def test_array_with_inconsistent_shape_or_data_is_rejected(shape: Any, data: Any, fortran: Any) -> None:
    with pytest.raises(DecodeError):
        decode(_array("<f8", shape, data, fortran=fortran))


def test_length_mismatch_message_is_clear() -> None:
    with pytest.raises(DecodeError, match=r"8 bytes but shape \(3,\) of dtype <f8 needs 24"):
        decode(_array("<f8", [3], b"\x00" * 8))


HOSTILE = {  # name: (payload, what the DecodeError message says)
    "empty": (b"", "incomplete input"),
    "truncated": (encode([1, 2, 3])[:-1], "incomplete input"),
    "trailing-data": (encode(1) + b"\x00", "extra data"),
    "no-envelope": (msgpack.packb([1, 2]), "no depin envelope"),
    "plain-int": (msgpack.packb(5), "no depin envelope"),
    "wrong-version": (msgpack.packb([msgpack.ExtType(0, b"\x02"), 1]), "format version"),
    "nested-envelope": (_payload([ENVELOPE, 1]), "misplaced"),
    "unknown-ext": (_payload(msgpack.ExtType(42, b"x")), "unknown ext type code 42"),
    "unknown-ext-in-dict": (_payload({"k": msgpack.ExtType(100, b"")}), "unknown ext type code 100"),
    "marker-not-first": (_payload([1, msgpack.ExtType(3, b"")]), "misplaced"),
    "marker-alone": (_payload(msgpack.ExtType(4, b"")), "misplaced"),
    "marker-as-map-value": (_payload({"k": msgpack.ExtType(3, b"")}), "misplaced"),
    "marker-as-map-key": (_payload({msgpack.ExtType(3, b""): 1}), "misplaced"),
    "marker-with-payload": (_payload([msgpack.ExtType(3, b"x"), 1]), "must be empty"),
    "msgpack-timestamp": (msgpack.packb([ENVELOPE]).replace(b"\x91", b"\x92", 1) + b"\xd6\xff\x00\x00\x00\x01", "timestamp"),
    "bad-bigint": (_payload(msgpack.ExtType(1, b"12z")), "big-integer"),
    "bigint-decimal-point": (_payload(msgpack.ExtType(1, b"1.5")), "big-integer"),
    "bad-complex": (_payload(msgpack.ExtType(2, b"\x00" * 15)), "16 bytes"),
    "bad-bytearray": (_payload([msgpack.ExtType(6, b""), "text"]), "bytearray"),
    "bad-scalar-size": (_payload([msgpack.ExtType(8, b""), "<f8", b"\x00" * 4]), "needs 8 bytes, got 4"),
    "short-array-list": (_payload([msgpack.ExtType(7, b""), "<f8", [1]]), "malformed array"),
    "unhashable-set-item": (_payload([msgpack.ExtType(4, b""), [1]]), "unhashable"),
    "timestamp-in-map": (_payload({"t": 0}).replace(b"t\x00", b"t\xd6\xff\x00\x00\x00\x01"), "timestamp"),
    "unhashable-key": (_payload({(): 1}).replace(b"\x90", b"\x91\x01", 1), "unhashable"),
    "deep-nesting": (b"\x92" + msgpack.packb(ENVELOPE) + b"\x91" * 5000 + b"\xc0", "nested too deeply"),
    "device-array-of-str": (_array("<U1", [1], b"a\x00\x00\x00", code=9), "device array"),
    "not-bytes": ("a string", "expected bytes"),
}


@pytest.mark.parametrize(("payload", "says"), list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_payload_raises_decode_error(payload: Any, says: str) -> None:
    with pytest.raises(DecodeError, match=re.escape(says)):
        decode(payload)


def test_unknown_ext_message_names_the_code() -> None:
    with pytest.raises(DecodeError, match="unknown ext type code 42"):
        decode(HOSTILE["unknown-ext"][0])


def test_size_cap() -> None:
    data = encode(np.zeros(1000))
    assert decode(data, max_bytes=len(data)).shape == (1000,)
    with pytest.raises(DecodeError, match=f"{len(data)} bytes, over the limit of max_bytes={len(data) - 1}"):
        decode(data, max_bytes=len(data) - 1)


def test_device_array_decodes_to_numpy_without_cupy() -> None:
    try:
        import cupy  # noqa: F401
    except Exception:
        cupy_importable = False
    else:
        cupy_importable = True
    if cupy_importable:
        pytest.skip("cupy is importable here")
    out = decode(_array("<f4", [2], struct.pack("<2f", 1.0, 2.0), code=9))
    assert type(out) is np.ndarray and out.dtype.str == "<f4" and out.tolist() == [1.0, 2.0]


def test_cupy_array_round_trips_to_device() -> None:
    cp = pytest.importorskip("cupy")
    try:
        arr = cp.asfortranarray(cp.arange(6, dtype=cp.float32).reshape(2, 3))
    except Exception as e:
        pytest.skip(f"no usable CUDA device: {e}")
    out = roundtrip(arr)
    assert type(out) is cp.ndarray and out.dtype == arr.dtype and out.flags.f_contiguous
    assert bool((out == arr).all())


def test_floats_compare_by_bits() -> None:
    # assert_same must be able to fail: -0.0 vs 0.0, float32 vs float64, byte order, memory order.
    with pytest.raises(AssertionError):
        assert_same(-0.0, 0.0)
    with pytest.raises(AssertionError):
        assert_same(np.float32(1), np.float64(1))
    with pytest.raises(AssertionError):
        assert_same(np.arange(2, dtype=">f8"), np.arange(2, dtype="<f8"))
    with pytest.raises(AssertionError):
        assert_same(np.zeros((2, 2), order="F"), np.zeros((2, 2)))
    assert math.isnan(roundtrip(float("nan")))
