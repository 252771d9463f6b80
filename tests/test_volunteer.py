"""The volunteer network end to end: real `depin scheduler` and `depin worker` processes on 127.0.0.1,
mutual TLS, roles, revocation, NATed volunteers, a malicious volunteer, churn and credit."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import pathlib
import random
import signal
import threading
import time

import numpy as np
import pytest
from conftest import free_port
from volunteer_net import Network, cell_async, running_on, wait_for_text, wait_for_workers

from depin_jupyter.errors import ClusterConnectionError, DepinUsageError, RemoteExecutionError, WorkerLostError
from depin_jupyter.kernel import cluster, runner
from depin_jupyter.network.coordinator import StateDir
from depin_jupyter.protocol.identity import Token

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("no_store")]
HERE = pathlib.Path(__file__).parent


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    n = Network(tmp_path_factory.mktemp("volunteer-net"), free_port())
    n.start_scheduler()
    yield n
    n.close()



def _session(token: str) -> cluster.Session:
    return cluster._connect_token(token)  # not the kernel's global session: other tests keep theirs


# ------------------------------------------------------------------ tokens and refusals

def test_tokens_issued_at_once_are_all_registered(tmp_path):
    """The scheduler issues its first tokens while `depin token issue` may run: no issued token is lost."""
    state = StateDir(tmp_path / "s")
    state.init("tls://127.0.0.1:1")
    errors: list[BaseException] = []

    def issue(k: int) -> None:
        try:
            for i in range(5):
                StateDir(tmp_path / "s").issue_token("worker", f"w{k}-{i}")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=issue, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    names = {c["name"] for c in state.registry()["certificates"]}
    assert names >= {f"w{k}-{i}" for k in range(8) for i in range(5)}
    state.revoke("w3-1")  # and a revocation sees them all
    assert len(state.registry()["certificates"]) == 41


def test_token_is_one_string_and_damage_is_explained(net):
    text = net.token("client", "alice")
    assert text.startswith("depin1-") and "\n" not in text
    tok = Token.decode(text)
    assert tok.address == net.address and tok.info.name == "alice" and tok.info.role == "client"
    with pytest.raises(DepinUsageError, match="damaged"):
        Token.decode(text[:-20])
    with pytest.raises(DepinUsageError, match="for a client .* not a worker"):
        tok.check_valid("worker")
    path = net.root / "alice.token"
    path.write_text(text + "\n")
    assert Token.decode(str(path)) == tok  # a token file works as well as the string


def test_plain_tcp_is_refused(net):
    with pytest.raises(ClusterConnectionError, match="no Dask scheduler answered"):
        cluster._connect_address(f"tcp://127.0.0.1:{net.port}")


def test_certificate_from_another_ca_is_refused(net, tmp_path):
    other = StateDir(tmp_path / "other")
    other.init(net.address)  # same address, different authority
    with pytest.raises(ClusterConnectionError, match="refused this certificate"):
        _session(other.issue_token("client", "mallory").encode())
    wait_for_text(net.scheduler_log, "TLS handshake failed", net.scheduler, timeout=10)


def test_expired_certificate_is_refused_on_both_sides(net):
    from distributed import Client

    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=1)
    tok = Token.decode(net.token("client", "late", not_after=past))
    with pytest.raises(DepinUsageError, match="expired on"):
        _session(tok.encode())  # refused locally, with the date
    with pytest.raises((OSError, TimeoutError)):  # and by the coordinator when the local check is bypassed
        Client(tok.address, security=tok.security("client"), timeout=3, set_as_default=False)
    wait_for_text(net.scheduler_log, "expired", net.scheduler, timeout=10)


def test_revoked_token_cannot_connect_again(net):
    text = net.token("client", "carol")
    s = _session(text)
    assert s.client.scheduler_info()["address"] == net.address
    s.close()
    net.state.revoke("carol")
    with pytest.raises(ClusterConnectionError, match="revoked"):
        _session(text)
    wait_for_text(net.scheduler_log, "the token of 'carol' was revoked", net.scheduler, timeout=10)


def test_worker_identity_cannot_act_as_client(net):
    from distributed import Client
    from distributed.core import rpc

    tok = Token.decode(net.token("worker", "sneaky"))
    with pytest.raises(DepinUsageError, match="for a worker"):
        _session(tok.encode())
    with pytest.raises(ImportError, match="refused by the coordinator: a worker identity may not call "
                                          "'register-client'"):
        Client(tok.address, security=tok.security("client"), timeout=10, set_as_default=False)

    async def run_on_scheduler() -> None:
        async with rpc(tok.address, connection_args=tok.security("worker").get_connection_args("worker")) as s:
            await s.run_function(function=b"x", args=(), kwargs={})

    with pytest.raises(Exception, match="refused by the coordinator: a worker identity may not call "
                                        "'run_function'"):
        asyncio.run(run_on_scheduler())

    async def put_input() -> None:  # a volunteer cannot plant inputs for other volunteers' cells
        async with rpc(tok.address, connection_args=tok.security("worker").get_connection_args("worker")) as s:
            await s.depin_input_put(key="depin-input-xxh3-0", data=b"planted")

    with pytest.raises(Exception, match="a worker identity may not call 'depin_input_put'"):
        asyncio.run(put_input())

    async def read_input() -> None:  # nor read inputs of cells it is not running (a content key is guessable)
        async with rpc(tok.address, connection_args=tok.security("worker").get_connection_args("worker")) as s:
            await s.depin_input_get(key="depin-input-xxh3-0", task="depin-run-someone-else-000000", index=0)

    with pytest.raises(Exception, match="refused input reads for 'depin-run-someone-else-000000' from 'sneaky'"):
        asyncio.run(read_input())


def test_client_identity_cannot_read_inputs_held_for_volunteers(net):
    s = _session(net.token("client", "curious"))
    try:
        with pytest.raises(Exception, match="a client identity may not 'depin_input_get'"):
            s.client.sync(s.client.scheduler.depin_input_get, key="depin-input-xxh3-0")
    finally:
        s.close()


def test_client_identity_cannot_register_as_worker(net):
    from distributed import Worker

    tok = Token.decode(net.token("client", "pretender"))

    async def join() -> None:
        async with Worker(tok.address, security=tok.security("worker"), nthreads=1):
            pass

    with pytest.raises(Exception) as info:
        asyncio.run(join())
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("refused by the coordinator" in c and "register-worker" in c for c in chain), chain


def test_worker_may_only_retire_itself(net):
    from distributed.core import rpc

    proc, _ = net.start_worker(net.token("worker", "victim"))
    other = Token.decode(net.token("worker", "rival"))
    s = _session(net.token("client", "watcher"))
    try:
        victim = wait_for_workers(s, 1)[0].address

        async def retire() -> None:
            args = other.security("worker").get_connection_args("worker")
            async with rpc(other.address, connection_args=args) as sched:
                await sched.retire_workers(workers=[victim], close_workers=True, stimulus_id="x")

        with pytest.raises(Exception, match="may only retire its own workers"):
            asyncio.run(retire())
        assert victim in {w.address for w in s.workers(max_age=0)}
    finally:
        s.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


# ------------------------------------------------------------------ a NATed volunteer, results relayed

def test_nated_volunteer_serves_cells_through_the_relay(net):
    # The worker advertises an address nobody can reach (port 9, discard): anything that dials it fails.
    proc, log = net.start_worker(net.token("worker", "natvol"), "--contact-address", "tls://127.0.0.1:9")
    s = _session(net.token("client", "scientist-nat"))
    try:
        ws = wait_for_workers(s, 1)
        assert [w.address for w in ws] == ["tls://127.0.0.1:9"]
        info = s.client.scheduler_info()["workers"]["tls://127.0.0.1:9"]["depin"]
        assert info["cpu"]["cores"] == os.cpu_count() and "numpy" in info["versions"]
        ns = {"a": np.arange(12.0).reshape(3, 4), "scale": 3}

        class Opaque:
            pass

        out = runner.run_cell(s, "b = a * scale\nc = {'n': int(b.sum()), 't': (1, 2.5)}\n"
                                 "print('on the volunteer', b.shape)\nclass K: pass\nk = K()\n", ns)
        assert isinstance(ns["b"], np.ndarray) and np.array_equal(ns["b"], np.arange(12.0).reshape(3, 4) * 3)
        assert ns["c"] == {"n": 198, "t": (1, 2.5)}
        assert "k" not in ns and "K" not in ns  # arbitrary objects do not travel back without pickle
        assert out.worker == "tls://127.0.0.1:9"
        with pytest.raises(ZeroDivisionError):  # the cell's own error arrives as text, re-raised by type name
            runner.run_cell(s, "1 / 0", {})
    finally:
        s.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert "left gracefully" in log.read_text()


def _input_stats(s: cluster.Session) -> dict:
    return s.client.sync(s.client.scheduler.depin_input_stats)


def test_a_reused_input_crosses_the_network_once(net):
    """Array inputs go to the coordinator once; the (NATed) volunteer fetches them once and keeps them."""
    proc, _ = net.start_worker(net.token("worker", "cachevol"), "--contact-address", "tls://127.0.0.1:9")
    s = _session(net.token("client", "scientist-cache"))
    try:
        wait_for_workers(s, 1)
        a = np.random.default_rng(7).random(2**20)  # 8 MiB
        first_value = float(a[0])
        ns = {"a": a}
        here = runner.RunOptions(worker="cachevol", replicas=1)  # this volunteer only, whoever else is connected
        before = _input_stats(s)
        out = runner.run_cell(s, "t = float(a.sum())", ns, here)
        assert ns["t"] == float(a.sum()) and out.sent_bytes >= a.nbytes and out.reused_inputs == []
        out = runner.run_cell(s, "u = float((a * 2).sum())", ns, here)
        assert ns["u"] == float((a * 2).sum())
        assert out.sent_bytes < 64 * 1024 and out.reused_inputs == ["a"]  # nothing sent the second time
        mid = _input_stats(s)
        assert mid["puts"] - before["puts"] == 1 and mid["gets"] - before["gets"] == 1  # the volunteer kept it
        # A cell that changes its input in place: the change comes back, and what the volunteer keeps does
        # not change with it (it keeps bytes, not the object the cell got).
        runner.run_cell(s, "a[0] = -1.0", ns, here)
        assert a[0] == -1.0
        a[0] = first_value  # the original content again: the same key, served from the volunteer's cache
        out = runner.run_cell(s, "f = float(a[0])", ns, here)
        assert out.reused_inputs == ["a"] and ns["f"] == first_value
        assert _input_stats(s)["gets"] == mid["gets"]
    finally:
        s.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_an_input_the_coordinator_dropped_is_sent_again(tmp_path, monkeypatch):
    """Two 12 MiB inputs and a 20 MiB input cache: the second drops the first, which the next cell sends again.
    An upload that never comes (its notebook's link died): the volunteer is told after the stall time, and the
    notebook re-runs the cell with its inputs inside the task. No error, the right result."""
    n = Network(tmp_path, free_port(), env={"DASK_DEPIN__COORDINATOR__INPUT_CACHE_BYTES": "20MiB",
                                            "DASK_DEPIN__COORDINATOR__UPLOAD_STALL": "1s"})
    n.start_scheduler()
    try:
        n.start_worker(n.token("worker", "smallcache"))
        n.start_worker(n.token("worker", "smallcache-2"))
        s = _session(n.token("client", "sci-evict"))
        wait_for_workers(s, 2)
        rng = np.random.default_rng(3)
        ns = {"a": rng.random(3 * 2**19), "b": rng.random(3 * 2**19)}  # 12 MiB each
        one = runner.RunOptions(replicas=1)
        runner.run_cell(s, "t = float(a.sum())", ns, one)
        runner.run_cell(s, "u = float(b.sum())", ns, one)
        assert _input_stats(s)["evicted"] >= 1
        out = runner.run_cell(s, "t = float(a.sum() * 2)", ns, one)
        assert ns["t"] == float(ns["a"].sum() * 2) and out.sent_bytes >= 12 * 2**20 and out.reused_inputs == []
        # the upload of c never comes: the volunteer waits 1 s for its first part, then the cell goes inline
        from depin_jupyter.kernel import shipping

        monkeypatch.setattr(shipping, "_stream_inputs", lambda coordinator, uploads: None)
        stats = _input_stats(s)
        ns["c"] = rng.random(3 * 2**19)
        out = runner.run_cell(s, "v = float(c.sum())", ns, one)
        assert ns["v"] == float(ns["c"].sum())
        assert _input_stats(s)["misses"] >= stats["misses"] + 1
        assert out.sent_bytes >= 12 * 2**20  # the run that worked: c inside the task
        # replicated: both volunteers miss it; the whole replicated run goes again, inline
        ns["d"] = rng.random(3 * 2**19)
        out = runner.run_cell(s, "w = float(d.sum())", ns, runner.RunOptions(replicas=2))
        assert ns["w"] == float(ns["d"].sum())
        assert _input_stats(s)["misses"] >= stats["misses"] + 3
        s.close()
    finally:
        n.close()


def test_malicious_volunteer_cannot_make_the_kernel_unpickle(net, tmp_path):
    target = tmp_path / "pwned"
    proc, _ = net.start_worker(net.token("worker", "evil"), env={
        "DEPIN_EVIL_TARGET": str(target),
        "DASK_DISTRIBUTED__WORKER__PRELOAD": json.dumps([str(HERE / "evil_volunteer.py")])})
    s = _session(net.token("client", "scientist-evil"))
    try:
        wait_for_workers(s, 1)
        with pytest.raises(RemoteExecutionError, match="refused.*Nothing from it was unpickled"):
            runner.run_cell(s, "x = 1", {})
        with pytest.raises(RemoteExecutionError, match="task failed on volunteer 'evil'"):
            runner.run_cell(s, "EVIL_RAISE = 1", {})
        assert [w.name for w in s.workers(max_age=0)] == ["evil"]  # the kernel's connection is still fine
    finally:
        s.close()
        proc.kill()
        proc.wait(30)
    victims = {os.getpid(): "the kernel", net.scheduler.pid: "the coordinator"}
    hit = [(p.name, victims[int(p.name.rsplit(".", 1)[1])]) for p in tmp_path.glob("pwned*")
           if int(p.name.rsplit(".", 1)[1]) in victims]
    assert not hit, f"a volunteer's pickle was unpickled by {hit}"


def test_unpickle_guard_refuses_pickled_frames_from_worker_identities(tmp_path):
    from distributed.protocol import dumps, loads
    from distributed.protocol.serialize import ToPickle

    from depin_jupyter.network._scheduler import _UNTRUSTED, install_unpickle_guard

    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "guard"), "w"))

    frames = dumps({"op": "log-event", "msg": ToPickle(Boom())})
    install_unpickle_guard()
    token = _UNTRUSTED.set("evil")
    try:
        with pytest.raises(Exception, match="refused to unpickle data sent by 'evil'"):
            loads(frames)
    finally:
        _UNTRUSTED.reset(token)
    assert not (tmp_path / "guard").exists()
    loads(dumps({"op": "x", "msg": ToPickle(3)}))  # clients' messages are unaffected


def test_status_shows_volunteer_hardware(net):
    proc, _ = net.start_worker(net.token("worker", "showme"))
    s = _session(net.token("client", "scientist-status"))
    try:
        ws = wait_for_workers(s, 1)
        assert any(w.name == "showme" for w in ws)
    finally:
        s.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


# ------------------------------------------------------------------ joining and leaving

def test_unreachable_scheduler_retries_with_backoff_then_joins(tmp_path):
    n = Network(tmp_path, free_port(), env={"DASK_DEPIN__VOLUNTEER__JOIN_RETRY_INITIAL": "0.3s"})
    n.state.init(n.address)
    try:
        proc, log = n.start_worker(n.token("worker", "patient"), wait=False)
        wait_for_text(log, "retrying in 0.3s (try 2)", proc)
        text = wait_for_text(log, "retrying in 0.6s (try 3)", proc)
        assert "is unreachable" in text
        n.start_scheduler()
        wait_for_text(log, "depin worker: joined", proc)
    finally:
        n.close()


def test_sigterm_hands_work_back_without_killed_worker(tmp_path):
    # allowed-failures 0: any worker lost without a graceful retirement fails its tasks with KilledWorker.
    n = Network(tmp_path, free_port(), env={"DASK_DEPIN__COORDINATOR__ALLOWED_FAILURES": "0",
                                            "OMP_NUM_THREADS": "1"})
    n.start_scheduler()
    try:
        leaving, log = n.start_worker(n.token("worker", "leaver"), "--nthreads", "2")
        staying, _ = n.start_worker(n.token("worker", "stayer"), "--nthreads", "2")
        s = _session(n.token("client", "sci"))
        wait_for_workers(s, 2)
        leaver = next(w.address for w in s.workers(max_age=0) if w.name == "leaver")

        cell = "import time\ntime.sleep(1.5)\ny = i * i\n"
        futures = [cell_async(s, cell, {"i": i}) for i in range(20)]
        deadline = time.monotonic() + 30
        while not running_on(s).get(leaver) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running_on(s).get(leaver), "the leaving worker never got a cell"
        leaving.send_signal(signal.SIGTERM)
        assert [f.result(timeout=120)[0]["y"] for f in futures] == [i * i for i in range(20)]
        assert leaving.wait(30) == 0
        assert "left gracefully" in log.read_text()

        # The same cluster does fail cells when a worker is lost abruptly: the check above can fail.
        import psutil

        f = cell_async(s, cell, {"i": 99})
        while not any(running_on(s).values()):
            time.sleep(0.05)
        for child in psutil.Process(staying.pid).children(recursive=True):
            try:
                child.kill()
            except psutil.NoSuchProcess:  # a sandbox child that ended on its own meanwhile
                pass
        with pytest.raises(WorkerLostError, match="lost"):
            f.result(timeout=60)
        s.close()
    finally:
        n.close()


CELL = """
import time
rng = np.random.default_rng(seed)
x = rng.standard_normal((200, 200))
for _ in range(30):
    x = np.tanh(x @ x.T / 200.0)
    time.sleep(0.03)
total = float(x.sum())
del rng
"""


def test_kill_9_during_cells_every_cell_completes_equal_to_a_clean_run(tmp_path):
    import psutil

    n = Network(tmp_path, free_port(), env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    n.start_scheduler()
    try:
        for i in range(3):
            n.start_worker(n.token("worker", f"churn{i}"))
        s = _session(n.token("client", "sci"))
        wait_for_workers(s, 3)
        clean: dict[int, tuple[np.ndarray, float]] = {}
        for seed in range(4):
            ns = {"np": np, "seed": seed}
            runner.run_cell(s, CELL, ns)
            clean[seed] = (ns["x"], ns["total"])
        rnd = random.Random(1234)
        killed = 0
        for trial in range(20):
            wait_for_workers(s, 3)
            seed = trial % 4
            done = threading.Event()

            def killer() -> None:
                nonlocal killed
                while not done.is_set():  # wait until the cell is running somewhere, then a random moment
                    busy = [a for a, keys in running_on(s).items() if keys]
                    if busy:
                        break
                    time.sleep(0.01)
                time.sleep(rnd.uniform(0.0, 0.8))
                if done.is_set():
                    return
                workers = s.client.scheduler_info()["workers"]
                victim = rnd.choice(sorted(workers))
                pid = workers[victim]["depin"]["pid"]
                if psutil.pid_exists(pid):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1

            t = threading.Thread(target=killer)
            t.start()
            ns = {"np": np, "seed": seed}
            try:
                runner.run_cell(s, CELL, ns)
            finally:
                done.set()
                t.join()
            assert np.array_equal(ns["x"], clean[seed][0]) and ns["total"] == clean[seed][1], trial
        assert killed >= 15  # the kills really happened during the cells
        s.close()
    finally:
        n.close()


# ------------------------------------------------------------------ credit (last: it restarts the coordinator)

def test_credit_is_recorded_per_volunteer_and_survives_a_restart(net):
    from click.testing import CliRunner

    from depin_jupyter.cli import main

    proc, _ = net.start_worker(net.token("worker", "earner"))
    s = _session(net.token("client", "payer"))
    try:
        wait_for_workers(s, 1)
        runner.run_cell(s, "import time\ntime.sleep(0.5)\ny = 1", {}, runner.RunOptions(worker="earner"))
    finally:
        s.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    deadline = time.monotonic() + 10
    while "earner" not in net.state.credits() and time.monotonic() < deadline:
        time.sleep(0.2)
    before = net.state.credits()["earner"]
    assert before["cpu_seconds"] >= 0.5 and before["tasks"] >= 1 and before["gpu_seconds"] == 0
    assert net.stop_scheduler() == 0
    net.start_scheduler()
    res = CliRunner().invoke(main, ["credits", "--state-dir", str(net.state.path), "--json"])
    assert res.exit_code == 0, res.output
    after = json.loads(res.output)["earner"]
    assert {k: v for k, v in after.items() if k != "trust"} == before and "trust" in after
    res = CliRunner().invoke(main, ["credits", "--state-dir", str(net.state.path)])
    assert "earner" in res.output and "CPU-SECONDS" in res.output


def test_token_cli_issue_list_revoke(net, tmp_path):
    from click.testing import CliRunner

    from depin_jupyter.cli import main

    sd = ["--state-dir", str(net.state.path)]
    out = tmp_path / "dave.token"
    r = CliRunner().invoke(main, ["token", "issue", "--role", "worker", "--name", "dave", "--out", str(out), *sd])
    assert r.exit_code == 0, r.output
    assert oct(out.stat().st_mode & 0o777) == "0o600" and Token.decode(str(out)).info.name == "dave"
    r = CliRunner().invoke(main, ["token", "list", *sd])
    assert any(line.split()[:2] == ["dave", "worker"] and line.endswith("valid") for line in r.output.splitlines())
    r = CliRunner().invoke(main, ["token", "revoke", "dave", *sd])
    assert r.exit_code == 0 and "revoked 1" in r.output
    r = CliRunner().invoke(main, ["token", "list", *sd])
    assert any(line.split()[:2] == ["dave", "worker"] and line.endswith("revoked") for line in r.output.splitlines())
    r = CliRunner().invoke(main, ["token", "revoke", "nobody", *sd])
    assert r.exit_code != 0 and "no live certificate" in r.output


def test_magic_connect_takes_a_token_and_a_bad_one_changes_nothing(ip, net, tmp_path):
    from IPython.core.error import UsageError

    before = cluster.current_session()
    with pytest.raises(UsageError, match="damaged"):
        ip.run_line_magic("depin", "connect depin1-notatoken")
    path = tmp_path / "worker.token"
    path.write_text(net.token("worker", "wrong-role"))
    with pytest.raises(UsageError, match="for a worker"):
        ip.run_line_magic("depin", f"connect {path}")
    assert cluster.current_session() is before  # the failed connects left the kernel's connection alone


def test_a_lying_volunteer_is_caught_every_time_and_loses_its_streak_and_credit(tmp_path):
    n = Network(tmp_path, free_port())
    n.start_scheduler()
    try:
        n.start_worker(n.token("worker", "honest-a"))
        n.start_worker(n.token("worker", "honest-b"))
        n.start_worker(n.token("worker", "liar"), env={
            "DASK_DISTRIBUTED__WORKER__PRELOAD": json.dumps([str(HERE / "liar_volunteer.py")])})
        s = _session(n.token("client", "sci"))
        wait_for_workers(s, 3)
        x = np.linspace(0.0, 1.0, 64)
        cell = "y = np.sin(x) + np.random.default_rng().normal(0, 1e-13, x.shape)\nk = int((y > 0.5).sum())"
        for _ in range(100):
            ns = {"np": np, "x": x}
            runner.run_cell(s, cell, ns, runner.RunOptions(replicas=2, rtol=1e-9, atol=1e-12))
            assert np.allclose(ns["y"], np.sin(x), rtol=1e-9, atol=1e-12)  # no lie accepted
            assert ns["k"] == int((np.sin(x) > 0.5).sum())
        rep = s.client.sync(s.client.scheduler.depin_reputation)
        assert rep["liar"]["checked"] > 10 and rep["liar"]["valid"] == 0  # every lie was caught
        assert rep["liar"]["invalid"] == rep["liar"]["checked"] and rep["liar"]["streak"] == 0
        for honest in ("honest-a", "honest-b"):  # honest noise within tolerance is accepted
            assert rep[honest]["invalid"] == 0 and rep[honest]["streak"] == rep[honest]["checked"] > 10
        credits = s.client.sync(s.client.scheduler.depin_credits)
        assert credits["liar"]["invalid_tasks"] == rep["liar"]["invalid"]
        assert credits["liar"]["withheld_seconds"] > 0 and credits["liar"]["cpu_seconds"] < 1e-6
        s.close()
    finally:
        n.close()


def test_status_shows_volunteers_and_their_trust(net):
    from depin_jupyter.kernel.magics import format_status

    proc, _ = net.start_worker(net.token("worker", "trusty"))
    s = _session(net.token("client", "sci-trust"))
    try:
        wait_for_workers(s, 1)
        text = format_status(s)
        assert "volunteer" in text and "trust" in text
        line = next(ln for ln in text.splitlines() if ln.startswith("trusty"))
        assert "new (always replicated)" in line
    finally:
        s.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_sandbox_on_a_volunteer_stops_bad_cells_and_the_worker_takes_the_next(net, tmp_path):
    import secrets

    from depin_jupyter.worker import sandbox

    if not sandbox.describe()["bubblewrap"]["active"] and os.geteuid() != 0:
        pytest.skip("neither bubblewrap nor a root worker (uid drop) to hide the home directory here")
    secret = pathlib.Path.home() / f".depin-volunteer-secret-{secrets.token_hex(4)}"
    secret.write_text("the volunteer's secret")
    secret.chmod(0o600)
    proc, _ = net.start_worker(net.token("worker", "boxed"), env={"DASK_DEPIN__SANDBOX__MEMORY": "300MiB"})
    s = _session(net.token("client", "sci-boxed"))
    try:
        wait_for_workers(s, 1)
        with pytest.raises((FileNotFoundError, PermissionError)):
            runner.run_cell(s, f"data = open({str(secret)!r}).read()", {})
        with pytest.raises(Exception, match="depin.sandbox.memory"):
            runner.run_cell(s, "import numpy as np\nbig = np.ones(2**30 // 8 * 1)\n", {})
        ns: dict = {}
        runner.run_cell(s, "import os\nok = os.getcwd()", ns)  # the worker survived and takes the next cell
        assert ns["ok"] != os.getcwd() and proc.poll() is None
    finally:
        secret.unlink()
        s.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
