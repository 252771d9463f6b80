"""Pure comparison of published and reproduced values."""

from __future__ import annotations

import numpy as np

from depin_jupyter.compare import compare


def test_exact_kinds():
    assert compare(3, 3).verdict == "identical"
    assert compare(np.arange(5), np.arange(5)).verdict == "identical"
    r = compare(np.arange(5), np.array([0, 1, 2, 3, 5]))
    assert r.verdict == "differs" and "1 element" in r.detail
    assert compare("a", "b").verdict == "differs"
    assert compare({"k": [1, 2.0]}, {"k": [1, 2.0]}).verdict == "identical"


def test_floats_with_tolerance():
    a = np.linspace(0, 1, 100)
    r = compare(a, a * (1 + 1e-9), rtol=1e-7)
    assert r.verdict == "within tolerance" and r.max_rel is not None and r.max_rel < 1e-8
    r = compare(a, a + 1e-3, rtol=1e-7)
    assert r.verdict == "differs" and "max abs error 0.001" in r.detail
    assert compare(np.array([np.nan, 1.0]), np.array([np.nan, 1.0])).verdict == "identical"
    assert compare(np.ones(3), np.ones(4)).verdict == "differs"
