"""Attacks on a volunteer network, with real processes: a coordinator, honest volunteers, a malicious one (an
ordinary worker token plus a Dask preload, `attacker_volunteer.py`) and several client identities.

Each attack comes with a canary or a wrong value that would prove it worked, and an honest control that
proves the setup ran (PRODUCT.md §5: nothing an untrusted party sends is unpickled outside a sandbox, and no
identity can do more than its role needs).
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import sys
import time

import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from conftest import free_port  # noqa: E402
from volunteer_net import Network, cell_async, wait_for_text, wait_for_workers  # noqa: E402

from depin_jupyter.kernel import cluster, runner  # noqa: E402
from depin_jupyter.protocol.identity import Token  # noqa: E402
from depin_jupyter.protocol.rpc import Coordinator  # noqa: E402

PRELOAD = str(HERE / "attacker_volunteer.py")


def _attacks(log: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    root = tmp_path_factory.mktemp("attack-net")
    n = Network(root, free_port(), env={"DASK_DEPIN__VOLUNTEER__SILENCE_TIMEOUT": "10s"})
    n.start_scheduler()
    n.canary = root / "canary"
    n.attack_log = root / "attacks.jsonl"
    n.honest = [n.start_worker(n.token("worker", name))[0] for name in ("honest-a", "honest-b")]
    yield n
    n.close()


def _session(net, name, **kw):
    return cluster._connect_token(net.token("client", name, **kw))


def _start_attacker(net, attacks, **env):
    session = _session(net, f"probe-{time.monotonic_ns()}")
    try:
        honest = {w.name: w.address for w in wait_for_workers(session, 2)}
    finally:
        session.close()
    net.attack_log = net.root / f"attacks-{time.monotonic_ns()}.jsonl"  # this attacker's own record
    env = {"DASK_DISTRIBUTED__WORKER__PRELOAD": json.dumps([PRELOAD]), "DEPIN_ATTACKS": ",".join(attacks),
           "DEPIN_ATTACK_LOG": str(net.attack_log), "DEPIN_ATTACK_CANARY": str(net.canary),
           "DEPIN_ATTACK_VICTIMS": ",".join(sorted(honest)), **env}
    proc, log = net.start_worker(net.token("worker", f"mallory-{'-'.join(sorted(attacks))}"), env=env)
    return proc, log, honest


def _canaries(net) -> list[pathlib.Path]:
    return sorted(net.canary.parent.glob(net.canary.name + ".*"))


# ------------------------------------------------------------------ 4. a client token does not own the coordinator

def test_a_client_identity_can_only_speak_the_cell_protocol(net):
    s = _session(net, "eve-raw-dask")
    try:
        def steal_ca(dask_scheduler=None):  # would hand the CA's private key to the client
            return open(os.path.join(dask_scheduler.state.path, "ca.key")).read()

        def touch(path=str(net.canary) + ".client"):
            open(path, "w").close()
            return "ran"

        attempts = {
            "run_on_scheduler": lambda: s.client.run_on_scheduler(steal_ca),
            "submit": lambda: s.client.submit(touch, pure=False).result(timeout=20),
            "run": lambda: s.client.run(touch),
            "run on nannies": lambda: s.client.run(touch, nanny=True),
            "scatter": lambda: s.client.scatter([1, 2, 3]),
            "set_metadata": lambda: s.client.set_metadata("x", 1),
            "register_plugin": lambda: s.client.register_plugin(_Plugin()),
            "get_events": lambda: s.client.get_events("depin-credit"),
        }
        outcomes = {}
        for what, attempt in attempts.items():
            try:
                outcomes[what] = ("succeeded", attempt())
            except Exception as e:
                outcomes[what] = ("refused", f"{type(e).__name__}: {e}")
        succeeded = {k: v for k, v in outcomes.items() if v[0] == "succeeded"}
        assert not succeeded, succeeded
        assert not _canaries(net) and not pathlib.Path(str(net.canary) + ".client").exists()
        # honest control: the same identity runs a cell, through the coordinator
        ns = {"x": 2}
        runner.run_cell(s, "y = x * 21", ns, runner.RunOptions(replicas=1, no_store=True))
        assert ns["y"] == 42
    finally:
        s.close()


class _Plugin:
    """A scheduler/worker plugin a client would like to install (it is never accepted)."""

    name = "evil-plugin"

    def setup(self, worker=None):
        open(os.environ.get("DEPIN_ATTACK_CANARY", "/tmp/depin-attack-canary") + ".plugin", "w").close()


# ------------------------------------------------------------------ 5. clients cannot see or steer each other

def test_a_client_cannot_wait_for_take_or_cancel_another_clients_cell(net):
    sci, eve = _session(net, "sci-owner"), _session(net, "eve-neighbour")
    try:
        wait_for_workers(sci, 2)
        running = cell_async(sci, "import time\ntime.sleep(3)\nv = 7.5\n")
        deadline = time.monotonic() + 20
        jobs = []
        while not jobs and time.monotonic() < deadline:
            jobs = Coordinator.of_client(sci.client).jobs()
            time.sleep(0.1)
        assert jobs, "the owner does not see its own cell"
        key = jobs[0]["key"]
        eve_gw = Coordinator.of_client(eve.client)
        assert eve_gw.jobs() == []  # she sees nothing of sci's
        for attempt in (lambda: eve_gw.wait_cell(key, 1.0), lambda: eve_gw.cancel_cell(key)):
            with pytest.raises(Exception, match="a client sees only its own runs"):
                attempt()
        with pytest.raises(Exception, match="may not 'depin_verdicts'"):  # verdicts are the coordinator's own
            eve.client.sync(eve.client.scheduler.depin_verdicts, verdicts=[{"address": "x", "valid": False}])
        ns, _ = running.result(timeout=60)  # honest control: sci's cell was untouched
        assert ns["v"] == 7.5
    finally:
        sci.close()
        eve.close()


def test_a_client_cannot_see_read_or_plant_another_clients_inputs(net, monkeypatch):
    """Content keys are guessable (a hash of the array): eve knows sci's array, so its key. She cannot learn
    that sci sent it, nor have her bytes stand in for it, on the coordinator or in a volunteer's cache."""
    from depin_jupyter.protocol.values import content_hash

    sci, eve = _session(net, "sci-inputs"), _session(net, "eve-inputs")
    try:
        wait_for_workers(sci, 2)
        a = np.arange(2**20, dtype=np.float64)  # 8 MiB: held by the coordinator, not inside the task
        key = "depin-input-" + content_hash(a)
        here = runner.RunOptions(worker="honest-a", replicas=1, no_store=True)
        ns = {"a": a}
        runner.run_cell(sci, "t = float(a.sum())", ns, here)
        eve_gw = Coordinator.of_client(eve.client)
        assert eve_gw.input_has([key]) == set()  # she does not learn that sci sent it
        assert Coordinator.of_client(sci.client).input_has([key]) == {key}  # control: sci's is held
        # eve's own kernel, changed to claim sci's key for her zeros: the coordinator holds them as hers, and
        # the volunteer that runs her cell keeps them as hers
        fake = np.zeros_like(a)
        claimed = key.removeprefix("depin-input-")
        monkeypatch.setattr(runner, "fingerprints", lambda namespace, names: {"a": claimed})
        eve_ns = {"a": fake}
        runner.run_cell(eve, "e = float(a.sum())", eve_ns, here)
        assert eve_ns["e"] == 0.0  # her cell got her bytes
        monkeypatch.undo()
        with pytest.raises(Exception, match="may not 'depin_input_get'"):  # nor read inputs as a volunteer does
            eve.client.sync(eve.client.scheduler.depin_input_get, key=key, task="x", index=0)
        again = runner.run_cell(sci, "u = float(a.sum() * 2)", ns, here)
        assert again.reused_inputs == ["a"] and ns["u"] == float(a.sum() * 2)  # sci's bytes, not eve's
    finally:
        sci.close()
        eve.close()


