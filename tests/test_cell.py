"""Pure cell analysis: inputs, outputs, mutation candidates, last expression."""

from __future__ import annotations

import pytest

from depin_jupyter.cell import analyze


def test_reads_before_binding_are_inputs_and_later_reads_are_not():
    plan = analyze("y = x + 1\nz = y * 2\nx = 5\nw = x")
    assert plan.inputs({"x": 1, "y": 0, "w": 0}) == ["x"]  # y and the later x are bound by the cell
    assert plan.binds == ("y", "z", "x", "w")


@pytest.mark.parametrize(
    "code, bound",
    [
        ("total += 1", {"total"}),
        ("del old", set()),
        ("for i, (a, b) in enumerate(pairs):\n    pass", {"i", "a", "b"}),
        ("with open(p) as fh:\n    data = fh.read()", {"fh", "data"}),
        ("import os.path\nimport numpy as np\nfrom math import pi as PI, tau", {"os", "np", "PI", "tau"}),
        ("def f():\n    pass\nclass C:\n    attr = 1", {"f", "C"}),
        ("if (n := 10) > 5:\n    big = True", {"n", "big"}),
        ("try:\n    r = 1/0\nexcept ZeroDivisionError as err:\n    msg = str(err)", {"r", "err", "msg"}),
        ("def g():\n    global counter\n    counter = 1", {"g", "counter"}),
        ("[k for k in range(3)]\nsq = {v: v * v for v in range(3)}", {"sq"}),
        ("match cmd:\n    case [name, *rest]:\n        pass\n    case {'k': val, **others}:\n        pass",
         {"name", "rest", "val", "others"}),
    ],
)
def test_top_level_bindings(code, bound):
    plan = analyze(code)
    assert set(plan.binds) == bound


def test_del_reads_the_name_and_records_the_delete():
    plan = analyze("del old")
    assert plan.deletes == ("old",)
    assert plan.inputs({"old": 1}) == ["old"]


def test_function_bodies_read_globals_later_and_keep_their_locals():
    plan = analyze("def f(a, *args, k=default, **kw):\n    b = a + scale\n    return b + g(kw)\n")
    assert set(plan.inputs({"default": 1, "scale": 2, "g": 3, "a": 4, "b": 5, "kw": 6})) == {"default", "scale", "g"}
    assert plan.undefined({}) == ["default"]  # only the default is evaluated now


def test_comprehension_variables_do_not_leak_but_free_names_are_read():
    plan = analyze("out = [x * factor for x in data if x > cut]")
    assert set(plan.inputs({"x": 0, "factor": 1, "data": 2, "cut": 3})) == {"factor", "data", "cut"}
    assert plan.binds == ("out",)


def test_class_bodies_run_now_and_methods_later():
    plan = analyze("class C(Base):\n    size = default_size\n    def m(self):\n        return helper(self)\n")
    ns = {"Base": object, "default_size": 1, "helper": 2}
    assert set(plan.inputs(ns)) == set(ns)
    assert set(plan.undefined({})) == {"Base", "default_size"}


def test_undefined_names_exclude_builtins_bound_names_and_guarded_reads():
    plan = analyze("print(len(a))\nb = 1\nprint(b)\ntry:\n    c\nexcept NameError:\n    c = 2")
    assert plan.undefined({}) == ["a"]


def test_dunder_names_are_never_inputs():
    assert analyze("if __name__ == '__main__':\n    x = 1").inputs({"__name__": "__main__"}) == []


@pytest.mark.parametrize(
    "code, mutated",
    [
        ("s = float(x.sum())", set()),
        ("y = x * 2 + x.mean()", set()),
        ("print(len(x), x.shape)", set()),
        ("x[0] = 1", {"x"}),
        ("x.sort()", {"x"}),
        ("x += 1", {"x"}),
        ("y = x\ny[0] = 1", {"x"}),           # an alias may be mutated: x is watched
        ("np.add(x, 1, out=x)", {"x"}),
        ("x.sum(out=buf)", {"buf"}),
        ("v = rng.normal()", {"rng"}),        # drawing advances the generator
    ],
)
def test_maybe_mutated(code, mutated):
    plan = analyze(code)
    assert set(plan.maybe_mutated) & {"x", "buf", "rng"} == mutated  # callees and modules aside


def test_last_expression_shown_unless_semicolon():
    assert analyze("x = 1\nx").last_expr
    assert not analyze("x = 1\nx;").last_expr
    assert not analyze("x = 1").last_expr


def test_syntax_error_keeps_cell_line_numbers():
    with pytest.raises(SyntaxError) as info:
        analyze("a = 1\nb = (\n", filename="<depin cell>")
    assert info.value.lineno in (2, 3)
