"""The volunteer stays in control: `depin pause`/`resume`, --hours, --when-idle, GPU choices, fair credit.

Real `depin scheduler` / `depin worker` processes on 127.0.0.1 (tests/volunteer_net.py), plus pure unit tests.
"""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest
from conftest import free_port
from controls_net import cli, wait_status, worker_info
from volunteer_net import LONG_CELL, Network, cell_async, running_on, wait_for_text, wait_for_workers

from depin_jupyter.errors import DepinUsageError
from depin_jupyter.kernel import cluster, runner
from depin_jupyter.protocol import credit
from depin_jupyter.worker import controls

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_store")]


# ------------------------------------------------------------------ pure functions

def test_hours_parsing_and_windows_across_midnight():
    night = controls.parse_hours("22:00-07:00")
    assert night == [(22 * 60, 7 * 60)]
    assert controls.in_hours(night, 23 * 60 + 30) and controls.in_hours(night, 0)
    assert controls.in_hours(night, 6 * 60 + 59) and controls.in_hours(night, 22 * 60)
    assert not controls.in_hours(night, 7 * 60) and not controls.in_hours(night, 12 * 60)
    day = controls.parse_hours("9:00-12:00, 14:00-18:00")
    assert controls.in_hours(day, 10 * 60) and controls.in_hours(day, 15 * 60)
    assert not controls.in_hours(day, 13 * 60) and not controls.in_hours(day, 8 * 60)
    assert controls.in_hours(controls.parse_hours("00:00-24:00"), 23 * 60 + 59)
    for bad in ("22-07", "25:00-07:00", "10:00-10:00", "", "10:00", "10:61-11:00"):
        with pytest.raises(DepinUsageError, match="--hours"):
            controls.parse_hours(bad)
    noon = time.mktime(time.strptime("2024-03-05 12:00", "%Y-%m-%d %H:%M"))
    assert controls.hours_reason(night, "22:00-07:00", noon) == "outside hours 22:00-07:00"
    assert controls.hours_reason(day, "x", noon + 3 * 3600) is None


def test_duration_parsing():
    assert controls.parse_duration("30m") == 1800
    assert controls.parse_duration("2h") == 7200
    assert controls.parse_duration("1h30m") == 5400
    assert controls.parse_duration("90s") == 90
    assert controls.parse_duration("1.5h") == 5400
    assert controls.parse_duration("2 hours") == 7200
    for bad in ("30", "soon", "", "0m", "-5m"):
        with pytest.raises(DepinUsageError, match="not a duration"):
            controls.parse_duration(bad)


def test_exclude_gpus_computes_cuda_visible_devices():
    f = controls.cuda_visible_devices
    assert f(None, 4, None, ["1", "2"]) == ["0", "3"]
    assert f("", 3, [], []) == ["0", "1", "2"]
    assert f("0,2,3", 3, None, ["2"]) == ["0", "3"]           # indices name CUDA_VISIBLE_DEVICES entries
    assert f(None, 4, ["0", "1", "3"], ["1"]) == ["0", "3"]   # --gpus narrows, --exclude-gpus removes
    with pytest.raises(DepinUsageError, match="leaves no GPU"):
        f(None, 2, None, ["0", "1"])
    with pytest.raises(DepinUsageError, match="not visible"):
        f("0,1", 2, ["5"], [])
    assert controls.parse_gpu_indices("1, 2") == ["1", "2"] and controls.parse_gpu_indices([3]) == ["3"]
    assert controls.parse_gpu_indices(None) == []
    with pytest.raises(DepinUsageError, match="--exclude-gpus"):
        controls.parse_gpu_indices("a,b")


def test_control_file_and_reasons(tmp_path):
    d = tmp_path / "ctl"
    c = controls.Controls(directory=d)
    assert c.reasons() == []
    controls.write_control(True, None, d)
    assert oct(d.stat().st_mode & 0o777) == "0o700"
    assert oct((d / controls.CONTROL_FILE).stat().st_mode & 0o777) == "0o600"
    assert c.reasons() == ["paused by the volunteer (depin pause)"]
    controls.write_control(True, time.time() + 60, d)
    assert "until" in c.reasons()[0]
    assert controls.control_reason(controls.read_control(d), time.time() + 61) is None  # --for ran out
    controls.write_control(False, None, d)
    signal_file = tmp_path / "idle"
    c.idle = controls.IdleSignal(str(signal_file), 300, 10, [])
    assert c.reasons() == ["the machine is busy (idle signal: missing)"]
    signal_file.write_text("idle\n")
    assert c.reasons() == []
    c.windows, c.hours = controls.parse_hours("00:00-00:01"), "00:00-00:01"
    noon = time.mktime(time.strptime("2024-03-05 12:00", "%Y-%m-%d %H:%M"))
    assert c.reasons(now=noon) == ["outside hours 00:00-00:01"]


