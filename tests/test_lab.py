"""Virtual labs on a real coordinator: quotas per student (wait / refuse), GPU/CPU-seconds per day, fair
share between students, the educator's view, class rosters and revoked students."""

from __future__ import annotations

import os
import time

import pytest
from click.testing import CliRunner
from conftest import free_port
from volunteer_net import Network, cell_async, wait_for_workers

from depin_jupyter.errors import ClusterConnectionError, DepinUsageError, RemoteExecutionError
from depin_jupyter.kernel import cluster, runner
from depin_jupyter.network.lab import fetch_lab_status, parse_quota
from depin_jupyter.reports import format_lab_status

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_store")]


class _Span:
    """A cell on the volunteer network; ``result()``: its (start, end) wall-clock times on the worker (the
    same machine as the test)."""

    def __init__(self, session, seconds):
        self.future = cell_async(session, f"import time\nstart = time.time()\ntime.sleep({seconds})\nend = time.time()\n")

    def result(self, timeout=None):
        ns, _ = self.future.result(timeout)
        return ns["start"], ns["end"]


def _span(session, seconds):
    return _Span(session, seconds)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    n = Network(tmp_path_factory.mktemp("lab-net"), free_port())
    n.start_scheduler()
    n.start_worker(n.token("worker", "lab-pc-1"))
    n.start_worker(n.token("worker", "lab-pc-2"))
    yield n
    n.close()



def _session(token):
    return cluster._connect_token(token)


def test_parse_quota():
    assert parse_quota("concurrent=1,gpu-seconds=1h") == {"concurrent": 1.0, "gpu-seconds": 3600.0}
    with pytest.raises(DepinUsageError, match="unknown quota 'gpus'"):
        parse_quota("gpus=2")
    with pytest.raises(DepinUsageError, match="at least 1"):
        parse_quota("concurrent=0")


def test_concurrent_quota_waits_while_another_student_is_served(net):
    s1 = _session(net.token("client", "ann", quota="concurrent=1"))
    s2 = _session(net.token("client", "ben", quota="concurrent=1"))
    try:
        wait_for_workers(s1, 2)
        a1 = _span(s1, 1.0)
        time.sleep(0.2)
        a2 = _span(s1, 0.2)  # ann's second: held until her first is done
        b1 = _span(s2, 0.2)  # ben: served on the free worker meanwhile
        (a1s, a1e), (a2s, a2e), (_, b1e) = a1.result(30), a2.result(30), b1.result(30)
        # Never both at once, in either order: under load her first cell's own preparation can take longer
        # than the 0.2 s head start, and then the second reaches the coordinator first.
        assert a2s >= a1e - 0.05 or a1s >= a2e - 0.05, "ann's two cells ran at the same time"
        assert b1e < a1e, "ben was not served while ann's cell was held"
        status = fetch_lab_status(state=net.state)
        assert status["students"]["ann"]["quota"] == {"concurrent": 1.0}
        assert status["students"]["ann"]["used"]["cpu_seconds"] >= 1.0
        table = format_lab_status(status)
        assert "ann" in table and "concurrent=1" in table
    finally:
        s1.close()
        s2.close()


def test_cpu_seconds_quota_names_the_quota_and_the_reset(net):
    s = _session(net.token("client", "cleo", quota="concurrent=2,cpu-seconds=1"))
    try:
        wait_for_workers(s, 2)
        runner.run_cell(s, "import time\ntime.sleep(1.2)\nx = 1", {}, runner.RunOptions(replicas=1))
        deadline = time.monotonic() + 10
        while True:  # usage is counted when the task finishes on the coordinator
            try:
                runner.run_cell(s, "y = 2", {}, runner.RunOptions(replicas=1))
            except RemoteExecutionError as e:
                text = str(e)
                break
            assert time.monotonic() < deadline, "the quota was never enforced"
        assert "cpu-seconds=1" in text and "'cleo'" in text and "resets at 00:00 UTC" in text, text
    finally:
        s.close()


