"""The volunteer-side sandbox: a cell runs in a child process, confined and limited, and every limit that
stops it comes back as the cell's error while the worker carries on.

Called in-process (no Dask cluster): `run_sandboxed` returns the pickle-free payload, decoded here with
`payloads.from_payload` exactly as the notebook does. Protections the machine cannot provide (no working
bwrap, not root so no switch to an unprivileged user) are skipped with the reason.
"""

from __future__ import annotations

import os
import pathlib
import socket
import threading
import time
import uuid

import dask
import numpy as np
import pytest

from depin_jupyter.protocol import payloads
from depin_jupyter.worker import cancel, sandbox
from depin_jupyter.worker.runs import active
from depin_jupyter.worker.sandbox import isolation, warm

BWRAP_OK, BWRAP_WHY = isolation.bwrap_works(False, "nobody")
ROOT = os.geteuid() == 0
MODES = [
    pytest.param(True, id="bwrap",
                 marks=pytest.mark.skipif(not BWRAP_OK, reason=f"bubblewrap unavailable: {BWRAP_WHY}")),
    pytest.param(False, id="uid-drop",
                 marks=pytest.mark.skipif(not ROOT, reason="switching to an unprivileged user needs a root worker")),
]


def make_spec(code: str, **kw) -> dict:
    """A spec with the keys `runner.make_spec` gives `worker.execute.run_cell`."""
    spec = {"run_id": uuid.uuid4().hex, "name": "test", "code": code, "filename": f"<depin-cell-{uuid.uuid4().hex[:8]}>",
            "modules": {}, "maybe_mutated": [], "outputs": None, "last_expr": False, "timeout": None,
            "max_runtime": None, "flush_interval": 0.02, "local_modules": None}
    spec.update(kw)
    return spec


def run(code: str, inputs: dict | None = None, limits: sandbox.Limits | None = None, **spec_kw):
    events: list[dict] = []
    stats: dict = {}
    limits = limits or sandbox.Limits(bubblewrap="auto")
    payload = sandbox.run_sandboxed(make_spec(code, **spec_kw), dict(inputs or {}), emit=events.append,
                                    limits=limits, stats=stats)
    assert isinstance(payload, bytes)
    return payloads.from_payload(payload), events, stats


def printed(events: list[dict]) -> str:
    return "".join(e.get("text", "") for e in events if e["kind"] in ("stdout", "stderr"))


def still_works(bwrap: bool | str = "auto") -> None:
    result, events, _ = run("y = x + 1\nprint('fine', y)", {"x": 41}, sandbox.Limits(bubblewrap=bwrap))
    assert result["status"] == "ok", result.get("error")
    assert result["outputs"] == {"y": 42}
    assert "fine 42" in printed(events)


def sandbox_tasks() -> int:
    return isolation.tasks_of(65534) if ROOT else 0


# ---------------------------------------------------------------- a normal cell