# ------------------------------------------------------------------ 1, 2, 3, 6, 7, 9: a malicious volunteer

def test_a_lying_relaying_boasting_volunteer_changes_nothing(net):
    proc, log, honest = _start_attacker(net, ["lie", "relay", "credit", "display"])
    s = _session(net, "sci-vs-mallory")
    shown = []
    try:
        wait_for_workers(s, 3)
        from depin_jupyter.kernel import stream

        real_publish = stream._publish
        stream._publish = lambda data, md: shown.append((data, md))  # what IPython would be handed
        try:
            for seed in range(4):
                ns = {"np": np, "seed": seed}
                runner.run_cell(s, "x = np.random.default_rng(seed).standard_normal(1000)\n"
                                   "total = float(x.sum())\n"
                                   "from IPython.display import display\n"
                                   "display({'text/html': '<b>table</b>'}, raw=True)\n",
                                ns, runner.RunOptions(replicas=3, no_store=True))
                expect = np.random.default_rng(seed).standard_normal(1000)
                assert np.array_equal(ns["x"], expect) and ns["total"] == float(expect.sum())  # no lie bound
        finally:
            stream._publish = real_publish
        events = _attacks(net.attack_log)
        relay = [e for e in events if e["attack"] == "relay"]
        assert relay and all(e["outcome"].startswith("refused") for e in relay), relay
        assert any(e["attack"] == "junk" and e["outcome"].startswith("refused") for e in events), events
        rep = Coordinator.of_client(s.client).reputation()
        mallory = next(n for n in rep if n.startswith("mallory"))
        assert rep[mallory]["invalid"] >= 1 and rep[mallory]["streak"] == 0, (rep, _attacks(net.attack_log)[-6:])
        assert all(rep[h]["invalid"] == 0 and rep[h]["valid"] >= 1 for h in honest if h in rep), rep
        # credit is what the coordinator saw, not what was claimed
        credits = Coordinator.of_client(s.client).credits()
        assert credits[mallory].get("credit", 0.0) < 60.0, credits[mallory]
        assert credits[mallory].get("energy_j", 0.0) < 1e6, credits[mallory]
        assert any(credits[h].get("credit", 0) > 0 for h in honest if h in credits)  # control: honest credit
        # nothing active reached the notebook; the honest display did
        htmls = [d.get("text/html", "") for d, _ in shown]
        assert any("<b>table</b>" in h for h in htmls), shown
        assert not any("script" in h.lower() or "onerror" in h.lower() for h in htmls), htmls
        assert not any("application/javascript" in d for d, _ in shown)
    finally:
        s.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_a_volunteer_cannot_dial_its_peers_or_take_their_address(net):
    probe = _session(net, "probe-peers")
    try:
        workers = {w.name: w.address for w in wait_for_workers(probe, 2)}
        nannies = {a: w["nanny"] for a, w in probe.client.scheduler_info()["workers"].items() if w.get("nanny")}
    finally:
        probe.close()
    peers = sorted(workers.values()) + sorted(nannies.values())
    proc, log, honest = _start_attacker(net, ["peer", "hijack"], DEPIN_ATTACK_PEERS=",".join(peers),
                                        DEPIN_ATTACK_HIJACK=workers["honest-a"])
    s = _session(net, "sci-peers")
    try:
        wait_for_text(net.attack_log, '"ready"', proc, timeout=60)
        events = _attacks(net.attack_log)
        peer = [e for e in events if e["attack"] == "peer"]
        assert len(peer) >= len(peers) and all(e["outcome"] != "answered" for e in peer), peer
        assert not _canaries(net), _canaries(net)  # nothing was unpickled anywhere
        hijack = [e for e in events if e["attack"] == "hijack"]
        assert hijack and "already exists" in hijack[-1]["outcome"], hijack
        names = Coordinator.of_client(s.client).identities()
        assert names[workers["honest-a"]] == "honest-a"  # the victim is still itself
        # honest control: the coordinator itself does reach the workers (the addresses were right)
        ns = {"k": 3}
        runner.run_cell(s, "m = k + 1", ns, runner.RunOptions(replicas=1, no_store=True, worker="honest-a"))
        assert ns["m"] == 4
    finally:
        s.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


