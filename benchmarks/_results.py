"""Shared by the benchmark scripts: where results go and how they are written."""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Any

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def save(path: str, result: dict[str, Any]) -> None:
    """Print whether the targets were met and write ``result`` as JSON to ``path``."""
    if "met" in result:
        print("targets met:", result["met"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def stats(samples: list[float]) -> dict[str, float]:
    """Median and p90 in milliseconds of timings in seconds, and how many there were."""
    s = sorted(samples)
    # p90 rounds up (nearest rank): with 2-3 samples it was the smallest one, below the median.
    return {"median_ms": statistics.median(s) * 1e3, "p90_ms": s[math.ceil(0.9 * (len(s) - 1))] * 1e3, "n": len(s)}


def timed(fn: Any, reps: int, warmup: bool = True) -> list[float]:
    """Seconds of ``reps`` calls of ``fn``, after one warm-up call unless ``warmup`` is False (interleaved
    one-shot timings, where the caller warmed up once for all)."""
    import time

    if warmup:
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out
