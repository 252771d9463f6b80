"""A notebook's look at a volunteer network before each cell costs bytes for what changed, not for how many
volunteers there are (`network.roster`): real `depin scheduler` / `depin worker` processes, the kernel's
link through a byte-counting proxy."""

from __future__ import annotations

import dataclasses
import signal
import time
from types import SimpleNamespace

import pytest
from conftest import free_port
from delay_proxy import DelayProxy
from volunteer_net import Network, cell_async, wait_for_workers

from depin_jupyter.kernel import cluster
from depin_jupyter.network.roster import Roster
from depin_jupyter.protocol.identity import Token

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("no_store")]


class _Workers:
    """What `Roster` reads of a scheduler: its workers' records (a stand-in for Dask's WorkerState)."""

    def __init__(self) -> None:
        self.workers: dict[str, SimpleNamespace] = {}

    def join(self, address: str, roster: Roster) -> None:
        self.workers[address] = SimpleNamespace(identity=lambda: {"name": address[-1], "nthreads": 1, "id": "x"})
        roster.add_worker(self, address)

    def leave(self, address: str, roster: Roster) -> None:
        del self.workers[address]
        roster.remove_worker(self, address)

    @staticmethod
    def strip_serialized(msg: dict) -> dict:
        return msg


def _apply(held: dict, reply: dict) -> dict:
    out = dict(reply["workers"]) if reply["full"] else {**held, **reply["workers"]}
    for a in reply["removed"]:
        out.pop(a, None)
    return out


def test_the_roster_answers_with_the_changes_since_what_a_notebook_holds():
    sched = _Workers()
    roster = Roster(sched, keep=4)
    first = roster.since(None, 0)
    assert first["full"] and first["workers"] == {}
    held, at = {}, (first["generation"], first["epoch"])
    for step in [("join", "w1"), ("join", "w2"), ("leave", "w1"), ("join", "w3")]:
        getattr(sched, step[0])(step[1], roster)
        reply = roster.since(*at)
        assert not reply["full"] and set(reply["workers"]) | set(reply["removed"]) == {step[1]}
        held, at = _apply(held, reply), (reply["generation"], reply["epoch"])
        assert set(held) == set(sched.workers)
        assert held and all(set(e) == {"name", "nthreads"} for e in held.values())  # what a notebook reads
    nothing = roster.since(*at)
    assert nothing["workers"] == {} and nothing["removed"] == [] and not nothing["full"]
    # Older than the log keeps, from another coordinator (restarted: a new generation), or from the future: all.
    for j in range(6):
        sched.join(f"v{j}", roster)
    assert roster.since(*at)["full"] and set(roster.since(*at)["workers"]) == set(sched.workers)
    assert roster.since("another", roster.epoch)["full"]
    assert roster.since(roster.generation, roster.epoch + 5)["full"]
    # A delta applied to a newer picture than it was computed for gives the same roster (joins, leaves again).
    recent = roster.since(roster.generation, roster.epoch - 2)
    assert _apply(dict(sched.workers), recent).keys() == sched.workers.keys()


@pytest.fixture
def net(tmp_path):
    n = Network(tmp_path, free_port(), env={"OMP_NUM_THREADS": "1"})
    n.start_scheduler()
    yield n
    n.close()


def _bytes(proxy: DelayProxy, s) -> tuple[float, float]:
    """(bytes through the kernel's link per fresh look at the workers, per trivial cell)."""
    cell_async(s, "y = 1").result(timeout=60)  # anything a first cell of this pool does once
    before = proxy.bytes
    for _ in range(10):
        s.workers(max_age=0)  # what a cell does when its last look is older than 2 s
    look = (proxy.bytes - before) / 10
    before = proxy.bytes
    for _ in range(5):
        cell_async(s, "y = 1").result(timeout=60)
    return look, (proxy.bytes - before) / 5