# ------------------------------------------------------------------ 8. liveness

def test_a_stopped_volunteer_is_noticed_and_its_cell_runs_elsewhere(tmp_path):
    """SIGSTOP the only volunteer running a cell; another joins. Within the silence timeout the coordinator
    drops the stopped one and the cell runs on the other (nothing waits for Dask's 5-minute worker-ttl)."""
    import psutil

    n = Network(tmp_path, free_port(), env={"DASK_DEPIN__VOLUNTEER__SILENCE_TIMEOUT": "10s"})
    n.start_scheduler()
    stopper, _ = n.start_worker(n.token("worker", "sleepy"))
    s = cluster._connect_token(n.token("client", "sci-liveness"))
    procs = []
    try:
        sleepy = wait_for_workers(s, 1)[0].address
        running = cell_async(s, "import time\ntime.sleep(3)\ndone = 1\n")
        deadline = time.monotonic() + 30
        while sleepy not in {j.get("worker") for j in Coordinator.of_client(s.client).jobs()}:
            assert time.monotonic() < deadline, "the cell never started on the volunteer"
            time.sleep(0.05)
        procs = [psutil.Process(stopper.pid), *psutil.Process(stopper.pid).children(recursive=True)]
        for p in procs:
            p.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        n.start_worker(n.token("worker", "backup"))
        ns, outcome = running.result(timeout=120)
        assert ns["done"] == 1 and outcome.worker != sleepy
        assert "sleepy" not in {w.name for w in s.workers(max_age=0)}
        assert time.monotonic() - stopped_at < 60  # the silence timeout (10 s here), not Dask's 5 minutes
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT)
        s.close()
        n.close()


def test_volunteers_rejoin_a_restarted_coordinator_by_themselves(tmp_path):
    n = Network(tmp_path, free_port())
    n.start_scheduler()
    try:
        proc, log = n.start_worker(n.token("worker", "faithful"))
        n.scheduler.kill()
        n.scheduler.wait(10)
        n.scheduler = None
        time.sleep(1.0)
        n.start_scheduler()
        wait_for_text(log, "rejoined", proc, timeout=120)
        s = cluster._connect_token(n.token("client", "sci-rejoin"))
        try:
            wait_for_workers(s, 1, timeout=60)
            ns = {"a": 1}
            runner.run_cell(s, "b = a + 1", ns, runner.RunOptions(replicas=1, no_store=True))
            assert ns["b"] == 2 and proc.poll() is None
        finally:
            s.close()
    finally:
        n.close()


def test_a_worker_identity_cannot_submit_cells(net):
    """A volunteer's token submits nothing; the same connection may still do what a worker does (control)."""
    tok = Token.decode(net.token("worker", "w-refused"))

    async def call(op: str, **kwargs) -> object:
        from distributed.core import rpc

        async with rpc(tok.address, connection_args=tok.security("worker").get_connection_args("worker")) as sch:
            return await getattr(sch, op)(**kwargs)

    with pytest.raises(Exception, match="worker identity may not call 'depin_submit_cell'"):
        asyncio.run(call("depin_submit_cell", key="depin-run-x-1", spec=b"", inputs=b""))
    assert asyncio.run(call("identity"))["type"] == "DepinScheduler"
