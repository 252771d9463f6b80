"""Pools, private data and energy (issue #11), with real processes: a coordinator, a `lab` worker (pool from
its certificate, no sandbox) and a `volunteer` worker (default pool, sandboxed, counting every byte it
receives). Plus the pure parts: pool marks in certificates, the claim filter, the privacy rule, RAPL math."""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import time

import numpy as np
import pytest
from conftest import free_port
from volunteer_net import Network, wait_for_text, wait_for_workers

from depin_jupyter import reports
from depin_jupyter.errors import DepinUsageError, NoSuitableWorkerError
from depin_jupyter.kernel import cluster, runner
from depin_jupyter.network.coordinator import StateDir
from depin_jupyter.network.gate import grant_pool
from depin_jupyter.protocol.constants import POOL_CAPACITY
from depin_jupyter.protocol.identity import Token, cert_pool
from depin_jupyter.worker import energy

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_store")]
HERE = os.path.dirname(__file__)
MARK_PRIVATE = secrets.token_bytes(32)
MARK_CONTROL = secrets.token_bytes(32)


# ------------------------------------------------------------------ pure parts

def test_pool_is_written_into_the_certificate_and_the_registry(tmp_path):
    state = StateDir(tmp_path / "s")
    state.init("tls://127.0.0.1:1")
    lab = Token.decode(state.issue_token("worker", "lab-box", pool="lab").encode())
    home = Token.decode(state.issue_token("worker", "home").encode())
    assert cert_pool(lab.cert) == "lab" and cert_pool(home.cert) == "volunteer"
    pools = {c["name"]: c.get("pool") for c in state.registry()["certificates"]}
    assert pools["lab-box"] == "lab" and pools["home"] == "volunteer"
    with pytest.raises(DepinUsageError, match="--pool is for worker tokens"):
        state.issue_token("client", "sci", pool="lab")
    with pytest.raises(DepinUsageError, match="invalid pool name"):
        state.issue_token("worker", "x", pool="lab/../other")


def test_claimed_pools_are_replaced_by_the_certificate_pool():
    assert grant_pool({"GPU": 1, "pool:volunteer": 5, "pool:lab": 1}, "volunteer") == \
        {"GPU": 1, "pool:volunteer": POOL_CAPACITY}
    assert grant_pool({"pool:lab": 1}, "volunteer") == {}          # claims another pool: in none
    assert grant_pool({"GPU": 1}, "lab") == {"GPU": 1}               # does not know pools: in none
    assert grant_pool(None, "lab") == {}


class _FakeSession:
    def __init__(self, embedded: bool = False) -> None:
        self.cluster = object() if embedded else None


def test_private_inputs_go_only_to_a_trusted_pool():
    secret = np.arange(10)
    alias = secret

    ns = {"__name__": "__main__", "secret": secret, "alias": alias, "public": np.ones(3), "n": 1}
    exec("def f():\n    return secret.sum()", ns)  # a notebook function reading a private global
    opts = runner.RunOptions(private=("secret",))
    for names in (["secret"], ["alias"], ["f"]):
        with pytest.raises(DepinUsageError, match="private data .* any worker of the cluster .* --pool lab"):
            runner.check_private(_FakeSession(), names, ns, opts)
    with pytest.raises(DepinUsageError, match="pool 'volunteer'"):
        runner.check_private(_FakeSession(), ["secret"], ns, runner.RunOptions(private=("secret",), pool="volunteer"))
    assert runner.check_private(_FakeSession(), ["public", "n"], ns, opts) == []
    lab = runner.RunOptions(private=("secret",), pool="lab")
    assert runner.check_private(_FakeSession(), ["secret", "f", "public"], ns, lab) == ["secret", "f"]
    assert runner.check_private(_FakeSession(embedded=True), ["secret"], ns, opts) == ["secret"]  # stays here


