"""numpy views across a process boundary: describe an array as a window on another, rebuild it there.

A cell's `s = x[:2, :2]` makes `s` a view of `x`; pickling `s` would bring back a copy. Instead the worker
describes `s` by its layout relative to `x` (`describe`), and the notebook rebuilds it on its own `x`
(`rebuild`), so that later changes flow both ways as they would locally. The two `x`s hold the same values but
may be laid out differently (the notebook's may itself be a strided view, the worker's a contiguous copy):
`rebuild` re-expresses the window in the notebook array's own index space, or, when no view of it can hold
that window (a reshape numpy itself would have copied), returns a copy, as numpy would. Pure numpy, no I/O.
"""

from __future__ import annotations

import math
from typing import Any, TypedDict

__all__ = ["InputView", "ViewRecord", "describe", "memory_root", "rebuild", "shares_window", "windows"]

_TYPES = ("ndarray", "recarray", "matrix")


class ViewRecord(TypedDict):
    """An array that is a window on another array ``of`` (an input, or another output of the same cell)."""

    of: str                    # the name of the array it is a view of
    source: str                # "input" or "output"
    path: list[list[Any]]      # where the array sits inside ``of`` ([] : ``of`` itself; see `worker.sharing`)
    offset: int                # bytes from the source's first element to the view's
    shape: list[int]
    strides: list[int]
    source_shape: list[int]
    source_strides: list[int]  # the source's layout where the view was described
    dtype: str | None          # the view's dtype when it differs from the source's (None: the same)
    type: str                  # "ndarray", "recarray" or "matrix"
    writeable: bool


def _np() -> Any:
    import numpy as np

    return np


def _bounds(a: Any) -> tuple[int, int]:
    np = _np()
    fn: Any = getattr(np, "byte_bounds", None)
    if fn is None:  # numpy 2 moved it
        from numpy.lib.array_utils import byte_bounds

        fn = byte_bounds
    lo, hi = fn(a)
    return int(lo), int(hi)


def _address(a: Any) -> int:
    return int(a.__array_interface__["data"][0])


def memory_root(a: Any) -> Any:
    """The object at the end of ``a``'s chain of bases: whatever really holds the memory."""
    np = _np()
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a


def shares_window(view: Any, source: Any) -> bool:
    """True when ``view`` lies inside ``source``'s memory, reached through the same chain of bases."""
    if view is source or view.size == 0 or source.size == 0 or memory_root(view) is not memory_root(source):
        return False
    (lo, hi), (slo, shi) = _bounds(view), _bounds(source)
    return slo <= lo and hi <= shi


def describe(view: Any, source: Any, of: str, source_kind: str, path: list[list[Any]] | None = None) -> ViewRecord | None:
    """``view``'s layout as a window on ``source`` (see `shares_window`), or None when it cannot be one."""
    np = _np()
    kind = next((t for t in _TYPES if type(view) is getattr(np, t)), None)
    if kind is None or not isinstance(source, np.ndarray) or not shares_window(view, source):
        return None
    if view.dtype != source.dtype and (view.dtype.fields is not None or view.dtype.hasobject):
        return None  # a structured field view: its dtype does not travel as a string
    if view.dtype.hasobject or not (source.flags.c_contiguous or source.flags.f_contiguous):
        return None
    return {"of": of, "source": source_kind, "path": list(path or []), "offset": _address(view) - _address(source),
            "shape": list(view.shape), "strides": list(view.strides), "source_shape": list(source.shape),
            "source_strides": list(source.strides),
            "dtype": None if view.dtype == source.dtype else view.dtype.str, "type": kind,
            "writeable": bool(view.flags.writeable)}


def _decompose(nbytes: int, shape: list[int], strides: list[int]) -> list[int] | None:
    """The index step along each axis of a contiguous source that moves ``nbytes``; None if there is none."""
    steps = [0] * len(shape)
    rest = abs(nbytes)
    for axis in sorted(range(len(shape)), key=lambda k: -abs(strides[k])):
        if strides[axis] and shape[axis] > 1:
            steps[axis], rest = divmod(rest, abs(strides[axis]))
    if rest:
        return None
    sign = -1 if nbytes < 0 else 1
    return [sign * s for s in steps]