def test_speed_factor_normalizes_and_is_clipped():
    ref = credit.REFERENCE_SECONDS["numpy"]
    assert credit.speed_factor({"kind": "numpy", "seconds": ref}) == pytest.approx(1.0)
    assert credit.speed_factor({"kind": "numpy", "seconds": ref / 2}) == pytest.approx(2.0)  # twice as fast
    assert credit.speed_factor({"kind": "numpy", "seconds": 1e-9}) == credit.FACTOR_RANGE[1]
    assert credit.speed_factor({"kind": "numpy", "seconds": 1e9}) == credit.FACTOR_RANGE[0]
    assert credit.speed_factor(None) == 1.0
    assert credit.normalized_credit(3.0, {"kind": "numpy", "seconds": ref * 2}) == pytest.approx(1.5)
    b = controls.benchmark()
    assert b["kind"] == "numpy" and b["seconds"] > 0


# ------------------------------------------------------------------ real processes


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    # allowed-failures 0: a task lost with a worker fails at once, so "none fails" means graceful.
    n = Network(tmp_path_factory.mktemp("controls-net"), free_port(),
                env={"DASK_DEPIN__COORDINATOR__ALLOWED_FAILURES": "0", "OMP_NUM_THREADS": "1",
                     "OPENBLAS_NUM_THREADS": "1", "DASK_DEPIN__VOLUNTEER__POLL_INTERVAL": "200ms"})
    n.start_scheduler()
    yield n
    n.close()



def _ctl(net, name):
    d = net.root / f"ctl-{name}"
    return d, {"DASK_DEPIN__VOLUNTEER__CONTROL_DIR": str(d)}


def _stop(proc):
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def _named(s, done):
    """(worker name, start, stop, i) of a finished `cell_async` of LONG_CELL."""
    ns, outcome = done
    names = {w.address: w.name for w in s.workers(max_age=0)}
    return names.get(outcome.worker, outcome.worker), ns["start"], ns["stop"], ns["i"]


def test_pause_hands_work_back_and_resume_takes_work_again(net):
    ctl_a, env_a = _ctl(net, "a")
    _, env_b = _ctl(net, "b")
    pa, log_a = net.start_worker(net.token("worker", "pa"), env=env_a)
    pb, _ = net.start_worker(net.token("worker", "pb"), env=env_b)
    s = cluster._connect_token(net.token("client", "sci-pause"))
    try:
        wait_for_workers(s, 2)
        addr_a = worker_info(s, "pa")[0]
        futures = [cell_async(s, LONG_CELL, {"i": i}) for i in range(10)]
        deadline = time.monotonic() + 30
        while len(running_on(s).get(addr_a, ())) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(running_on(s)[addr_a]) >= 2, "the worker never got a running and a queued task"

        res = cli("pause", control_dir=ctl_a)
        assert res.exit_code == 0, res.output
        assert "paused 1 of 1 worker(s) (pa)" in res.output and "until `depin resume`" in res.output
        wait_status(s, "pa", "paused")
        # The pause takes effect at the worker's next poll of its control, some time after `depin pause`
        # wrote it (later on a loaded machine): a task may still start in between. The coordinator seeing
        # "paused" is when it had surely taken effect.
        paused_at = max(json.loads(next(ctl_a.glob("worker-*.json")).read_text())["time"], time.time())
        assert "paused: paused by the volunteer (depin pause)" in wait_for_text(log_a, "paused: paused by", pa)

        # Its queued task is handed back and its running one finishes: it holds nothing while paused.
        deadline = time.monotonic() + 20
        while running_on(s).get(addr_a) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running_on(s).get(addr_a), "the paused worker kept tasks"
        time.sleep(2.0)  # longer than a task: an unpaused worker would have started another one here
        assert worker_info(s, "pa")[1]["status"] == "paused"
        resumed_at = time.time()
        res = cli("resume", control_dir=ctl_a)
        assert res.exit_code == 0 and "1 of 1 worker(s) take work again" in res.output, res.output
        wait_status(s, "pa", "running")

        results = [_named(s, f.result(timeout=60)) for f in futures]  # none failed (allowed-failures is 0)
        assert sorted(r[3] for r in results) == list(range(10))
        on_a = [r for r in results if r[0] == "pa"]
        # One task thread: only the task it was running when the pause took effect may overlap the pause (its
        # start is taken inside the cell's sandboxed process, which on a loaded machine can start seconds after
        # Dask started the task, so a start time alone cannot tell it from a task started while paused). A
        # worker that kept taking work runs two or more 1.5 s tasks in the 2 s or more between.
        during = [r for r in on_a if r[1] < resumed_at and r[2] > paused_at]
        assert len(during) <= 1, f"tasks ran on the paused worker: {during}"
        assert any(r[1] >= resumed_at for r in on_a) or any(r[0] == "pb" for r in results), results
        after = _named(s, cell_async(s, LONG_CELL, {"i": 99}, worker=addr_a).result(timeout=30))
        assert after[0] == "pa" and after[1] >= resumed_at  # it takes work again

        # --for resumes by itself
        res = cli("pause", "--for", "1.5s", control_dir=ctl_a)
        assert res.exit_code == 0 and "paused 1 of 1" in res.output, res.output
        wait_status(s, "pa", "paused")
        wait_status(s, "pa", "running", timeout=20)
    finally:
        s.close()
        _stop(pa)
        _stop(pb)