def test_energy_is_measured_or_says_why_not(tmp_path):
    with energy.measure() as e:
        sum(i * i for i in range(200_000))
    assert e["cpu_seconds"] > 0 and e["wall_seconds"] > 0 and e["cpu_scope"] == "the cell's thread"
    domains, why = energy.rapl_domains()
    if domains:
        assert isinstance(e["energy_j"], float) and e["energy_j"] > 0 and e["source"] == "rapl"
    else:
        assert e["energy_j"] == reports.NOT_MEASURED and why in e["reason"]
    # RAPL arithmetic on a fake powercap tree: two packages, one counter wraps around
    for i, (start, top) in enumerate(((1_000_000, 10**9), (10**9 - 500_000, 10**9))):
        d = tmp_path / f"intel-rapl:{i}"
        d.mkdir()
        (d / "energy_uj").write_text(str(start))
        (d / "max_energy_range_uj").write_text(str(top))
    (tmp_path / "intel-rapl:0:0").mkdir()  # a sub-zone (core): not counted twice
    doms, why = energy.rapl_domains(str(tmp_path / "intel-rapl:*"))
    assert why is None and len(doms) == 2
    before = energy._rapl_read(doms)
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text(str(3_000_000))
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text(str(1_500_000))
    assert energy._rapl_joules(doms, before, energy._rapl_read(doms)) == pytest.approx(2.0 + 2.0)
    assert "not measured" in reports.energy_summary({"energy_j": "not measured", "reason": "x", "cpu_seconds": 1})


class _StandInNvml:
    """A stand-in for pynvml (no GPU on CI): a board drawing 150 W at 40 % utilization. The real NVML path
    runs in tests/test_magics.py::test_gpu_cell_energy_is_measured_by_nvml on a GPU machine."""

    WATTS = 150.0

    def __init__(self, counter: bool) -> None:
        self.counter, self.t0 = counter, time.perf_counter()

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetHandleByIndex(self, i: int) -> str:
        return f"gpu{i}"

    def nvmlDeviceGetPowerUsage(self, h: str) -> int:
        return int(self.WATTS * 1000)  # mW

    def nvmlDeviceGetUtilizationRates(self, h: str) -> object:
        return type("U", (), {"gpu": 40})()

    def nvmlDeviceGetTotalEnergyConsumption(self, h: str) -> int:
        if not self.counter:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return int((time.perf_counter() - self.t0) * self.WATTS * 1000)  # mJ

    def nvmlDeviceGetName(self, h: str) -> bytes:
        return b"Stand-in GPU"


@pytest.mark.parametrize("counter", [True, False], ids=["energy-counter", "integrated-samples"])
def test_gpu_energy_from_nvml_readings(monkeypatch, counter):
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", _StandInNvml(counter))
    monkeypatch.setitem(sys.modules, "cupy", None)  # the handle by CUDA_VISIBLE_DEVICES index
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with energy.measure(gpu=True, interval=0.01) as e:
        time.sleep(0.3)
    assert e["gpu"] == "Stand-in GPU" and e["gpu_samples"] >= 3
    assert e["gpu_energy_method"] == ("energy counter" if counter else "integrated power samples")
    assert e["gpu_power_mean_w"] == e["gpu_power_peak_w"] == 150.0 and e["gpu_util_mean"] == 40.0
    # 150 W over the measured span: joules are watts x seconds, not a count of samples or a guess (the
    # readings' span differs from the block's wall time by the sampler's start and stop, hence the margin)
    assert 0.7 * 150 * e["wall_seconds"] <= e["gpu_energy_j"] <= 1.3 * 150 * e["wall_seconds"]
    assert e["source"].startswith("nvml") and e["energy_j"] >= e["gpu_energy_j"]
    assert "GPU mean 150 W, peak 150 W, util 40%" in reports.energy_summary(e)


def test_gpu_energy_says_why_without_nvml(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)
    with energy.measure(gpu=True) as e:
        pass
    assert "gpu_energy_j" not in e
    if e["energy_j"] == reports.NOT_MEASURED:
        assert "nvidia-ml-py" in e["reason"]


# ------------------------------------------------------------------ real processes

@pytest.fixture(scope="module")
def net(tmp_path_factory):
    root = tmp_path_factory.mktemp("pools-net")
    n = Network(root, free_port())
    n.start_scheduler()
    n.count_file = root / "received.json"
    _, n.lab_log = n.start_worker(n.token("worker", "lab-box", pool="lab"), "--name", "lab-box",
                                  env={"DASK_DEPIN__SANDBOX__ENABLED": "false"})
    _, n.home_log = n.start_worker(n.token("worker", "home-pc"), "--name", "home-pc", env={
        "DASK_DISTRIBUTED__WORKER__PRELOAD": json.dumps([os.path.join(HERE, "counting_volunteer.py")]),
        "DEPIN_COUNT_FILE": str(n.count_file),
        "DEPIN_COUNT_MARKERS": f"{MARK_PRIVATE.hex()},{MARK_CONTROL.hex()}"})
    n.session = cluster._connect_token(n.token("client", "scientist"))
    wait_for_workers(n.session, 2)
    yield n
    n.session.client.close()
    n.close()



def _pools(net) -> dict[str, str | None]:
    return net.session.client.sync(net.session.client.scheduler.depin_pools)


