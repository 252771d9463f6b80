"""The credit rule both sides agree on: a volunteer's speed factor from its benchmark, and normalized credit."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["CREDIT_FORMULA", "FACTOR_RANGE", "REFERENCE_SECONDS", "normalized_credit", "speed_factor"]


# Seconds of thread CPU time the fixed workloads took on the reference machines: one core of a 2020s x86
# server for numpy (measured), and roughly a mid-range consumer GPU for cupy (an estimate).
REFERENCE_SECONDS = {"numpy": 0.20, "cupy": 0.10}


FACTOR_RANGE = (0.1, 10.0)


CREDIT_FORMULA = (
    "credit = CPU seconds the cell's thread used (time.thread_time) x speed factor, where speed factor = "
    "reference benchmark time / this volunteer's benchmark time, clipped to 0.1-10; sleeping or waiting "
    "earns nothing. Self-reported by the volunteers' workers; replication checks results, not credit.")


def speed_factor(bench: Any) -> float:
    """reference time / measured time of an advertised benchmark, clipped to FACTOR_RANGE; 1.0 if unusable."""
    try:
        ref = REFERENCE_SECONDS[str(bench["kind"])]
        seconds = float(bench["seconds"])
    except (KeyError, TypeError, ValueError):
        return 1.0
    if not math.isfinite(seconds) or seconds <= 0:
        return FACTOR_RANGE[1]
    return min(max(ref / seconds, FACTOR_RANGE[0]), FACTOR_RANGE[1])


def normalized_credit(cpu_seconds: float, bench: Any) -> float:
    """CPU seconds weighted by the speed factor of the volunteer's advertised benchmark."""
    return max(0.0, float(cpu_seconds)) * speed_factor(bench)