def test_bytes_per_cell_do_not_grow_with_the_number_of_volunteers(net):
    proxy = DelayProxy(net.port)
    token = dataclasses.replace(Token.decode(net.token("client", "counted")), address=f"tls://127.0.0.1:{proxy.port}")
    procs = [net.start_worker(net.token("worker", "v0"))[0]]
    s = cluster._connect_token(token.encode())
    try:
        wait_for_workers(s, 1)
        look_1, cell_1 = _bytes(proxy, s)
        procs += [net.start_worker(net.token("worker", f"v{i}"), wait=False)[0] for i in range(1, 4)]
        wait_for_workers(s, 4)
        assert {w.name for w in s.workers(max_age=0)} == {"v0", "v1", "v2", "v3"}
        look_4, cell_4 = _bytes(proxy, s)
        print(f"bytes per look at the workers: {look_1:.0f} with 1 volunteer, {look_4:.0f} with 4; "
              f"per cell: {cell_1:.0f}, {cell_4:.0f}")
        # Each volunteer's whole record is ~5 KB (its package versions): three more, sent with every look,
        # would add ~15 KB. (The slack is for heartbeats and the like sharing the link.)
        assert look_4 - look_1 < 300, f"{look_1:.0f} B per look with 1 volunteer, {look_4:.0f} B with 4"
        # (Bytes per cell are printed, not bounded: a cell landing on a volunteer for the first time costs
        # more, whatever the pool's size, so they vary with placement; the look is what grew with it.)
        # The roster follows leaves too, and keeps what the placement reads (versions, for the env check).
        procs[3].send_signal(signal.SIGTERM)
        procs[3].wait(30)
        deadline = time.monotonic() + 30
        while len(s.workers(max_age=0)) != 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert {w.name for w in s.workers(max_age=0)} == {"v0", "v1", "v2"}
        versions = s.worker_versions([w.address for w in s.workers()], ["numpy"])
        assert len(versions) == 3 and all(v.get("numpy") for v in versions.values())
    finally:
        s.close()
        proxy.close()


def test_a_short_cell_is_answered_with_its_submission_and_a_stale_worker_list_is_refreshed_beside_it(net):
    """A cell that ends within depin.submit-wait gets its end in the submission's reply: the kernel makes no
    call to wait for it (one round trip, not two). A worker list past its 2 s is used while a thread brings
    it up to date: the cell does not wait for that look either, and the next one sees the new volunteer."""
    import dask

    from depin_jupyter.protocol.rpc import Coordinator

    procs = [net.start_worker(net.token("worker", "w0"))[0]]
    s = cluster._connect_token(net.token("client", "quick"))
    polls: list[list[str]] = []
    real = Coordinator.wait_cells

    def counted(self, keys, *a, **kw):
        polls.append(list(keys))
        return real(self, keys, *a, **kw)

    try:
        wait_for_workers(s, 1)
        cell_async(s, "y = 0").result(timeout=60)  # a first cell on a volunteer does some things once
        time.sleep(0.5)  # its next sandbox child is started
        Coordinator.wait_cells = counted  # type: ignore[method-assign]
        with dask.config.set({"depin.submit-wait": "1s"}):  # the longest the coordinator waits: a loaded machine
            ns, _ = cell_async(s, "y = 41 + 1").result(timeout=60)
            assert ns["y"] == 42 and polls == []
        with dask.config.set({"depin.submit-wait": 0}):
            ns, _ = cell_async(s, "y = 43").result(timeout=60)
            assert ns["y"] == 43 and len(polls) >= 1  # without it: submitted, then waited for
        procs.append(net.start_worker(net.token("worker", "w1"))[0])  # joined (its log says so)
        s._workers_at -= 3.0  # the list is past its 2 s
        assert [w.name for w in s.workers()] == ["w0"]  # the old list, at once...
        deadline = time.monotonic() + 30
        while {w.name for w in s.last_workers} != {"w0", "w1"} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert {w.name for w in s.last_workers} == {"w0", "w1"}  # ...brought up to date beside it
    finally:
        Coordinator.wait_cells = real  # type: ignore[method-assign]
        s.close()