def _address(net, name: str) -> str:
    return next(w.address for w in net.session.workers(max_age=0) if w.name == name)


def test_pools_come_from_the_certificates(net):
    assert "(pool lab)" in net.lab_log.read_text() and "(pool volunteer)" in net.home_log.read_text()
    assert _pools(net) == {_address(net, "lab-box"): "lab", _address(net, "home-pc"): "volunteer"}
    assert {w.name: w.pools for w in net.session.workers(max_age=0)} == {"lab-box": ("lab",),
                                                                         "home-pc": ("volunteer",)}


def test_100_lab_cells_all_run_on_the_lab_worker(net):
    lab = _address(net, "lab-box")
    ns: dict = {}
    where = []
    for i in range(100):
        ns["i"] = i
        out = runner.run_cell(net.session, "y = i * 2", ns, runner.RunOptions(pool="lab", replicas=1))
        assert ns["y"] == 2 * i
        where.append(out.worker)
    assert where == [lab] * 100
    # the default (replicated on a volunteer network) within the pool: one lab volunteer, so one run
    out = runner.run_cell(net.session, "z = 7", ns, runner.RunOptions(pool="lab"))
    assert out.worker == lab and ns["z"] == 7


def test_no_worker_of_the_pool_is_a_clear_error_not_a_wait(net):
    t0 = time.monotonic()
    with pytest.raises(NoSuitableWorkerError, match=r"pool 'gpu-farm'.*Pools connected: lab \(1 worker\), "
                                                    r"volunteer \(1 worker\).*--pool gpu-farm"):
        runner.run_cell(net.session, "a = 1", {}, runner.RunOptions(pool="gpu-farm"))
    assert time.monotonic() - t0 < 10


def _received(net) -> dict:
    return json.loads(net.count_file.read_text())


def test_private_input_is_refused_before_a_byte_reaches_the_volunteer(net):
    rng = np.random.default_rng()
    secret = np.frombuffer(MARK_PRIVATE + rng.bytes(2**20), dtype=np.uint8)
    control = np.frombuffer(MARK_CONTROL + rng.bytes(2**20), dtype=np.uint8)
    ns = {"secret": secret, "control": control}
    before = _received(net)
    with pytest.raises(DepinUsageError, match=r"'secret'.*any worker .*no --pool.*--pool lab"):
        runner.run_cell(net.session, "s = int(secret.sum())", ns, runner.RunOptions(private=("secret",)))
    with pytest.raises(DepinUsageError, match=r"'secret'.*pool 'volunteer'"):
        runner.run_cell(net.session, "s = int(secret.sum())", ns,
                        runner.RunOptions(private=("secret",), pool="volunteer"))
    time.sleep(1.5)
    after = _received(net)
    assert after["bytes"] - before["bytes"] < 64 * 1024, (before, after)  # heartbeats only, no 1 MiB input
    # the control: the same kind of input, not private, does reach the volunteer (the counter works)
    out = runner.run_cell(net.session, "c = int(control.sum())", ns,
                          runner.RunOptions(pool="volunteer", replicas=1))
    assert out.worker == _address(net, "home-pc") and ns["c"] == int(control.sum())
    got = _received(net)
    assert MARK_CONTROL.hex() in got["seen"] and got["bytes"] - after["bytes"] > 2**20
    assert MARK_PRIVATE.hex() not in got["seen"]
    # to the trusted pool it goes, and the manifest says where and which inputs were private (hashes)
    store = net.root / "runs.zarr"
    out = runner.run_cell(net.session, "s = int(secret.sum())", ns,
                          runner.RunOptions(private=("secret",), pool="lab", store=str(store)))
    assert out.worker == _address(net, "lab-box") and ns["s"] == int(secret.sum())
    # private data rides inside the task: the coordinator's input cache never holds it (the control it does)
    from depin_jupyter.protocol.values import content_hash

    keys = {n: "depin-input-" + content_hash(v) for n, v in (("secret", secret), ("control", control))}
    held = net.session.client.sync(net.session.client.scheduler.depin_input_has, keys=sorted(keys.values()))
    assert list(held) == [keys["control"]], held
    from depin_jupyter.store import open_store

    m = open_store(str(store), create=False).manifest(out.run_id)
    assert m.extra["pool"] == "lab"
    assert set(m.extra["private_inputs"]) == {"secret"} and m.extra["private_inputs"]["secret"] == m.inputs["secret"]
    assert m.extra["energy"]["cpu_scope"] == "the cell's thread"
    assert MARK_PRIVATE.hex() not in _received(net)["seen"]


