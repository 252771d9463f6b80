"""A coordinator killed (kill -9) and restarted still hands a new kernel the background runs that had
finished, once, and runs again the ones it was running (`network.held`): real `depin scheduler` /
`depin worker` processes on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import pytest
from conftest import free_port
from volunteer_net import Network, cell_async, wait_for_workers

from depin_jupyter.errors import DepinUsageError
from depin_jupyter.kernel import background, cluster
from depin_jupyter.kernel.records import RunOptions
from depin_jupyter.network.held import HeldRecord, HeldResults

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("no_store")]


def test_held_results_are_whole_bounded_expire_and_name_no_path(tmp_path):
    held = HeldResults(tmp_path / "held")
    rec = HeldRecord("depin-run-../../escape", "r1", "n", "sci", time.time(), "finished", nbytes=3)
    assert held.keep(rec, b"abc", limit=10)
    assert {p.parent for p in (tmp_path / "held").iterdir()} == {tmp_path / "held"}  # the key names no path
    assert not (tmp_path / "escape").exists()
    big = HeldRecord("depin-run-big", "r2", "n", "sci", time.time(), "finished", nbytes=8)
    assert not held.keep(big, b"x" * 8, limit=10)  # 3 + 8 > 10: not kept on disk
    old = HeldRecord("depin-run-old", "r3", "n", "sci", time.time() - 7200, "finished")
    assert held.keep(old, None, limit=10)
    # A write the kill interrupted, a result whose record was never written, a record whose result is short.
    short = HeldRecord("depin-run-short", "r4", "n", "sci", time.time(), "finished", nbytes=2)
    assert held.keep(short, b"ab", limit=10)
    (tmp_path / "held" / "deadbeef.json.partial").write_text("{")
    (tmp_path / "held" / "0123.bin").write_bytes(b"orphan")
    held._paths("depin-run-short")[1].write_bytes(b"a")
    loaded = held.load(ttl=3600)
    assert [(h.record.key, h.payload) for h in loaded] == [(rec.key, b"abc")]  # expired, orphaned, torn: gone
    assert sorted(p.name for p in (tmp_path / "held").iterdir()) == sorted(
        p.name for p in held._paths(rec.key)[:2])
    held.drop(rec.key)
    assert held.load(ttl=3600) == []


def test_a_running_background_runs_submission_is_kept_whole_and_bounded(tmp_path):
    from depin_jupyter.network.held import HeldSubmission

    held = HeldResults(tmp_path / "held")
    sub = HeldSubmission(b"spec", b"inputs", None, {"workers": ["tls://w:1"]}, {"k": 2, "adaptive": True})
    running = HeldRecord("depin-run-running", "r1", "m[0]", "sci", time.time(), "pending")
    assert held.keep(running, None, limit=1 << 20, submission=sub)
    assert held.keep(running, None, limit=1 << 20)  # written again while it runs: the submission stays
    (again,) = held.load(ttl=3600)
    assert again.submission == sub and again.payload is None
    # Ended: the result replaces the submission (nothing left to run again).
    assert held.keep(dataclasses.replace(running, state="finished", nbytes=2), b"ok", limit=1 << 20)
    (ended,) = held.load(ttl=3600)
    assert ended.submission is None and ended.payload == b"ok" and not held._paths(running.key)[2].exists()
    # Too big to keep: the record is written without it (a restart names the run lost instead).
    big = HeldRecord("depin-run-big", "r2", "m[1]", "sci", time.time(), "queued")
    assert held.keep(big, None, limit=len(sub.encode()), submission=HeldSubmission(b"x" * 4096, b"", None, {}, None))
    assert {h.record.key: h.submission for h in held.load(ttl=3600)}["depin-run-big"] is None
    # A torn or forged submission file drops its run; nothing in it is executed or unpickled.
    torn = HeldRecord("depin-run-torn", "r3", "m[2]", "sci", time.time(), "pending")
    assert held.keep(torn, None, limit=1 << 20, submission=sub)
    held._paths(torn.key)[2].write_bytes(b"\x93\x01")
    assert "depin-run-torn" not in {h.record.key for h in held.load(ttl=3600)}
    # A run handed over (dropped) while its end was being written: the late write never lands.
    late = HeldRecord("depin-run-late", "r4", "m[3]", "sci", time.time(), "finished", nbytes=2)
    held.drop(late.key)
    assert held.keep(late, b"ok", limit=1 << 20)
    assert not any(p.exists() for p in held._paths(late.key))
    assert not list((tmp_path / "held").glob("*partial*"))


@pytest.fixture
def net(tmp_path):
    n = Network(tmp_path, free_port(), env={"OMP_NUM_THREADS": "1"})
    n.start_scheduler()
    yield n
    n.close()


def _kill_and_restart(net: Network) -> None:
    assert net.scheduler is not None
    net.scheduler.kill()  # SIGKILL: no goodbye, nothing saved on the way out
    net.scheduler.wait(10)
    net.start_scheduler()


def _held_states(net: Network) -> dict[str, str]:
    root = net.state.path / "held"
    return {r["name"]: r["state"] for r in (json.loads(p.read_text()) for p in root.glob("*.json"))} \
        if root.exists() else {}


def test_a_killed_coordinator_restarted_still_hands_over_finished_background_runs(net):
    net.start_worker(net.token("worker", "held-v1"))
    token = net.token("client", "held-sci")
    session = cluster._connect_token(token)
    try:
        wait_for_workers(session, 1)
        background.submit(session, "import time\ntime.sleep(2)\nb = a + 1\n", {"a": 20},
                          RunOptions(replicas=1, no_store=True, name="kept"))
        background.submit(session, "import time\ntime.sleep(6)\nc = a * 2\n", {"a": 21},
                          RunOptions(replicas=1, no_store=True, name="inflight"))
    finally:
        session.close()  # its kernel goes before "kept" ends: nobody fetches it
    deadline = time.monotonic() + 60
    while _held_states(net).get("kept") != "finished" and time.monotonic() < deadline:
        time.sleep(0.1)
    states = _held_states(net)
    assert states["kept"] == "finished" and states["inflight"] in ("queued", "pending"), states
    _kill_and_restart(net)

    again = cluster._connect_token(token)
    try:
        ns: dict = {}
        background.wait(again, ns, "kept", timeout=60)
        assert ns["b"] == 21
        background.wait(again, ns, "inflight", timeout=120)  # run again by the restarted coordinator
        assert ns["c"] == 42
        assert _held_states(net) == {}  # both handed over: nothing kept on disk any more
        with pytest.raises(DepinUsageError, match="no background run named 'kept'"):
            background.wait(again, {}, "kept", timeout=5)  # handed over once, not twice
    finally:
        again.close()
    _kill_and_restart(net)
    third = cluster._connect_token(token)
    try:
        with pytest.raises(DepinUsageError, match="no background run named 'kept'"):
            background.wait(third, {}, "kept", timeout=5)
    finally:
        third.close()


def test_another_identity_cannot_take_a_held_result(net):
    net.start_worker(net.token("worker", "held-v2"))
    session = cluster._connect_token(net.token("client", "owner"))
    try:
        wait_for_workers(session, 1)
        background.submit(session, "import time\ntime.sleep(2)\nsecret = 42\n", {},
                          RunOptions(replicas=1, no_store=True, name="mine"))
    finally:
        session.close()
    deadline = time.monotonic() + 60
    while _held_states(net).get("mine") != "finished" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _held_states(net) == {"mine": "finished"}
    _kill_and_restart(net)
    thief = cluster._connect_token(net.token("client", "thief"))
    try:
        with pytest.raises(DepinUsageError, match="no background run named 'mine'"):
            background.wait(thief, {}, "mine", timeout=5)
    finally:
        thief.close()
    owner = cluster._connect_token(net.token("client", "owner"))
    try:
        ns: dict = {}
        background.wait(owner, ns, "mine", timeout=60)
        assert ns["secret"] == 42
    finally:
        owner.close()


def test_a_map_completes_when_its_coordinator_is_killed_and_restarted_mid_map(net):
    """kill -9 of the coordinator mid-map: the batches it was running are run again by the restarted one
    (their submissions were written down), the kernel waits across the restart, and the map completes."""
    import numpy as np

    from depin_jupyter.kernel.mapping import map_items

    ns: dict = {"__name__": "__main__", "np": np}
    exec("def slow(x):\n    import time\n    time.sleep(0.05)\n    return np.float64(x) * 7\n", ns)
    ws = [net.start_worker(net.token("worker", f"restart-v{i}"), wait=False)[0] for i in range(2)]
    session = cluster._connect_token(net.token("client", "restart-sci"))
    try:
        wait_for_workers(session, 2)
        handle = map_items(session, ns["slow"], range(200), name="survivor", batch=10, retries=0,
                           options=RunOptions(replicas=1), wait_done=False)
        deadline = time.monotonic() + 120
        while handle.n_done < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 30 <= handle.n_done < 200, handle.status()  # mid-map
        _kill_and_restart(net)
        # retries=0: an item whose batch the restart lost would be named failed; none may be.
        assert handle.result(timeout=240) == [7.0 * i for i in range(200)], handle.errors
    finally:
        session.close()
        for w in ws:
            w.terminate()
            w.wait(60)


def _wait_held(net: Network, name: str, states: tuple[str, ...], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _held_states(net).get(name) not in states and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _held_states(net).get(name) in states, _held_states(net)


def test_a_cell_its_kernel_waits_for_survives_a_coordinator_killed_mid_run(net):
    """A foreground cell running for longer than hold-after is written down; kill -9 of the coordinator: the
    kernel waits across the restart (retries=0: the kernel itself sends nothing again), the restarted
    coordinator runs the cell again, and the same call returns its value."""
    w, _ = net.start_worker(net.token("worker", "fg-v1"))
    session = cluster._connect_token(net.token("client", "fg-sci"))
    try:
        wait_for_workers(session, 1)
        run = cell_async(session, "import time\ntime.sleep(4)\ny = a + 1\n", {"a": 41}, retries=0, name="fg")
        _wait_held(net, "fg", ("queued", "pending"))
        _kill_and_restart(net)
        ns, _ = run.result(timeout=180)
        assert ns["y"] == 42
        deadline = time.monotonic() + 10
        while _held_states(net) and time.monotonic() < deadline:  # handed over: dropped from the disk
            time.sleep(0.05)
        assert _held_states(net) == {}
        quick = cell_async(session, "z = 1\n", {}, name="quick")
        assert quick.result(timeout=60)[0]["z"] == 1
        assert "quick" not in _held_states(net)  # fetched within hold-after: never written
    finally:
        session.close()
        w.terminate()
        w.wait(60)


def test_a_finished_cell_its_kernel_had_not_fetched_is_handed_over_after_a_restart(net):
    """The kernel is slow to fetch (its poll held back here): the result the coordinator got is written
    down after hold-after (as finished: a restart does not run it again); kill -9 and restart; the kernel's
    poll then gets the result from the restarted coordinator."""
    from depin_jupyter.kernel.watch import EndWatcher
    from depin_jupyter.protocol.rpc import Coordinator

    w, _ = net.start_worker(net.token("worker", "fg-v2"))
    session = cluster._connect_token(net.token("client", "slow-sci"))
    go = threading.Event()

    class SlowWatcher(EndWatcher):
        def _run(self) -> None:
            go.wait(120)
            super()._run()

    try:
        wait_for_workers(session, 1)
        session.end_watcher = SlowWatcher(Coordinator.of_client(session.client), session.client)
        run = cell_async(session, "y = a * 2\n", {"a": 21}, retries=0, name="unfetched")
        _wait_held(net, "unfetched", ("finished",))
        _kill_and_restart(net)
        go.set()
        ns, _ = run.result(timeout=180)
        assert ns["y"] == 42
    finally:
        go.set()
        session.close()
        w.terminate()
        w.wait(60)


def test_inputs_held_on_disk_are_whole_named_by_digest_and_bounded(tmp_path):
    from depin_jupyter.network.relay import InputStore

    root = tmp_path / "inputs"
    store = InputStore(100, root)
    assert store.put("tok-a/../../x", b"a" * 40, 100) and store.put("tok-b", b"b" * 40, 100)
    assert {p.parent for p in root.iterdir()} == {root} and not (tmp_path / "x").exists()
    assert store.put("tok-c", b"c" * 40, 100)  # over 100 bytes: the oldest goes, its file with it
    assert len(list(root.glob("*.in"))) == 2 and store.has(["tok-a/../../x"]) == []
    (root / "feed.in.partial-0").write_bytes(b"torn")  # a write a kill interrupted
    (root / "0123.in").write_bytes(b"\x00\x00\x00\x05tok-c" + b"forged")  # not named after its key
    again = InputStore(100, root)  # a restarted coordinator
    assert again.has(["tok-b", "tok-c"]) == ["tok-b", "tok-c"] and again.get("tok-c") == b"c" * 40
    assert sorted(p.name for p in root.iterdir()) == sorted(p.name for p in (again._path("tok-b"),
                                                                             again._path("tok-c")))
    assert not InputStore(100, root).put("big", b"x" * 101, 100)


def test_a_restarted_coordinator_still_holds_the_inputs_it_was_sent(net):
    """An 8 MiB input sent before a kill -9 is not sent again after the restart: the coordinator kept it in
    its state dir, the volunteer (rejoined) fetches it from there."""
    import numpy as np

    from depin_jupyter.kernel import runner

    net.start_worker(net.token("worker", "inputs-v1"))
    session = cluster._connect_token(net.token("client", "inputs-sci"))
    try:
        wait_for_workers(session, 1)
        ns = {"a": np.random.default_rng(5).random(2**20)}  # 8 MiB
        out = runner.run_cell(session, "t = float(a.sum())", ns, RunOptions(replicas=1))
        assert out.sent_bytes >= ns["a"].nbytes and out.reused_inputs == []
        _kill_and_restart(net)
        wait_for_workers(session, 1, timeout=120)  # the kernel's client and the volunteer rejoined
        out = runner.run_cell(session, "u = float((a * 2).sum())", ns, RunOptions(replicas=1))
        assert ns["u"] == float((ns["a"] * 2).sum())
        assert out.reused_inputs == ["a"] and out.sent_bytes < 64 * 1024, (out.reused_inputs, out.sent_bytes)
    finally:
        session.close()
