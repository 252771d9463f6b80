"""`%%depin --background`: returns at once; outputs bound before the next cell or by `%depin wait`."""

from __future__ import annotations

import time

from conftest import run, run_ok
from IPython.utils.capture import capture_output


def test_background_returns_at_once_and_wait_binds(shell):
    handle = run_ok(shell, "%%depin --background --name slow\nimport time\ntime.sleep(3)\nprint('slept')\nans = 42")
    assert not handle.done()  # returned while the cell still runs (the time it takes: benchmarks/longruns.py)
    assert "slow" in repr(handle) and "ans" not in shell.user_ns
    with capture_output() as cap:
        run_ok(shell, "%depin wait slow")
    assert shell.user_ns["ans"] == 42
    assert "slept" in cap.stdout and "finished" in cap.stdout and "finished" not in cap.stderr


def test_finished_run_is_bound_before_the_next_cell(shell):
    run_ok(shell, "%%depin --background --name quick\nvalue = 7")
    deadline = time.monotonic() + 30
    run_obj = None
    while time.monotonic() < deadline:
        from depin_jupyter.kernel import cluster

        run_obj = cluster.current_session().background["quick"]
        if run_obj.done():
            break
        time.sleep(0.05)
    assert "value" not in shell.user_ns  # nothing is bound while no cell starts
    assert run_ok(shell, "value + 1") == 8  # bound by the pre_run_cell hook, before this cell ran


def test_a_rebound_name_is_kept_and_reported(shell):
    run_ok(shell, "%%depin --background --name rb\nimport time\ntime.sleep(1)\nresult = 'from the run'")
    run_ok(shell, "result = 'mine'")
    with capture_output() as cap:
        run_ok(shell, "%depin wait rb")
    assert shell.user_ns["result"] == "mine"
    assert "kept your current value of result" in cap.stderr
    from depin_jupyter.kernel import cluster

    assert cluster.current_session().background["rb"].outputs["result"] == "from the run"


def test_two_background_runs_run_concurrently_on_two_workers(shell):
    code = ("%%depin --background --name {n}\nimport time\nfrom distributed import get_worker\n"
            "t0_{n} = time.time()\ntime.sleep(1.5)\nt1_{n} = time.time()\nw_{n} = get_worker().address")
    run_ok(shell, code.format(n="a"))
    run_ok(shell, code.format(n="b"))
    run_ok(shell, "%depin wait")
    ns = shell.user_ns
    assert ns["w_a"] != ns["w_b"]
    assert ns["t0_b"] < ns["t1_a"] and ns["t0_a"] < ns["t1_b"]  # the runs overlapped in time


def test_unknown_wait_and_duplicate_names_are_usage_errors(shell):
    from IPython.core.error import UsageError

    res = run(shell, "%depin wait nosuch")
    assert isinstance(res.error_in_exec, UsageError) and "nosuch" in str(res.error_in_exec)
    run_ok(shell, "%%depin --background --name dup\nimport time\ntime.sleep(1)")
    res = run(shell, "%%depin --background --name dup\nx = 1")
    assert isinstance(res.error_in_exec, UsageError) and "dup" in str(res.error_in_exec)
    run_ok(shell, "%depin wait dup")