def _state_dir_holds(net, marker: bytes) -> list[str]:
    """The files under the coordinator's state dir whose bytes contain ``marker``."""
    return [str(p) for p in net.state.path.rglob("*") if p.is_file() and marker in p.read_bytes()]


def test_a_long_private_cell_is_not_written_to_the_coordinators_disk(net):
    """A cell lasting past hold-after is written down with its submission (a restarted coordinator runs it
    again), unless it carries private data: that one is written without it."""
    from volunteer_net import cell_async

    mark_private, mark_public = secrets.token_bytes(32), secrets.token_bytes(32)
    rng = np.random.default_rng()
    ns = {"secret": np.frombuffer(mark_private + rng.bytes(4096), dtype=np.uint8),
          "public": np.frombuffer(mark_public + rng.bytes(4096), dtype=np.uint8)}
    slow = "import time\ntime.sleep(4)\ns = int({}.sum())\n"
    private = cell_async(net.session, slow.format("secret"), ns, private=("secret",), pool="lab", name="long-private")
    public = cell_async(net.session, slow.format("public"), ns, pool="lab", name="long-public")

    def held_names() -> set[str]:
        return {json.loads(p.read_text())["name"] for p in (net.state.path / "held").glob("*.json")}

    deadline = time.monotonic() + 30
    while not {"long-private", "long-public"} <= held_names() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert {"long-private", "long-public"} <= held_names()  # both written down while they run...
    assert _state_dir_holds(net, mark_public)  # ...the public one with its submission (the scan works)
    assert _state_dir_holds(net, mark_private) == []  # ...the private one without
    assert private.result(60)[0]["s"] == int(ns["secret"].sum()) and public.result(60)[0]["s"] == int(ns["public"].sum())
    assert _state_dir_holds(net, mark_private) == []


def test_energy_is_reported_per_run_in_the_result_and_status(net):
    from depin_jupyter.kernel.magics import format_status

    ns: dict = {}
    code = "t = sum(i * i for i in range(300_000))"
    for pool, scope in (("lab", "the cell's thread"), ("volunteer", "the cell's process")):  # volunteer: sandboxed
        out = runner.run_cell(net.session, code, ns, runner.RunOptions(pool=pool, replicas=1))
        e = out.energy
        assert e["cpu_scope"] == scope and e["cpu_seconds"] > 0 and e["wall_seconds"] > 0
        if energy.rapl_domains()[0]:
            assert isinstance(e["energy_j"], float) and e["energy_j"] > 0
        else:
            assert e["energy_j"] == "not measured" and "RAPL" in e["reason"]
        assert "gpu_energy_j" not in e  # CPU workers: no GPU figures, never a guess
    status = format_status(net.session)
    assert "pool" in status.splitlines()[1] and f"last run {out.run_id}: energy " in status

    # the coordinator's ledger totals it per volunteer (the sandboxed one's figures come from its child)
    measured = bool(energy.rapl_domains()[0])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        credits = net.session.client.sync(net.session.client.scheduler.depin_credits)
        if all("energy_tasks" in credits.get(n, {}) or "energy_unmeasured_tasks" in credits.get(n, {})
               for n in ("lab-box", "home-pc")):
            break
        time.sleep(0.2)
    for name in ("lab-box", "home-pc"):
        c = credits[name]
        if measured:
            assert c["energy_tasks"] >= 1 and c["energy_j"] > 0 and c["energy_source"] == "rapl", c
        else:
            assert "energy_j" not in c and c["energy_unmeasured_tasks"] >= 1 and "RAPL" in c["energy_reason"], c
            assert reports.energy_ledger_text(c) == "not measured"
    header = status.splitlines()[1].split()
    assert header.index("energy") == header.index("GPU-s") + 1
    row = next(ln for ln in format_status(net.session).splitlines() if ln.startswith("home-pc"))
    assert ("not measured" in row) != measured

    # `depin credits` on the coordinator's machine shows the same, once the ledger is saved (each second)
    from click.testing import CliRunner

    from depin_jupyter.cli import main

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        saved = net.state.credits().get("home-pc", {})
        if saved.get("energy_tasks", 0) + saved.get("energy_unmeasured_tasks", 0) >= 1:
            break
        time.sleep(0.2)
    res = CliRunner().invoke(main, ["credits", "--state-dir", str(net.state.path)])
    assert res.exit_code == 0, res.output
    assert "ENERGY" in res.output.splitlines()[0]
    line = next(ln for ln in res.output.splitlines() if ln.startswith("home-pc"))
    assert ("not measured" in line) != measured
    if not measured:
        assert "not measured: " in res.output and "RAPL" in res.output
    as_json = json.loads(CliRunner().invoke(main, ["credits", "--json", "--state-dir", str(net.state.path)]).output)
    assert as_json["home-pc"].get("energy_unmeasured_tasks", 0) + as_json["home-pc"].get("energy_tasks", 0) >= 1


