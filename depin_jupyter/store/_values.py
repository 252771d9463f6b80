"""Small Python values <-> JSON that round-trips their types; what `value` outputs hold in a manifest.

Plain JSON types are stored as they are; the rest carry a one-key tag (``{"$tuple": [...]}``), so a
manifest stays readable and nothing is ever unpickled. Supported: None, bool, int, float (NaN and
infinities included), complex, str, bytes, numpy scalars (numeric, bool, datetime64, timedelta64),
and lists, tuples, sets and dicts of those, and numpy random generators (`Generator`, `RandomState` and
their bit generators, by the bit generator's state: plain numbers). Subclasses (IntEnum, namedtuple...)
are not: they would come back as their base type.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np

_SPECIAL = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class UnsupportedValue(TypeError):
    """A value (or an element of it) that has no lossless JSON form here."""

    def __init__(self, obj: object, where: str) -> None:
        super().__init__(f"{where}: {type(obj).__module__}.{type(obj).__qualname__}")
        self.obj = obj
        self.where = where


def encode(obj: Any, where: str = "value") -> Any:
    """The JSON form of ``obj``; raises UnsupportedValue naming the first element it cannot encode."""
    t = type(obj)
    if obj is None or t in (bool, int, str):
        return obj
    if t is float:
        if math.isfinite(obj):
            return obj
        return {"$float": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
    if t is complex:
        return {"$complex": [encode(obj.real), encode(obj.imag)]}
    if t is bytes:
        return {"$bytes": base64.b64encode(obj).decode()}
    if t is list:
        return [encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if t is tuple:
        return {"$tuple": [encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if t in (set, frozenset):
        return {"$" + t.__name__: [encode(v, f"{where}{{...}}") for v in obj]}
    if t is dict:
        if all(type(k) is str for k in obj):
            return {"$dict": {k: encode(v, f"{where}[{k!r}]") for k, v in obj.items()}}
        return {"$items": [[encode(k, f"{where} key"), encode(v, f"{where}[{k!r}]")] for k, v in obj.items()]}
    if t in (np.random.Generator, np.random.RandomState) or t.__name__ in _BIT_GENERATORS and \
            t is getattr(np.random, t.__name__, None):
        return _encode_rng(obj, where)
    if isinstance(obj, np.generic) and obj.dtype.kind in "biufcmM":
        if obj.dtype.kind in "mM":
            return {"$numpy": obj.dtype.str, "value": int(obj.view("i8"))}
        return {"$numpy": obj.dtype.str, "value": encode(obj.item(), where)}
    raise UnsupportedValue(obj, where)


def decode(data: Any) -> Any:
    """The Python value of a JSON form made by `encode`."""
    if isinstance(data, list):
        return [decode(v) for v in data]
    if not isinstance(data, dict):
        return data
    if set(data) == {"$numpy", "value"}:
        dtype = np.dtype(data["$numpy"])
        if dtype.kind in "mM":
            return np.array(data["value"], dtype="i8").view(dtype)[()]
        return dtype.type(decode(data["value"]))
    if len(data) != 1:
        raise ValueError(f"not a depin value encoding: {data!r:.80}")
    ((tag, body),) = data.items()
    if tag == "$float":
        return _SPECIAL[body]
    if tag == "$complex":
        return complex(decode(body[0]), decode(body[1]))
    if tag == "$bytes":
        return base64.b64decode(body)
    if tag == "$tuple":
        return tuple(decode(v) for v in body)
    if tag == "$set":
        return {decode(v) for v in body}
    if tag == "$frozenset":
        return frozenset(decode(v) for v in body)
    if tag == "$dict":
        return {k: decode(v) for k, v in body.items()}
    if tag == "$items":
        return {decode(k): decode(v) for k, v in body}
    if tag == "$rng":
        return _decode_rng(body)
    raise ValueError(f"unknown depin value tag {tag!r}")


_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


def _encode_rng(obj: Any, where: str) -> Any:
    """A numpy random generator as ``{"$rng": {"type", "state"}}``: its bit generator's state, arrays as lists."""
    state: dict[str, Any]
    if isinstance(obj, np.random.RandomState):
        state = dict(obj.get_state(legacy=False))
    else:
        state = dict((obj.bit_generator if isinstance(obj, np.random.Generator) else obj).state)
    if state.get("bit_generator") not in _BIT_GENERATORS:
        raise UnsupportedValue(obj, where)
    return {"$rng": {"type": type(obj).__name__, "state": encode(_plain_state(state), where)}}


def _plain_state(state: Any) -> Any:
    """A bit generator's state with its arrays as tagged lists (``{"$uint": [dtype, [...]]}``)."""
    if isinstance(state, dict):
        return {k: _plain_state(v) for k, v in state.items()}
    if isinstance(state, np.ndarray):
        return {"$array": state.dtype.str, "items": [int(v) for v in state.tolist()]}
    return int(state) if isinstance(state, np.integer) else state


def _array_state(state: Any) -> Any:
    if isinstance(state, dict) and set(state) == {"$array", "items"}:
        return np.array(state["items"], dtype=np.dtype(state["$array"]))
    if isinstance(state, dict):
        return {k: _array_state(v) for k, v in state.items()}
    return state


def _decode_rng(body: dict[str, Any]) -> Any:
    """The generator `_encode_rng` described, in the very state it had."""
    state = _array_state(decode(body["state"]))
    name = state["bit_generator"]
    if name not in _BIT_GENERATORS:
        raise ValueError(f"unknown numpy bit generator {name!r}")
    bit_generator = getattr(np.random, name)()
    kind = body["type"]
    if kind == "RandomState":
        rs = np.random.RandomState(bit_generator)
        rs.set_state(state)
        return rs
    bit_generator.state = state
    if kind == "Generator":
        return np.random.Generator(bit_generator)
    if kind == name:
        return bit_generator
    raise ValueError(f"unknown numpy random generator type {kind!r}")