@pytest.mark.parametrize("bwrap", [pytest.param("auto", id="default"), pytest.param(False, id="no-bwrap")])
def test_normal_cell_returns_outputs_and_streams_its_output(bwrap, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak")
    monkeypatch.setenv("DASK_DEPIN__SECRET", "do-not-leak")
    code = ("import os, sys\n"
            "print('hello from', 'the sandbox')\n"
            "print('to stderr', file=sys.stderr)\n"
            "os.write(1, b'\\x00\\x00\\x00\\x05\\x03C code writing to fd 1 does not reach the protocol\\n')\n"
            "y = x * 2\n"
            "leaked = sorted(k for k in os.environ if k.startswith(('AWS', 'DASK')) and k != 'DASK_SCHEDULER')\n"
            "sched = os.environ.get('DASK_SCHEDULER')\n"
            "where = os.getcwd()\n"
            "home = os.environ['HOME']\n"
            "uid = os.getuid()\n"
            "y.sum()")
    result, events, stats = run(code, {"x": np.arange(5)}, sandbox.Limits(bubblewrap=bwrap), last_expr=True)
    assert result["status"] == "ok", result.get("error")
    np.testing.assert_array_equal(result["outputs"]["y"], np.arange(5) * 2)
    assert result["outputs"]["leaked"] == [] and result["outputs"]["sched"] == "threads"  # set by the sandbox
    scratch = result["outputs"]["where"]
    assert scratch == result["outputs"]["home"] and os.path.basename(scratch).startswith("depin-cell-")
    assert not os.path.exists(scratch), "the scratch directory outlived the cell"
    if ROOT:
        assert result["outputs"]["uid"] == 65534
    assert result["value"] == 20
    text = printed(events)
    assert "hello from the sandbox" in text and "to stderr" in text
    assert all(e["run"] is not None for e in events)
    assert stats["cpu_seconds"] > 0 and stats["wall_seconds"] > 0
    # the child's energy figures reach the worker beside the payload (for the coordinator's ledger)
    assert stats["energy"]["cpu_scope"] == "the cell's process"
    assert stats["energy"]["energy_j"] == result["energy"]["energy_j"]


# ---------------------------------------------------------------- files

@pytest.mark.parametrize("bwrap", MODES)
def test_files_in_the_volunteers_home_are_out_of_reach(bwrap):
    secret = pathlib.Path.home() / f".depin-sandbox-secret-{uuid.uuid4().hex[:8]}"
    secret.write_text("volunteer's secret")
    secret.chmod(0o600)
    try:
        code = (f"try:\n    got = open({str(secret)!r}).read()\n"
                f"except OSError as e:\n    got = type(e).__name__\n")
        result, _, _ = run(code, limits=sandbox.Limits(bubblewrap=bwrap))
        assert result["status"] == "ok", result.get("error")
        assert result["outputs"]["got"] in ("FileNotFoundError", "PermissionError")
    finally:
        secret.unlink()
    still_works(bwrap)


@pytest.mark.parametrize("bwrap", MODES)
def test_writing_outside_the_scratch_directory_is_denied(bwrap, tmp_path):
    targets = [f"/etc/depin-sandbox-{uuid.uuid4().hex[:8]}", str(tmp_path / "escaped.txt"),
               str(pathlib.Path.home() / f".depin-sandbox-escape-{uuid.uuid4().hex[:8]}")]
    code = ("import os\nresults = []\n"
            f"for path in {targets!r}:\n"
            "    try:\n        open(path, 'w').write('x')\n        results.append('written')\n"
            "    except OSError as e:\n        results.append(type(e).__name__)\n"
            "open('inside.txt', 'w').write('scratch is writable')\n"
            "inside = open('inside.txt').read()\n")
    try:
        result, _, _ = run(code, limits=sandbox.Limits(bubblewrap=bwrap))
        assert result["status"] == "ok", result.get("error")
        assert result["outputs"]["inside"] == "scratch is writable"
        outcome = dict(zip(targets, result["outputs"]["results"]))
        assert outcome[targets[0]] != "written", outcome  # /etc
        # Inside bubblewrap an unprivileged worker's hidden home and /tmp are throwaway tmpfs: a write may
        # succeed there, but nothing reaches the real ones.
        assert not any(os.path.exists(path) for path in targets), outcome
    finally:
        for path in targets:
            if os.path.exists(path):
                os.unlink(path)
    still_works(bwrap)


@pytest.mark.skipif(not BWRAP_OK, reason=f"bubblewrap unavailable: {BWRAP_WHY}")
def test_no_network_inside_bubblewrap():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = ("import socket\ntry:\n"
                f"    socket.create_connection(('127.0.0.1', {port}), timeout=3).close()\n    got = 'connected'\n"
                "except OSError as e:\n    got = type(e).__name__\n")
        result, _, _ = run(code, limits=sandbox.Limits(bubblewrap=True))
    assert result["status"] == "ok", result.get("error")
    assert result["outputs"]["got"] != "connected"


# ---------------------------------------------------------------- limits

@pytest.mark.parametrize("bwrap", [pytest.param("auto", id="default"), pytest.param(False, id="no-bwrap")])
def test_memory_past_the_limit_is_stopped_with_a_clear_error(bwrap):
    limits = sandbox.Limits(bubblewrap=bwrap, memory=300 * 2**20)
    result, _, _ = run("import numpy as np\na = np.ones(2**30 // 8)\n", limits=limits)
    assert result["status"] == "error"
    err = result["error"]
    assert "MemoryError" in err["type"]
    assert "300 MiB" in err["message"] and "depin.sandbox.memory" in err["message"]
    assert "volunteer" in err["message"]
    still_works(bwrap)


@pytest.mark.parametrize("bwrap", MODES)
def test_endless_forking_is_stopped(bwrap):
    before = sandbox_tasks()
    code = ("import os, time\nn = 0\n"
            "for i in range(2000):\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
            "    n += 1\n")
    limits = sandbox.Limits(bubblewrap=bwrap, max_processes=30, wall_time=15)
    t0 = time.monotonic()
    result, _, _ = run(code, limits=limits)
    assert time.monotonic() - t0 < 15
    assert result["status"] == "error", "2000 forks were allowed"
    err = result["error"]
    assert err["type"] == "BlockingIOError", err
    assert "depin.sandbox.max-processes" in err["message"] and "30" in err["message"]
    deadline = time.monotonic() + 5  # the sleeping children went with the sandbox
    while sandbox_tasks() > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sandbox_tasks() <= before
    still_works(bwrap)


def test_running_past_the_wall_time_is_stopped():
    limits = sandbox.Limits(wall_time=1.5)
    t0 = time.monotonic()
    # time.sleep is one C call: the cell's own timer could not interrupt it; the sandbox kills it.
    result, events, _ = run("import time\nprint('started', flush=True)\ntime.sleep(60)\n", limits=limits)
    assert time.monotonic() - t0 < 10
    assert result["status"] == "error"
    err = result["error"]
    assert err["timed_out"] and "1.5s" in err["message"] and "depin.sandbox.wall-time" in err["message"]
    assert "started" in printed(events)
    still_works()


def test_the_cells_own_timeout_still_applies():
    t0 = time.monotonic()
    result, _, _ = run("while True:\n    pass\n", timeout=1.0)
    assert time.monotonic() - t0 < 8
    assert result["status"] == "cancelled" and result["error"]["timed_out"]


def test_cpu_time_limit():
    result, _, _ = run("while True:\n    pass\n", limits=sandbox.Limits(cpu_time=1, wall_time=20))
    assert result["status"] == "error"
    assert "depin.sandbox.cpu-time" in result["error"]["message"], result["error"]
    still_works()


def test_a_crash_is_reported_and_the_worker_carries_on():
    result, _, _ = run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    assert result["status"] == "error"
    assert "SIGSEGV" in result["error"]["message"]
    still_works()


def test_cancelling_the_run_kills_the_child():
    spec = make_spec("import time\ntime.sleep(60)\n")
    threading.Timer(1.5, cancel.cancel_run, args=(spec["run_id"],)).start()
    t0 = time.monotonic()
    payload = sandbox.run_sandboxed(spec, {}, emit=lambda msg: None, limits=sandbox.Limits())
    assert time.monotonic() - t0 < 10
    result = payloads.from_payload(payload)
    assert result["status"] == "cancelled"
    assert active.get(spec["run_id"]) is None


# ---------------------------------------------------------------- settings and description

def test_limits_from_config_and_the_cells_timeout():
    import dask

    with dask.config.set({"depin.sandbox": {"memory": "300MiB", "wall-time": "10m", "cpu-time": "2m",
                                            "max-processes": 64, "bubblewrap": False, "enabled": True,
                                            "scratch-root": None, "user": "nobody", "network": False},
                          "depin.cancel-grace": "3s"}):
        limits = sandbox.Limits.from_config()
        assert (limits.memory, limits.wall_time, limits.cpu_time, limits.max_processes) == (300 * 2**20, 600, 120, 64)
        assert limits.bubblewrap is False and limits.is_enabled(volunteer=False)
        narrowed = sandbox.Limits.from_config({"timeout": 5, "max_runtime": None})
        assert narrowed.wall_time == 8 and "--timeout" in narrowed.wall_source
    assert sandbox.Limits(enabled="auto").is_enabled(volunteer=True)
    assert not sandbox.Limits(enabled="auto").is_enabled(volunteer=False)


def test_bubblewrap_required_but_missing_is_an_error(monkeypatch):
    monkeypatch.setattr(isolation, "bwrap_works", lambda network, user: (False, "bwrap is not installed"))
    with pytest.raises(sandbox.SandboxError, match="depin.sandbox.bubblewrap is true"):
        sandbox.run_sandboxed(make_spec("x = 1"), {}, emit=lambda m: None, limits=sandbox.Limits(bubblewrap=True))
    assert sandbox.describe(sandbox.Limits(bubblewrap=True))["bubblewrap"]["active"] is False


def test_describe_says_what_is_active():
    d = sandbox.describe(sandbox.Limits())
    assert d["bubblewrap"]["active"] is BWRAP_OK
    assert d["user"]["switch"] is ROOT
    assert any("depin.sandbox.memory" in line for line in d["lines"])


@pytest.mark.parametrize("bwrap", [pytest.param("auto", id="default"), pytest.param(False, id="no-bwrap")])
def test_processes_the_cell_started_end_with_it(bwrap):
    seconds = str(300 + int(uuid.uuid4().int % 600))  # a sleep this test can recognise
    code = ("import subprocess\n"
            f"subprocess.Popen(['sleep', '{seconds}'], start_new_session=True)\n"  # leaves the process group
            f"subprocess.Popen(['sleep', '{seconds}'])\n")

    def sleepers():
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().split(b"\0")[:2] == [b"sleep", seconds.encode()]:
                        found.append(int(pid))
            except OSError:
                pass
        return found

    try:
        result, _, _ = run(code, limits=sandbox.Limits(bubblewrap=bwrap))
        assert result["status"] == "ok", result.get("error")
        deadline = time.monotonic() + 5
        while sleepers() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sleepers() == []
    finally:
        for pid in sleepers():
            os.kill(pid, 9)


@pytest.mark.skipif(not BWRAP_OK, reason=f"bubblewrap unavailable: {BWRAP_WHY}")
def test_inside_bubblewrap_the_python_installation_stays_importable_and_display_works():
    code = ("import fractions\n"  # not preloaded by the sandbox: imported from the (re-bound) installation
            "f = str(fractions.Fraction(1, 3))\n"
            "from IPython.display import display, HTML\n"
            "display(HTML('<b>shown</b>'))\n")
    result, events, _ = run(code, limits=sandbox.Limits(bubblewrap=True))
    assert result["status"] == "ok", result.get("error")
    assert result["outputs"]["f"] == "1/3"
    shown = [e for e in events if e["kind"] == "display"]
    assert shown and shown[0]["data"]["text/html"] == "<b>shown</b>"


# ------------------------------------------------------------------ warm children

def _warm_run(code: str, limits: sandbox.Limits, **spec_kw):
    stats: dict = {}
    payload = sandbox.run_sandboxed(make_spec(code, **spec_kw), {}, emit=lambda m: None, limits=limits,
                                    stats=stats, warm=True)
    return payloads.from_payload(payload), stats


def test_a_warm_child_serves_the_next_cell_once_and_carries_nothing_of_the_last():
    from depin_jupyter.worker.sandbox import parent

    limits = sandbox.Limits(bubblewrap="auto")
    try:
        first, stats1 = _warm_run("import os, json\njson.left_behind = 'secret'\n"
                                  "open(os.path.join(os.environ['HOME'], 'note'), 'w').write('x')\n"
                                  "marker = os.environ['DEPIN_SANDBOX_RUN']\nhome = os.environ['HOME']\n", limits)
        assert first["status"] == "ok", first.get("error")
        deadline = time.monotonic() + 60
        while not parent._WARM.ready and time.monotonic() < deadline:  # the next child is starting
            time.sleep(0.05)
        second, stats2 = _warm_run("import os, json\nmarker = os.environ['DEPIN_SANDBOX_RUN']\nhome = os.environ['HOME']\n"
                                   "leftover = getattr(json, 'left_behind', None)\nnotes = os.listdir(home)\n", limits)
        assert second["status"] == "ok", second.get("error")
        assert stats2["warm"] is True
        out1, out2 = first["outputs"], second["outputs"]
        assert out2["marker"] != out1["marker"] and out2["home"] != out1["home"]  # its own process and scratch
        assert out2["leftover"] is None and out2["notes"] == []
        assert not os.path.exists(out1["home"])  # the first cell's scratch is gone
    finally:
        parent._WARM.clear()


def test_a_warm_child_for_other_limits_is_not_used_and_its_wait_is_not_the_cells_wall_time():
    from depin_jupyter.worker.sandbox import parent

    limits = sandbox.Limits(bubblewrap="auto", wall_time=1.0)
    try:
        _warm_run("x = 1", limits)
        deadline = time.monotonic() + 60
        while not parent._WARM.ready and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)  # the warm child waits longer than the wall time: its wall time starts with its cell
        result, stats = _warm_run("x = 2", limits)
        assert result["status"] == "ok" and stats["warm"] is True, result.get("error")
        other, stats = _warm_run("x = 3", sandbox.Limits(bubblewrap="auto", memory=500 * 2**20))
        assert other["status"] == "ok" and stats["warm"] is False  # started for other limits: not used
    finally:
        parent._WARM.clear()


