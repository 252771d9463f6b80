"""Did a cell change an input in place? Cheap before/after fingerprints of the inputs it may mutate."""

from __future__ import annotations

import pickle
import types
from typing import Any

from depin_jupyter.protocol.values import content_hash

__all__ = ["changed", "fingerprint"]


_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), frozenset, range, types.ModuleType,
              types.FunctionType, type)


def fingerprint(obj: Any) -> Any:
    """A cheap before/after marker of an object's content, or None for objects that cannot change."""
    if isinstance(obj, _IMMUTABLE):
        return None
    mod = type(obj).__module__
    if mod.startswith("cupy"):
        return ("device-copy", obj.copy())  # compared on the device; never copied to host
    try:
        if mod.startswith("numpy"):
            return content_hash(obj)
        return pickle.dumps(obj, protocol=5)
    except Exception:  # noqa: BLE001 - any failure is reported, not raised
        return ("unknown", object())  # never equal: treat as changed


def changed(before: Any, after_obj: Any) -> bool:
    if before is None:
        return False
    if isinstance(before, tuple) and before and before[0] == "device-copy":
        import cupy

        old = before[1]
        return old.shape != after_obj.shape or not bool(cupy.array_equal(old, after_obj, equal_nan=True))
    return fingerprint(after_obj) != before
