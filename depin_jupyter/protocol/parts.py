"""Paths to the objects held inside a value, the same on both sides: list items, dict values, the attributes
of the notebook's own objects, a pandas object's index and columns.

The worker names, by path, which objects a cell's results still share with its inputs (`worker.sharing`);
the notebook puts its own objects at those paths (`kernel.binding`), so that aliases of them see what the
cell changed, as they would locally. A path is a list of ``[kind, key]`` steps (JSON and `safe_codec`
friendly): ``["item", 3]``, ``["item", "k"]``, ``["attr", "weights"]``, ``["axis", "index"]``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["MAX_ITEMS", "children", "get_path", "is_identity_worthy", "set_step", "valid_path"]

MAX_ITEMS = 1000          # children looked at per container (the rest keep value semantics)
_AXES = ("index", "columns")


def _pandas_kind(obj: Any) -> str | None:
    pd = sys.modules.get("pandas")
    if pd is None:
        return None
    if isinstance(obj, pd.DataFrame):
        return "frame"
    if isinstance(obj, pd.Series):
        return "series"
    return "index" if isinstance(obj, pd.Index) else None


def _notebook_instance(obj: Any) -> bool:
    """An instance of a class defined in the notebook: its attributes are the user's own."""
    cls = type(obj)
    return cls.__module__ == "__main__" and hasattr(obj, "__dict__") and not isinstance(obj, type)


def children(obj: Any) -> Iterator[tuple[list[Any], Any]]:
    """The (step, child) pairs of ``obj`` that paths may go through; nothing for other objects."""
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj[:MAX_ITEMS]):
            yield ["item", i], v
    elif isinstance(obj, dict):
        for i, (k, v) in enumerate(obj.items()):
            if i >= MAX_ITEMS:
                break
            if type(k) in (str, int):
                yield ["item", k], v
    elif (kind := _pandas_kind(obj)) in ("series", "frame"):
        yield ["axis", "index"], obj.index
        if kind == "frame":
            yield ["axis", "columns"], obj.columns
    elif _notebook_instance(obj):
        for i, (k, v) in enumerate(list(vars(obj).items())):
            if i >= MAX_ITEMS:
                break
            if isinstance(k, str) and not k.startswith("__"):
                yield ["attr", k], v


def is_identity_worthy(obj: Any) -> bool:
    """Objects whose identity matters to aliases: mutable containers, arrays, the notebook's objects, pandas."""
    if isinstance(obj, (list, dict, set, bytearray)):
        return True
    np = sys.modules.get("numpy")
    if np is not None and isinstance(obj, (np.ndarray, np.random.Generator, np.random.RandomState)):
        return True
    if type(obj).__module__.startswith("cupy") and type(obj).__name__ == "ndarray":
        return True
    return _pandas_kind(obj) is not None or _notebook_instance(obj)


def valid_path(path: Any) -> bool:
    """A path made only of the steps `children` makes (what the notebook accepts from a worker)."""
    if not isinstance(path, (list, tuple)):
        return False
    for step in path:
        if not isinstance(step, (list, tuple)) or len(step) != 2:
            return False
        kind, key = step
        if kind == "item" and type(key) in (str, int):
            continue
        if kind == "attr" and isinstance(key, str) and not key.startswith("__"):
            continue
        if kind == "axis" and key in _AXES:
            continue
        return False
    return True


def get_path(root: Any, path: list[Any]) -> Any:
    """The object at ``path`` inside ``root``; LookupError when there is none."""
    obj = root
    for kind, key in path:
        if kind == "item" and isinstance(obj, (list, tuple, dict)):
            try:
                obj = obj[key]
            except (IndexError, KeyError, TypeError):
                raise LookupError(f"no item {key!r}") from None
        elif kind == "axis" and _pandas_kind(obj) in ("series", "frame") and key in _AXES:
            obj = getattr(obj, key)
        elif kind == "attr" and _notebook_instance(obj) and key in vars(obj):
            obj = vars(obj)[key]
        else:
            raise LookupError(f"no {kind} {key!r} in a {type(obj).__name__}")
    return obj


def set_step(parent: Any, step: list[Any], value: Any) -> bool:
    """Put ``value`` at ``step`` inside ``parent`` (True), or leave it (False: a tuple, or a refusal)."""
    kind, key = step
    try:
        if kind == "item" and isinstance(parent, (list, dict)):
            parent[key] = value
        elif kind == "axis" and _pandas_kind(parent) in ("series", "frame") and key in _AXES:
            setattr(parent, key, value)
            return getattr(parent, key) is value
        elif kind == "attr" and _notebook_instance(parent):
            vars(parent)[key] = value
        else:
            return False
    except (IndexError, KeyError, TypeError, ValueError, AttributeError):
        return False
    return True
