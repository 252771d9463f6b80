"""A coordinator killed (kill -9) and restarted still hands a new kernel the background runs that had
finished, once, and names the ones it was running as lost (`network.held`): real `depin scheduler` /
`depin worker` processes on 127.0.0.1."""

from __future__ import annotations

import json
import time

import pytest
from conftest import free_port
from volunteer_net import Network, wait_for_workers

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
    assert [(r.key, p) for r, p in loaded] == [(rec.key, b"abc")]  # expired, orphaned, torn ones are gone
    assert sorted(p.name for p in (tmp_path / "held").iterdir()) == sorted(
        p.name for p in held._paths(rec.key))
    held.drop(rec.key)
    assert held.load(ttl=3600) == []


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
        background.submit(session, "import time\ntime.sleep(120)\nc = 1\n", {},
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
        with pytest.raises(DepinUsageError, match="ended lost: the coordinator restarted while it ran"):
            background.wait(again, ns, "inflight", timeout=60)
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