def test_cells_sent_back_to_back_each_get_a_child_started_ahead():
    """With two children kept warm, the second of two cells sent one after the other does not wait for the
    start of a child taken after the first (a child starts slower than a trivial cell runs)."""
    from depin_jupyter.worker.sandbox import parent

    limits = sandbox.Limits(bubblewrap="auto")
    try:
        with dask.config.set({"depin.sandbox.warm-children": 2}):
            _warm_run("x = 0", limits)
            deadline = time.monotonic() + 60
            while parent._WARM.ready < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert parent._WARM.ready == 2
            runs = [_warm_run(f"x = {i}", limits) for i in (1, 2)]  # no wait between them
        assert [r["status"] for r, _ in runs] == ["ok", "ok"]
        assert [s["warm"] for _, s in runs] == [True, True]
        assert runs[0][0]["outputs"]["x"] == 1 and runs[1][0]["outputs"]["x"] == 2
    finally:
        parent._WARM.clear()


class _FakeChild:
    def __init__(self, limits, n):
        self.key, self.n, self.closed = warm.warm_key(limits), n, False

    def alive(self):
        return not self.closed

    def close(self):
        self.closed = True


def test_the_warm_pool_keeps_its_depth_hands_out_the_oldest_and_drops_children_for_other_limits():
    started: list[_FakeChild] = []

    def start(limits):
        started.append(_FakeChild(limits, len(started)))
        return started[-1]

    pool = warm.WarmSlot(start, depth=lambda: 3)
    a, b = sandbox.Limits(bubblewrap=False), sandbox.Limits(bubblewrap=False, memory=2**30)

    def settle(n):
        deadline = time.monotonic() + 10
        while pool.ready != n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.ready == n

    pool.refill(a)
    settle(3)
    assert pool.take(a).n == 0 and pool.take(a).n == 1  # oldest first
    pool.refill(a)
    settle(3)
    assert len(started) == 5  # topped up to three, no more
    assert pool.take(b) is None  # none for other limits: those for `a` are closed, not kept
    assert pool.ready == 0 and all(c.closed for c in started[2:])
    pool.refill(b)
    settle(3)
    started[-1].closed = True  # died while waiting: never handed out
    assert [pool.take(b).n for _ in range(2)] == [5, 6] and pool.take(b) is None
    pool.clear()
