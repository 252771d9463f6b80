"""A volunteer on the machines volunteers have: root without bubblewrap, a Python under a closed /root, and
`depin doctor` telling each gap with its fix. Real sandbox children, real `depin scheduler`/`depin worker`
processes on 127.0.0.1, the real CLI."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import uuid

import numpy as np
import pytest
from conftest import free_port
from volunteer_net import DEPIN, Network, cell_async, wait_for_workers

from depin_jupyter.cli import doctor
from depin_jupyter.kernel import cluster
from depin_jupyter.protocol import payloads
from depin_jupyter.worker import probe, sandbox
from depin_jupyter.worker.sandbox import isolation

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("no_store")]

ROOT = os.geteuid() == 0
CLOSED = ROOT and bool(isolation.unreadable_by_others())
NO_BWRAP = {"DASK_DEPIN__SANDBOX__BUBBLEWRAP": "false"}
needs_closed_home = pytest.mark.skipif(
    not CLOSED, reason="needs a root worker whose Python the sandbox user cannot reach by path (e.g. under /root)")


def _run(code: str, outputs: list[str]) -> dict:
    spec = {"run_id": uuid.uuid4().hex, "name": "t", "code": code, "filename": "<t>", "modules": {},
            "maybe_mutated": [], "outputs": outputs, "last_expr": False}
    payload = sandbox.run_sandboxed(spec, {}, emit=lambda m: None, limits=sandbox.Limits(bubblewrap=False))
    return dict(payloads.from_payload(payload))


# ------------------------------------------------------------------ root without bubblewrap

@needs_closed_home
def test_without_bubblewrap_cells_import_a_python_under_a_closed_home():
    """The case that failed every `np.random` cell: `secrets` (stdlib, under /root) was out of reach."""
    result = _run("import os, secrets, fractions\nimport numpy as np\n"
                  "x = float(np.random.default_rng(7).random())\nuid = os.getuid()\n", ["x", "uid"])
    assert result["status"] == "ok", result.get("error")
    assert result["outputs"]["uid"] == 65534  # really the sandbox user
    assert result["outputs"]["x"] == float(np.random.default_rng(7).random())


@needs_closed_home
def test_the_opened_directories_do_not_open_the_rest_of_root(tmp_path):
    """An attacker's cell climbs out of every directory the sandbox opened: /root's other files stay closed."""
    secret = pathlib.Path("/root") / f"depin-secret-{uuid.uuid4().hex}"
    secret.write_text("root's secret")
    secret.chmod(0o644)  # readable by anyone who can reach it: only the closed /root protects it
    try:
        code = (f"import os\nname = {secret.name!r}\nread = []\ntried = 0\n"
                "for fd in os.listdir('/proc/self/fd'):\n"
                "    base = f'/proc/self/fd/{fd}'\n"
                "    if not os.path.isdir(base):\n"
                "        continue\n"
                "    for up in range(12):\n"
                "        tried += 1\n"
                "        try:\n"
                "            read.append(open(base + '/..' * up + '/' + name).read())\n"
                "        except OSError:\n"
                "            pass\n"
                "try:\n"
                "    read.append(open('/root/' + name).read())\n"
                "except OSError:\n"
                "    pass\n"
                "try:\n"
                "    listing = os.listdir('/root')\n"
                "except OSError:\n"
                "    listing = None\n")
        result = _run(code, ["read", "tried", "listing"])
        assert result["status"] == "ok", result.get("error")
        assert result["outputs"]["tried"] > 12  # it had opened directories to climb from
        assert result["outputs"]["read"] == [] and result["outputs"]["listing"] is None
    finally:
        secret.unlink()


def test_describe_says_how_a_closed_home_is_reached():
    lines = "\n".join(sandbox.describe(sandbox.Limits(bubblewrap=False))["lines"])
    if CLOSED:
        assert "opens those directories before it switches user" in lines
    else:
        assert "opens those directories" not in lines


# ------------------------------------------------------------------ the probe at `depin worker` start

def test_probe_reports_numpy_and_leaves_out_what_a_cell_cannot_find():
    report = probe.probe({"numpy", "json", "depin_no_such_module_here"})
    assert report.usable, report
    assert report.errors == {} and report.missing == []  # not found here either: not the sandbox's doing
    assert report.uid == (65534 if ROOT else os.geteuid())


def test_probe_stopped_by_a_limit_names_the_setting(monkeypatch):
    import dask.config

    with dask.config.set({"depin.sandbox.wall-time": "1ms"}):
        report = probe.probe({"numpy"})
    assert not report.usable and report.limit == "wall-time", report
    assert "depin.sandbox.wall-time" in probe.fix_for(report)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    n = Network(tmp_path_factory.mktemp("fresh-net"), free_port())
    n.start_scheduler()
    yield n
    n.close()


@pytest.mark.skipif(not ROOT, reason="switching cells to an unprivileged user needs a root worker")
def test_a_root_worker_without_bubblewrap_serves_numpy_random_cells(net):
    proc, log = net.start_worker(net.token("worker", "nobwrap"), env=NO_BWRAP)
    text = log.read_text()
    assert "sandbox probe (cells run as uid 65534): numpy and numpy.random work" in text
    session = cluster._connect_token(net.token("client", "fresh-alice"))
    try:
        wait_for_workers(session, 1)
        ns, _ = cell_async(session, "import os\nimport numpy as np\nx = float(np.random.default_rng(5).random())\n"
                                    "uid = os.getuid()\n").result(timeout=180)
        assert ns["uid"] == 65534 and ns["x"] == float(np.random.default_rng(5).random())
    finally:
        session.close()
        proc.terminate()
        proc.wait(60)


def test_a_worker_whose_sandbox_cannot_run_a_cell_refuses_to_start(net):
    proc, log = net.start_worker(net.token("worker", "starved"), wait=False,
                                 env={"DASK_DEPIN__SANDBOX__WALL_TIME": "1ms"})
    assert proc.wait(120) == 1
    text = log.read_text()
    assert "refusing to start" in text and "Fix: raise depin.sandbox.wall-time" in text
    assert "depin worker: joined" not in text


# ------------------------------------------------------------------ depin doctor

def _doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DEPIN, "doctor", *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, **(env or {})})


def test_doctor_checks_the_coordinator_and_exits_zero_when_all_is_well(net):
    out = _doctor("--scheduler", net.token("worker", "doc"), "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    checks = {c["name"]: c for c in json.loads(out.stdout)}
    assert checks["sandbox probe"]["status"] == "ok"
    assert checks["coordinator"]["status"] == "ok" and "round trip" in checks["coordinator"]["detail"]
    assert checks["clock skew"]["status"] == "ok"  # one machine, one clock
    assert checks["versions vs coordinator"]["status"] == "ok"
    assert checks["gpu"]["status"] in ("ok", "info")


def test_doctor_fails_with_the_fix_when_the_coordinator_is_away(tmp_path):
    away = Network(tmp_path, free_port())  # a coordinator's tokens, but no coordinator running
    away.state.init(away.address)
    out = _doctor("--scheduler", away.token("client", "lonely"), "--no-probe")
    assert out.returncode == 1, out.stdout
    assert "FAIL coordinator" in out.stdout and "check that `depin scheduler` runs there" in out.stdout


def test_doctor_without_bubblewrap_warns_and_names_the_package():
    out = _doctor("--no-probe", env=NO_BWRAP)
    assert out.returncode == 0, out.stdout
    assert "warn bubblewrap: off" in out.stdout and "apt-get install bubblewrap" in out.stdout


def test_versions_that_differ_from_the_coordinator_fail_with_the_pins():
    from depin_jupyter.protocol.versions import stack_versions

    theirs = {**stack_versions(), "distributed": "1999.1.0", "python": "3.99.0"}
    found = {c.name: c for c in doctor._compare_versions(theirs)}
    assert found["versions vs coordinator"].status == "fail"
    assert "distributed==1999.1.0" in found["versions vs coordinator"].fix
    assert found["python vs coordinator"].status == "warn"
    same = {c.name: c for c in doctor._compare_versions(stack_versions())}
    assert same["versions vs coordinator"].status == "ok" and "python vs coordinator" not in same


def test_doctor_is_on_the_command_line():
    out = subprocess.run([sys.executable, "-m", "depin_jupyter.cli", "doctor", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--scheduler" in out.stdout


# ------------------------------------------------------------------ large inputs are not "changed in place"

@pytest.mark.parametrize("bwrap", [False, "auto"], ids=["no-bwrap", "auto"])
def test_reading_one_element_of_a_large_input_changes_nothing(bwrap):
    """From 16 MiB inputs are hashed in pieces on threads: a sandbox where that failed reported them changed."""
    for mib in (15, 16, 64):
        a = np.arange(mib * 2**20 // 8, dtype=np.float64)
        spec = {"run_id": uuid.uuid4().hex, "name": "t", "code": "s = float(a[0])\na[1] = a[1]\n", "filename": "<t>",
                "modules": {}, "maybe_mutated": ["a"], "outputs": ["s"], "last_expr": False}
        payload = sandbox.run_sandboxed(spec, {"a": a}, emit=lambda m: None, limits=sandbox.Limits(bubblewrap=bwrap))
        result = payloads.from_payload(payload)
        assert result["status"] == "ok", result.get("error")
        assert result["outputs"]["s"] == 0.0 and result.get("mutated", {}) == {}, mib
    changed = {**spec, "run_id": uuid.uuid4().hex, "code": "a[-1] = -1.0\n", "outputs": None}
    result = payloads.from_payload(sandbox.run_sandboxed(changed, {"a": a}, emit=lambda m: None,
                                                         limits=sandbox.Limits(bubblewrap=bwrap)))
    assert list(result.get("mutated", {})) == ["a"]  # a real change is still seen


def test_a_large_array_s_content_hash_does_not_depend_on_threads_or_cores(monkeypatch):
    from depin_jupyter.protocol import values

    a = np.random.default_rng(0).random(5 * 2**20)  # 40 MiB
    threaded = values.content_hash(a)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert values.content_hash(a) == threaded
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    monkeypatch.setattr(values, "_hash_pool", None)
    assert values.content_hash(a) == threaded
    b = a.copy()
    b[-1] += 1
    assert values.content_hash(b) != threaded


# ------------------------------------------------------------------ slow links are not dead peers

def test_a_slow_link_is_waited_for_and_a_dead_port_is_named(net, capsys):
    """At 1.5 s round trips the TLS handshake alone takes longer than a 1 s connect timeout: the kernel
    measures the link and waits, instead of calling a reachable coordinator unreachable."""
    import dataclasses

    import dask.config
    from delay_proxy import DelayProxy

    from depin_jupyter.errors import ClusterConnectionError
    from depin_jupyter.protocol.identity import Token

    proxy = DelayProxy(net.port)
    proxy.rtt = 1.5
    token = dataclasses.replace(Token.decode(net.token("client", "far-away")), address=f"tls://127.0.0.1:{proxy.port}")
    try:
        with dask.config.set({"depin.connect-timeout": "1s"}):
            session = cluster._connect_token(token.encode())
        session.close()
        assert "the link to" in capsys.readouterr().out  # said why it waited, on stdout: a note
        dead = dataclasses.replace(token, address=f"tls://127.0.0.1:{free_port()}")
        with dask.config.set({"depin.connect-timeout": "3s"}), \
                pytest.raises(ClusterConnectionError, match="nothing answers there"):
            cluster._connect_token(dead.encode())
    finally:
        proxy.close()


def test_a_leaving_worker_drops_only_its_connection_closed_tracebacks():
    import logging

    from distributed.comm.core import CommClosedError
    from distributed.core import Status

    from depin_jupyter.worker._dask import QuietWhileLeaving

    class W:
        status = Status.running

    quiet = QuietWhileLeaving(W())

    def record(msg: str, exc: BaseException | None = None) -> logging.LogRecord:
        info = (type(exc), exc, None) if exc is not None else None
        return logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, msg, (), info)

    closed = record("Failed to communicate with scheduler during heartbeat.", CommClosedError("in <TLS>"))
    assert quiet.filter(closed)  # while working: every error is shown
    W.status = Status.closing_gracefully
    assert not quiet.filter(closed)  # leaving: the expected one is dropped
    assert not quiet.filter(record("Connection closed: CommClosedError"))
    assert quiet.filter(record("something else failed", ValueError("real")))  # the rest still is shown