def _window_excluding_now() -> str:
    lt = time.localtime(time.time() + 2 * 3600)
    start = lt.tm_hour * 60 + lt.tm_min
    end = (start + 60) % 1440
    return f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"


def test_outside_hours_the_worker_takes_no_work(net):
    window = _window_excluding_now()
    ctl, env = _ctl(net, "night")
    proc, log = net.start_worker(net.token("worker", "night"), "--hours", window, env=env)
    s = cluster._connect_token(net.token("client", "sci-hours"))
    try:
        wait_for_workers(s, 1)
        addr = worker_info(s, "night")[0]
        wait_status(s, "night", "paused")
        assert f"paused: outside hours {window}" in wait_for_text(log, "outside hours", proc)
        f = cell_async(s, LONG_CELL, {"i": 1}, worker=addr)
        time.sleep(2.0)
        assert not f.done() and not running_on(s).get(addr)
        from depin_jupyter.kernel.jobs import cancel_jobs, list_jobs

        assert cancel_jobs(s.client, list_jobs(s.client, True), True)
        res = cli("resume", control_dir=ctl)  # the volunteer's resume does not override the hours
        assert "stays paused: outside hours" in res.output, res.output
    finally:
        s.close()
        _stop(proc)


def test_when_idle_follows_the_idle_signal(net):
    signal_file = net.root / "idle-signal"
    signal_file.write_text("busy")
    _, env = _ctl(net, "idler")
    proc, log = net.start_worker(net.token("worker", "idler"), "--when-idle",
                                 env={**env, "DASK_DEPIN__VOLUNTEER__IDLE_SIGNAL_FILE": str(signal_file)})
    s = cluster._connect_token(net.token("client", "sci-idle"))
    try:
        wait_for_workers(s, 1)
        addr = worker_info(s, "idler")[0]
        wait_status(s, "idler", "paused")
        assert "paused: the machine is busy (idle signal: busy)" in wait_for_text(log, "machine is busy", proc)
        signal_file.write_text("idle")
        wait_status(s, "idler", "running")
        assert _named(s, cell_async(s, LONG_CELL, {"i": 2}, worker=addr).result(timeout=30))[0] == "idler"
        signal_file.write_text("busy")
        wait_status(s, "idler", "paused")
    finally:
        s.close()
        _stop(proc)


WORK = """
acc = 0.0
for _ in range(25):
    acc += float(np.sort(np.random.default_rng(1).standard_normal(200_000)).sum())
"""


def _one_replica() -> dict:
    """Run each cell once, on the named volunteer (replication, where present, would add a second)."""
    import dataclasses

    return {"replicas": 1} if "replicas" in {f.name for f in dataclasses.fields(runner.RunOptions)} else {}


def test_sleeping_volunteer_earns_no_more_normalized_credit(net):
    from controls_net import __file__ as preload

    honest, _ = net.start_worker(net.token("worker", "honest"))
    sleeper, _ = net.start_worker(net.token("worker", "sleeper"), env={
        "DEPIN_TEST_SLEEP": "2.0", "DASK_DISTRIBUTED__WORKER__PRELOAD": json.dumps([preload])})
    s = cluster._connect_token(net.token("client", "sci-credit"))
    try:
        wait_for_workers(s, 2)
        # interleaved, so a slow spell of a shared CI machine falls on both volunteers alike
        for _ in range(3):
            for name in ("honest", "sleeper"):
                ns = {"np": np}
                runner.run_cell(s, WORK, ns, runner.RunOptions(worker=name, **_one_replica()))
                assert isinstance(ns["acc"], float)
    finally:
        s.close()
        _stop(honest)
        _stop(sleeper)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        c = net.state.credits()
        if all(c.get(n, {}).get("tasks", 0) >= 3 and "credit" in c.get(n, {}) for n in ("honest", "sleeper")):
            break
        time.sleep(0.2)
    h, z = net.state.credits()["honest"], net.state.credits()["sleeper"]
    # raw wall-clock seconds do differ: the sleeper's include 3 x 2 s of sleep (several times the work)
    assert z["cpu_seconds"] >= h["cpu_seconds"] + 5.5, (h, z)
    assert h["credit"] > 0 and z["credit"] > 0
    # normalized credit does not: the same work earns about the same. The margin covers CPU-time noise of
    # a shared 2-core CI machine (a child's CPU time includes its interpreter start, seen to vary by 50%);
    # sleeping would have multiplied the credit by the raw-seconds ratio, far above it.
    assert z["credit"] <= h["credit"] * 1.6, (h, z)
    assert z["cpu_seconds"] / h["cpu_seconds"] > 2.5, (h, z)
    assert z["cpu_used_seconds"] < z["cpu_seconds"] / 2
    res = cli("credits", "--state-dir", str(net.state.path))
    assert res.exit_code == 0 and "CREDIT" in res.output and "Self-reported" in res.output, res.output