def _in_index_space(rec: ViewRecord) -> tuple[list[int], list[list[int]]] | None:
    """(start index, index step per view axis) of the view in its source's index space, when the window is a
    plain slicing of the source (no axis merged across rows); None otherwise."""
    shape, strides = rec["source_shape"], rec["source_strides"]
    start = _decompose(rec["offset"], shape, strides)
    steps = [_decompose(t, shape, strides) for t in rec["strides"]]
    if start is None or any(s is None for s in steps):
        return None
    for k, n in enumerate(shape):  # every element of the window must be inside the source along each axis
        hi = start[k] + sum(max(0, s[k] * (m - 1)) for s, m in zip(steps, rec["shape"]) if s is not None)
        lo = start[k] + sum(min(0, s[k] * (m - 1)) for s, m in zip(steps, rec["shape"]) if s is not None)
        if lo < 0 or hi >= n:
            return None
    return start, [s for s in steps if s is not None]


def _window(local: Any, rec: ViewRecord, dtype: Any, offset: int, strides: list[int]) -> Any:
    """The view at ``offset`` bytes from ``local``'s first element, made on the last array of its chain of
    bases, so that its ``base`` is the one numpy's own slicing would give."""
    np = _np()
    host = local
    while isinstance(host.base, np.ndarray):
        host = host.base
    if not host.flags.c_contiguous:
        if not host.flags.f_contiguous:
            return None
        host = host.T  # the same memory, C-ordered: numpy takes a buffer only from a C-contiguous array
    start = offset + _address(local) - _address(host)
    cls = getattr(np, rec["type"]) if rec["type"] in _TYPES else np.ndarray
    out = np.ndarray.__new__(cls, tuple(rec["shape"]), dtype, buffer=host, offset=start, strides=tuple(strides))
    if not rec["writeable"] and out.flags.writeable:
        out.flags.writeable = False
    return out


def rebuild(local: Any, rec: ViewRecord) -> Any:
    """The view ``rec`` describes, on the array ``local`` (the source's values here), or None if ``local`` is
    not such an array. A window no view of ``local`` can hold (an axis merged across its rows) is a copy."""
    np = _np()
    if not isinstance(local, np.ndarray) or list(local.shape) != rec["source_shape"]:
        return None
    dtype = np.dtype(rec["dtype"]) if rec["dtype"] else local.dtype
    try:
        if list(local.strides) == rec["source_strides"]:
            return _window(local, rec, dtype, rec["offset"], rec["strides"])
        mapped = _in_index_space(rec)
        if mapped is not None:
            start, steps = mapped
            offset = sum(i * s for i, s in zip(start, local.strides))
            strides = [sum(d * s for d, s in zip(step, local.strides)) for step in steps]
            return _window(local, rec, dtype, offset, strides)
        order = "C" if rec["source_strides"] == _contiguous(rec["source_shape"], local.dtype.itemsize) else "F"
        laid_out = np.ascontiguousarray(local) if order == "C" else np.asfortranarray(local)
        return _window(laid_out, rec, dtype, rec["offset"], rec["strides"]).copy()
    except (ValueError, TypeError):
        return None


def _contiguous(shape: list[int], itemsize: int) -> list[int]:
    """C-order strides of ``shape``."""
    return [itemsize * math.prod(shape[k + 1:]) for k in range(len(shape))]


class InputView:
    """An input sent as a window on another input of the same cell, because in the notebook it is one:
    the worker rebuilds it on its copy of that input, so a change through either shows in both."""

    __slots__ = ("record",)

    def __init__(self, record: ViewRecord) -> None:
        self.record = record

    def __reduce__(self) -> tuple[Any, ...]:
        return (InputView, (self.record,))


def windows(arrays: dict[str, Any], source_kind: str) -> dict[str, ViewRecord]:
    """Which of ``arrays`` are views of another of them: the largest array holding another's memory carries
    it (so no view is described on a view)."""
    np = _np()
    found: dict[str, ViewRecord] = {}
    carriers: list[tuple[str, Any]] = []
    ordered = sorted(((n, a) for n, a in arrays.items() if isinstance(a, np.ndarray) and a.size),
                     key=lambda kv: -kv[1].nbytes)
    for name, a in ordered:
        rec = None if a.base is None else \
            next((r for n, c in carriers if (r := describe(a, c, n, source_kind)) is not None), None)
        if rec is not None:
            found[name] = rec
        else:
            carriers.append((name, a))
    return found