def test_energy_text_in_the_ledger():
    assert reports.energy_ledger_text({}) == "-" and reports.energy_ledger_text(None) == "-"
    assert reports.energy_ledger_text({"energy_unmeasured_tasks": 3, "energy_reason": "no RAPL"}) == "not measured"
    assert reports.energy_ledger_text({"energy_j": 12.34, "energy_tasks": 2}) == "12.3 J"
    assert reports.energy_ledger_text({"energy_j": 7200.0, "energy_tasks": 2, "energy_unmeasured_tasks": 1}) == \
        "2.00 Wh (1 of 3 tasks not measured)"


def test_a_worker_cannot_claim_a_pool_it_was_not_given(net):
    proc, log = net.start_worker(net.token("worker", "claimer"), "--name", "claimer", env={
        "DASK_DISTRIBUTED__WORKER__RESOURCES": json.dumps({"pool:lab": 1}),
        "DASK_DEPIN__SANDBOX__ENABLED": "false"})
    try:
        wait_for_workers(net.session, 3)
        claimer = _address(net, "claimer")
        info = net.session.client.scheduler_info(n_workers=-1)["workers"][claimer]
        assert "pool:lab" not in info["resources"] and info["resources"].get("pool:volunteer") == POOL_CAPACITY
        assert _pools(net)[claimer] == "volunteer"
        wait_for_text(net.scheduler_log, "'claimer' (pool 'volunteer') claimed ['pool:lab', 'pool:volunteer']",
                      net.scheduler, timeout=5)
        ns: dict = {}
        where = {runner.run_cell(net.session, "y = 1", ns, runner.RunOptions(pool="lab", replicas=1)).worker
                 for _ in range(20)}
        assert where == {_address(net, "lab-box")}
        # replicas of a volunteer-pool cell: the two volunteer-pool workers, never the lab one
        store = net.root / "replicas.zarr"
        out = runner.run_cell(net.session, "r = 3.0", ns, runner.RunOptions(pool="volunteer", replicas=2,
                                                                           store=str(store)))
        from depin_jupyter.store import open_store

        rec = open_store(str(store), create=False).manifest(out.run_id).extra["replication"]
        assert {r["worker"] for r in rec["replicas"]} == {claimer, _address(net, "home-pc")}
    finally:
        _stop_and_wait_gone(net, proc, "claimer")


def _stop_and_wait_gone(net, proc, name: str) -> None:
    """Kill a worker's whole process tree and wait until the coordinator no longer lists it, so the next
    test (in any order) sees the module's two workers only."""
    import time

    import psutil

    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
    proc.kill()
    proc.wait(10)
    deadline = time.monotonic() + 90
    while name in {w.name for w in net.session.workers(max_age=0)} and time.monotonic() < deadline:
        time.sleep(0.2)
    assert name not in {w.name for w in net.session.workers(max_age=0)}, f"{name} still listed"


def test_a_certificate_whose_pool_was_changed_and_resigned_is_refused(net):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    tok = Token.decode(net.token("worker", "sneaky"))  # pool volunteer, signed by the CA
    cert = x509.load_pem_x509_certificate(tok.cert.encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = [x509.UniformResourceIdentifier("depin://pool/lab" if u.startswith("depin://pool/") else u)
            for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
    names = [n for n in san if not isinstance(n, x509.UniformResourceIdentifier)] + uris
    forged = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.issuer)
              .public_key(cert.public_key()).serial_number(cert.serial_number)
              .not_valid_before(cert.not_valid_before_utc).not_valid_after(cert.not_valid_after_utc)
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()))  # not the CA's key
    pem = forged.public_bytes(serialization.Encoding.PEM).decode()
    assert cert_pool(pem) == "lab"
    bad = Token(address=tok.address, ca=tok.ca, cert=pem, key=tok.key).encode()
    proc, log = net.start_worker(bad, "--name", "sneaky", wait=False)
    assert proc.wait(60) != 0
    assert "refused this token's certificate" in log.read_text()
    assert "sneaky" not in {w.name for w in net.session.workers(max_age=0)}
    assert dt.datetime.now(dt.timezone.utc) < cert.not_valid_after_utc  # refused for the signature, not expiry