def test_fair_share_one_student_does_not_starve_another(net):
    sa = _session(net.token("client", "busy-alice"))
    sb = _session(net.token("client", "bob-two-cells"))
    try:
        wait_for_workers(sa, 2)
        fa = [_span(sa, 0.3) for i in range(20)]
        time.sleep(0.3)
        fb = [_span(sb, 0.3) for i in range(2)]
        ends_a = sorted(e for _, e in (f.result(60) for f in fa))
        ends_b = [e for _, e in (f.result(60) for f in fb)]
        assert max(ends_b) < ends_a[9], (f"bob's cells ended after alice's 10th: "
                                         f"{[round(e - ends_a[0], 2) for e in ends_b]} vs "
                                         f"{[round(e - ends_a[0], 2) for e in ends_a]}")
    finally:
        sa.close()
        sb.close()


def test_educator_view_only_for_educators(net):
    with pytest.raises(DepinUsageError, match="not an educator"):
        fetch_lab_status(token_text=net.token("client", "nosy-student", quota="concurrent=1"))
    prof = net.token("client", "prof", educator=True)
    status = fetch_lab_status(token_text=prof)
    assert "nosy-student" in status["students"] and status["students"]["prof"]["educator"]
    from depin_jupyter.kernel.magics import format_status

    s = _session(prof)
    try:  # `%depin status` of an educator appends the lab table; a student's does not
        assert "depin lab:" in format_status(s) and "nosy-student" in format_status(s)
    finally:
        s.close()
    s = _session(net.token("client", "plain-student", quota="concurrent=1"))
    try:
        assert "depin lab:" not in format_status(s)
    finally:
        s.close()


def test_revoked_student_is_refused_and_disconnected(net):
    text = net.token("client", "dropped-out", quota="concurrent=1")
    s = _session(text)
    try:
        assert fetch_lab_status(state=net.state)["students"]["dropped-out"]["connected"] == 1
        net.state.revoke("dropped-out")
        deadline = time.monotonic() + 10
        while fetch_lab_status(state=net.state)["students"]["dropped-out"]["connected"]:
            assert time.monotonic() < deadline, "the revoked student stayed connected"
            time.sleep(0.2)
    finally:
        s.close()
    with pytest.raises(ClusterConnectionError, match="revoked"):
        _session(text)


def test_class_roster_issues_one_token_file_per_student(net, tmp_path):
    from depin_jupyter.cli import main

    roster = tmp_path / "roster.csv"
    roster.write_text("name,quota\nkim,concurrent=1;gpu-seconds=600\nlee\n")
    out = tmp_path / "tokens"
    res = CliRunner().invoke(main, ["token", "issue", "--role", "client", "--class", str(roster), "--out-dir",
                                    str(out), "--quota", "concurrent=2", "--state-dir", str(net.state.path)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["kim.token", "lee.token"]
    assert all(os.stat(p).st_mode & 0o077 == 0 for p in out.iterdir())
    entries = {c["name"]: c for c in net.state.registry()["certificates"]}
    assert entries["kim"]["quota"] == {"concurrent": 1.0, "gpu-seconds": 600.0}
    assert entries["lee"]["quota"] == {"concurrent": 2.0}  # the --quota default for rows without one
    res = CliRunner().invoke(main, ["lab", "status", "--state-dir", str(net.state.path)])
    assert res.exit_code == 0 and "kim" in res.output and "gpu-seconds=600" in res.output, res.output


def test_over_quota_refuse(tmp_path):
    n = Network(tmp_path, free_port(), env={"DASK_DEPIN__LAB__OVER_QUOTA": "refuse"})
    n.start_scheduler()
    n.start_worker(n.token("worker", "only-pc"))
    s1 = _session(n.token("client", "dan", quota="concurrent=1"))
    s2 = _session(n.token("client", "eve", quota="concurrent=1"))
    try:
        wait_for_workers(s1, 1)
        d1 = _span(s1, 1.0)
        time.sleep(0.3)
        d2 = _span(s1, 0.1)
        e1 = _span(s2, 0.1)
        with pytest.raises(Exception, match=r"concurrent=1.*refused"):
            d2.result(10)
        assert e1.result(30) and d1.result(30)
    finally:
        s1.close()
        s2.close()
        n.close()
