"""numpy views across a process boundary (`protocol.views`) and paths into values (`protocol.parts`), without a cluster."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from depin_jupyter.protocol.parts import children, get_path, set_step, valid_path
from depin_jupyter.protocol.views import describe, rebuild


def _as_the_worker_gets_it(local):
    """A copy with the notebook array's values, laid out as Dask delivers it (contiguous)."""
    copy = pickle.loads(pickle.dumps(local))
    return copy if copy.flags.c_contiguous or copy.flags.f_contiguous else np.ascontiguousarray(copy)


CASES = {
    "block": (lambda: np.arange(12).reshape(3, 4), lambda a: a[:2, :2]),
    "reversed, strided": (lambda: np.arange(12).reshape(3, 4), lambda a: a[::-1, ::2]),
    "transpose": (lambda: np.arange(12).reshape(3, 4), lambda a: a.T),
    "reshape": (lambda: np.arange(6.0), lambda a: a.reshape(1, 6)),
    "row": (lambda: np.arange(12).reshape(3, 4), lambda a: a[1]),
    "new axis": (lambda: np.arange(6.0), lambda a: a[None, 1:4]),
    "broadcast (read-only)": (lambda: np.arange(6.0), lambda a: np.broadcast_to(a, (3, 6))),
    "Fortran order": (lambda: np.asfortranarray(np.arange(12).reshape(3, 4)), lambda a: a[1:, 1:]),
    "reinterpreted dtype": (lambda: np.arange(4, dtype=np.int64), lambda a: a.view(np.uint8)[::8]),
    "slice of a strided notebook view": (lambda: np.arange(24.0).reshape(4, 6)[::2, 1:5], lambda a: a[1:, ::-2]),
    "recarray": (lambda: np.rec.array([(1, 2.0), (3, 4.0)], dtype=[("a", "i4"), ("b", "f8")]), lambda a: a[1:]),
    "matrix": (lambda: np.matrix([[1, 2], [3, 4]]), lambda a: a[:, 1]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_view_made_on_the_worker_is_a_view_of_the_notebook_array(name):
    make_local, make_view = CASES[name]
    local = make_local()
    remote = _as_the_worker_gets_it(local)
    rec = describe(make_view(remote), remote, "x", "input")
    assert rec is not None
    view = rebuild(local, rec)
    expected = make_view(local)
    assert type(view) is type(expected) and view.shape == expected.shape
    np.testing.assert_array_equal(view, expected)
    assert np.shares_memory(view, local)
    assert view.flags.writeable == expected.flags.writeable
    if type(local) is np.ndarray:
        assert view.base is expected.base  # the same base numpy's own slicing gives
    if view.flags.writeable and view.dtype.names is None:
        view.flat[0] = 42
        assert expected.flat[0] == 42  # a change through it reaches the notebook's array


def test_a_reshape_numpy_would_copy_is_a_copy():
    local = np.arange(24.0).reshape(4, 6)[::2, :]   # not contiguous: numpy's reshape copies it
    remote = _as_the_worker_gets_it(local)
    rec = describe(remote.reshape(1, 12), remote, "x", "input")
    got = rebuild(local, rec)
    np.testing.assert_array_equal(got, local.reshape(1, 12))
    assert not np.shares_memory(got, local)
    assert not np.shares_memory(local.reshape(1, 12), local)  # ...as numpy does here


def test_what_is_not_a_window_is_not_described():
    x = np.arange(10)
    assert describe(x.copy(), x, "x", "input") is None          # its own memory
    assert describe(x, x, "x", "input") is None                 # the array itself (an alias, not a view)
    assert describe(np.arange(5), x, "x", "input") is None
    other = np.arange(10)
    assert describe(other[:3], x, "x", "input") is None
    assert rebuild(np.arange(11), describe(x[:3], x, "x", "input")) is None  # another shape: not its source


def test_paths_reach_items_attributes_and_pandas_axes():
    pd = pytest.importorskip("pandas")
    index = pd.Index(["a", "b"], name="k")
    df = pd.DataFrame({"v": [1, 2]}, index=index)
    value = {"frame": df, "items": [np.zeros(2), (1, 2)]}
    steps = {tuple(step) for step, _ in children(value)}
    assert steps == {("item", "frame"), ("item", "items")}
    assert get_path(value, [["item", "frame"], ["axis", "index"]]) is index
    assert {tuple(s) for s, _ in children(df)} == {("axis", "index"), ("axis", "columns")}
    new = pd.Index(["a", "b"], name="k")
    assert set_step(df, ["axis", "index"], new) and df.index is new
    assert not set_step((1, 2), ["item", 0], 5)  # a tuple cannot hold another object
    for bad in ([["attr", "__class__"]], [["call", "x"]], "item", [["axis", "values"]]):
        assert not valid_path(bad)
    with pytest.raises(LookupError):
        get_path(value, [["item", "nope"]])
