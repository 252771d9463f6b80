"""Small Python values <-> JSON that round-trips their types; what `value` outputs hold in a manifest.

Plain JSON types are stored as they are; the rest carry a one-key tag (``{"$tuple": [...]}``), so a
manifest stays readable and nothing is ever unpickled. Supported: None, bool, int, float (NaN and
infinities included), complex, str, bytes, numpy scalars (numeric, bool, datetime64, timedelta64),
and lists, tuples, sets and dicts of those. Subclasses (IntEnum, namedtuple...) are not: they would
come back as their base type.
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
    raise ValueError(f"unknown depin value tag {tag!r}")
