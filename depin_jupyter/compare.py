"""Pure: do two sets of outputs agree? Exact for integers, booleans, strings and bytes; `rtol`/`atol` for floats.

One implementation serves `depin reproduce` (and, later, the replication quorum).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Comparison", "compare"]


@dataclass(frozen=True)
class Comparison:
    """The verdict for one value: identical, within tolerance or differs (with the largest errors)."""

    verdict: str                 # "identical" | "within tolerance" | "differs"
    detail: str = ""
    max_abs: float | None = None
    max_rel: float | None = None

    @property
    def ok(self) -> bool:
        return self.verdict in ("identical", "within tolerance")


def _as_array(v: Any) -> np.ndarray | None:
    if hasattr(v, "compute") and hasattr(v, "dask"):
        v = v.compute()
    if type(v).__module__.startswith("cupy"):
        v = v.get()
    if isinstance(v, np.ndarray) or isinstance(v, (np.generic, int, float, complex, bool)) and not isinstance(v, str):
        return np.asarray(v)
    return None


def compare(published: Any, reproduced: Any, rtol: float = 1e-7, atol: float = 0.0) -> Comparison:
    """Compare one published value with its re-execution."""
    a, b = _as_array(published), _as_array(reproduced)
    if a is not None and b is not None:
        return _compare_arrays(a, b, rtol, atol)
    if isinstance(published, dict) and isinstance(reproduced, dict):
        if set(published) != set(reproduced):
            return Comparison("differs", f"keys differ: {sorted(set(published) ^ set(reproduced))}")
        parts = [compare(published[k], reproduced[k], rtol, atol) for k in published]
        return _combine(parts)
    if isinstance(published, (list, tuple)) and isinstance(reproduced, (list, tuple)):
        if len(published) != len(reproduced):
            return Comparison("differs", f"length {len(published)} vs {len(reproduced)}")
        return _combine([compare(x, y, rtol, atol) for x, y in zip(published, reproduced)])
    if published == reproduced:
        return Comparison("identical")
    return Comparison("differs", f"{_short(published)} vs {_short(reproduced)}")


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _combine(parts: list[Comparison]) -> Comparison:
    if all(p.verdict == "identical" for p in parts):
        return Comparison("identical")
    bad = [p for p in parts if not p.ok]
    if bad:
        return bad[0]
    return max(parts, key=lambda p: p.max_abs or 0.0)


_CHUNK = 1 << 22  # elements per step of the tolerant comparison


def _compare_arrays(a: np.ndarray, b: np.ndarray, rtol: float, atol: float) -> Comparison:
    if a.shape != b.shape:
        return Comparison("differs", f"shape {a.shape} vs {b.shape}")
    if a.dtype != b.dtype and not (a.dtype.kind in "fc" and b.dtype.kind in "fc"):
        return Comparison("differs", f"dtype {a.dtype} vs {b.dtype}")
    if a.dtype.kind not in "fc":  # integers, booleans, strings, structured: exact
        if np.array_equal(a, b):
            return Comparison("identical")
        n = int(np.count_nonzero(a != b)) if a.dtype.kind not in "V" else -1
        return Comparison("differs", f"{n} element(s) differ" if n >= 0 else "records differ")
    if np.array_equal(a, b, equal_nan=True):
        return Comparison("identical")
    # Chunk by chunk: the temporaries of one chunk, not several copies of the whole array.
    fa, fb = a.reshape(-1), b.reshape(-1)
    max_abs, max_rel, close, any_finite = 0.0, 0.0, True, False
    for start in range(0, fa.size, _CHUNK):
        x, y = fa[start:start + _CHUNK], fb[start:start + _CHUNK]
        diff = np.abs(x.astype(np.complex128 if x.dtype.kind == "c" else np.float64) - y)
        finite = np.isfinite(diff)
        if finite.any():
            any_finite = True
            max_abs = max(max_abs, float(diff[finite].max()))
        scale = np.abs(y)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(scale > 0, diff / scale, np.where(diff > 0, np.inf, 0.0))
        if rel.size and not np.isnan(rel).all():
            max_rel = max(max_rel, float(np.nanmax(rel)))
        close = close and bool(np.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True))
    if not any_finite:
        max_abs = float("inf")
    verdict = "within tolerance" if close else "differs"
    return Comparison(verdict, f"max abs error {max_abs:.3g}, max rel error {max_rel:.3g}", max_abs, max_rel)
