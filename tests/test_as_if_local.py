"""Small notebooks run twice, plainly and with `%%depin` on every cell: the same namespace, stdout and values.

Each pattern here made a teaching notebook differ under `%%depin` (issue #21): views made in a cell, a
helper class whose repr evaluates the notebook's names, a change through a pandas Index that another name
holds, a seeded Generator drawn from in a cell. Real cluster (the session's LocalCluster), real IPython shell.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run, run_ok
from IPython.utils.capture import capture_output


def _twice(shell, cells: list[str], names: list[str]) -> tuple[dict, dict, str, str]:
    """Run ``cells`` plainly, then with %%depin on each (``!`` marks a cell that stays local, as a
    notebook's own edits would); return both namespaces (copies of ``names``) and both stdouts."""
    results = []
    for remote in (False, True):
        for n in names:
            shell.user_ns.pop(n, None)
        with capture_output() as cap:
            for cell in cells:
                local = cell.startswith("!")
                code = cell.lstrip("!")
                run_ok(shell, code if local or not remote else "%%depin --no-store\n" + code)
        results.append(({n: _copy(shell.user_ns[n]) for n in names}, cap.stdout))
    (plain, plain_out), (depin, depin_out) = results
    return plain, depin, plain_out, depin_out


def _copy(v):
    return v.copy() if hasattr(v, "copy") else v


def _same(plain: dict, depin: dict) -> None:
    for name, value in plain.items():
        assert type(depin[name]) is type(value), name
        np.testing.assert_equal(np.asarray(depin[name]), np.asarray(value), err_msg=name)


# ---------------------------------------------------------------- 1. views made in a cell


def test_a_view_made_in_a_cell_is_a_view_of_the_notebook_array(shell):
    cells = ["!import numpy as np\nx2 = np.random.default_rng(0).integers(10, size=(3, 4))",
             "x2_sub = x2[:2, :2]\nprint(x2_sub)",
             "!x2_sub[0, 0] = 99\nprint(x2)",       # locally: x2 changes too
             "x2_sub[1, 1] = 42\nprint(x2)",        # in a %%depin cell: the same
             "!A = np.arange(6)",
             "B = A.reshape(1, 6)\ncol = A[::2]",
             "!B[0, 5] = -1\ncol[0] = -2\nprint(A)"]
    plain, depin, plain_out, depin_out = _twice(shell, cells, ["x2", "x2_sub", "A", "B", "col"])
    assert depin_out == plain_out
    _same(plain, depin)
    ns = shell.user_ns
    owner = ns["x2"] if ns["x2"].base is None else ns["x2"].base
    assert np.shares_memory(ns["x2_sub"], ns["x2"]) and ns["x2_sub"].base is owner  # as numpy's own slicing
    assert ns["B"].base is ns["A"] and np.shares_memory(ns["col"], ns["A"])


def test_outputs_that_are_views_of_each_other_stay_so(shell):
    cells = ["import numpy as np\ngrid = np.zeros((3, 3))\nrow = grid[1]\ndiag = grid.reshape(-1)[::4]",
             "!row[:] = 7\ndiag[0] = 1\nprint(grid)"]
    plain, depin, plain_out, depin_out = _twice(shell, cells, ["grid", "row", "diag"])
    assert depin_out == plain_out
    _same(plain, depin)


def test_a_cell_that_changes_a_view_of_an_input_changes_the_input(shell):
    run_ok(shell, "import numpy as np\nbig = np.arange(10.0)\nwindow = big[2:5]")
    run_ok(shell, "%%depin --no-store\nwindow *= 10")
    assert shell.user_ns["big"][2:5].tolist() == [20.0, 30.0, 40.0]
    run_ok(shell, "%%depin --no-store\nhalf = big[:5]\nhalf[0] = -1")  # written through the view in the cell
    assert shell.user_ns["big"][0] == -1 and np.shares_memory(shell.user_ns["half"], shell.user_ns["big"])


# ---------------------------------------------------------------- 3. a repr that evaluates the notebook's names

HELPER = '''class display(object):
    """Display HTML representation of multiple objects"""
    template = """<div style="float: left; padding: 10px;">
    <p style='font-family:"Courier New", Courier, monospace'>{0}</p>{1}
    </div>"""
    def __init__(self, *args):
        self.args = args

    def _repr_html_(self):
        return '\\n'.join(self.template.format(a, eval(a)._repr_html_()) for a in self.args)

    def __repr__(self):
        return '\\n\\n'.join(a + '\\n' + repr(eval(a)) for a in self.args)
'''


@pytest.mark.parametrize("defined", ["in the notebook", "in a %%depin cell"])
def test_a_helper_whose_repr_evaluates_names_shows_them(shell, defined):
    pd = pytest.importorskip("pandas")
    shell.user_ns.update(df1=pd.DataFrame({"A": [1, 2]}), df2=pd.DataFrame({"B": [30]}))
    run_ok(shell, HELPER if defined == "in the notebook" else "%%depin --no-store\n" + HELPER)
    with capture_output() as plain:
        run_ok(shell, "display('df1', 'df2')")
    with capture_output() as remote:
        value = run_ok(shell, "%%depin --no-store\ndisplay('df1', 'df2')")
    assert type(value) is shell.user_ns["display"]
    assert "df1" in remote.stdout and "30" in remote.stdout, remote.stdout + remote.stderr
    assert remote.stdout == plain.stdout and "Error" not in remote.stderr
    html = value._repr_html_()  # what Jupyter shows: it evaluates the names too
    assert "Courier" in html and "<table" in html


def test_a_formatter_that_fails_on_the_worker_says_so(shell):
    cell = ("%%depin --no-store\nimport threading\nclass Card:\n    def _repr_html_(self):\n"
            "        return eval('missing_html')\n    def __repr__(self):\n        return 'card'\n"
            "display(Card())\nclass Locked:\n    def __init__(self):\n        self.lock = threading.Lock()\n"
            "    def __repr__(self):\n        return eval('missing_repr')\nLocked()")
    with capture_output() as cap:
        res = run(shell, cell)
    assert res.success, res.error_in_exec
    # display(): the HTML formatter's traceback, then the plain text it could still make
    assert "NameError: name 'missing_html' is not defined" in cap.stderr
    assert [o.data.get("text/plain") for o in cap.outputs] == ["card"]
    # the value could not travel (a lock) and its repr failed there: the traceback, and no empty Out
    assert "NameError: name 'missing_repr' is not defined" in cap.stderr
    assert "remote value" not in cap.stdout and "Failed to serialize" not in cap.stderr


# ---------------------------------------------------------------- 4. a change through a shared sub-object


def test_index_names_set_through_a_series_reach_the_index_it_shares(shell):
    pytest.importorskip("pandas")
    cells = ["!import pandas as pd\nindex = pd.MultiIndex.from_tuples([('California', 2000), ('California', 2010),"
             " ('New York', 2000)])\npop = pd.Series([33871648, 37253956, 18976457]).set_axis(index)",
             "pop.index.names = ['state', 'year']",
             "!print(index.names, pop.index is index)"]
    plain, depin, plain_out, depin_out = _twice(shell, cells, ["pop"])
    assert depin_out == plain_out and "['state', 'year'] True" in depin_out
    assert list(depin["pop"].index.names) == ["state", "year"]


def test_sub_objects_keep_their_identity(shell):
    cells = ["!import numpy as np\na1 = np.zeros(2)\na2 = np.ones(2)\nL = [a1, a2]\n"
             "class Model:\n    def __init__(self):\n        self.w = np.zeros(3)\nm = Model()\nw = m.w",
             "L.reverse()\nL[0][0] = 5\nfirst = L[1]\npair = [a1, 3]\nm.w += 1",
             "!first[1] = -1\nprint(a1, a2, L[0] is a2, pair[0] is a1, w, m.w is w)"]
    plain, depin, plain_out, depin_out = _twice(shell, cells, ["a1", "a2", "w"])
    assert depin_out == plain_out and "True True" in depin_out
    _same(plain, depin)


# ---------------------------------------------------------------- the same namespace and stdout, all together


def test_a_small_numpy_notebook_matches_a_plain_run(shell):
    cells = ["!import numpy as np",
             "rng = np.random.default_rng(42)\nx = rng.integers(0, 10, size=(4, 5))\nprint(x.sum())",
             "row = x[0]\nrow[:] = 0\nprint(x[:2])",
             "flat = x.reshape(-1)\nflat[-1] = 100\ntotal = int(x.sum())",
             "noise = rng.normal(size=3)\nprint(np.round(noise, 6))",
             "!x[1, 1] = -7\nprint(row, flat[6])"]
    plain, depin, plain_out, depin_out = _twice(shell, cells, ["x", "row", "flat", "total", "noise"])
    assert depin_out == plain_out
    _same(plain, depin)
