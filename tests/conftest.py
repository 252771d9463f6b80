"""Shared fixtures: a real IPython shell with the extension, on a real Dask cluster with worker processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

# Tests must not pick up a developer's Dask/depin settings from ~/.config/dask.
os.environ.setdefault("DASK_CONFIG", os.path.join(os.path.dirname(__file__), "_no_dask_config"))


@pytest.fixture(scope="session", autouse=True)
def _results_store(tmp_path_factory):
    """Runs of the suite go to a temporary result store, not ./depin-results.zarr."""
    import dask

    url = str(tmp_path_factory.mktemp("store") / "suite-results.zarr")
    os.environ["DASK_DEPIN__STORE__URL"] = url  # subprocesses (other kernels, the CLI) too
    with dask.config.set({"depin.store.url": url}):
        yield url


@pytest.fixture(scope="session", autouse=True)
def _keys_dir(tmp_path_factory):
    """Signing keys of the suite live in a temporary depin.keys.dir, never in ~/.config/depin."""
    import dask

    path = str(tmp_path_factory.mktemp("keys"))
    os.environ["DASK_DEPIN__KEYS__DIR"] = path
    with dask.config.set({"depin.keys.dir": path}):
        yield path


@pytest.fixture
def author(tmp_path, monkeypatch):
    """An author with a signing key (its own depin.keys.dir) and a license set, in this process and the CLI's."""
    import dask

    from depin_jupyter.reproduce.signing import create_key

    keys = tmp_path / "author-keys"
    monkeypatch.setenv("DASK_DEPIN__KEYS__DIR", str(keys))
    monkeypatch.setenv("DASK_DEPIN__PUBLISH__LICENSE", "CC-BY-4.0")
    with dask.config.set({"depin.keys.dir": str(keys), "depin.publish.license": "CC-BY-4.0"}):
        yield create_key(keys, name="Ada Lovelace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_gpu() -> bool:
    from depin_jupyter.gpu import detect

    return detect()[0] > 0


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with cupy and dask-cuda (run on the GPU device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ip():
    """An IPython shell with `%load_ext depin_jupyter` done."""
    from IPython.testing.globalipapp import start_ipython

    shell = start_ipython()
    shell.run_line_magic("load_ext", "depin_jupyter")
    yield shell


def _embedded_workers(session) -> int:
    """How many workers the embedded default started: 2 CPU workers here, one per GPU with LocalCUDACluster.

    Waiting for 2 on a one-GPU machine (LocalCUDACluster starts one worker there) made every `gpu` test
    time out in its fixture (issue #23).
    """
    return len(session.cluster.worker_spec) if session.cluster is not None else 2


@pytest.fixture(scope="module")
def depin_session(ip):
    """The embedded default cluster (2 CPU worker processes here, one per GPU on a GPU machine), one per test
    module: what a module's tests leave on it (cached inputs, a restarted worker) never meets another's."""
    from depin_jupyter.kernel import cluster

    session = cluster.connect("local")
    session.client.wait_for_workers(_embedded_workers(session), timeout=60)
    yield session
    cluster.close_session()


@pytest.fixture
def shell(ip, depin_session):
    """The shell, connected, with a clean user namespace for each test."""
    from depin_jupyter.kernel import cluster

    if cluster.current_session() is not depin_session:  # a test connected elsewhere: come back
        cluster._session = depin_session
    depin_session.client.wait_for_workers(_embedded_workers(depin_session), timeout=60)
    before = set(ip.user_ns)
    yield ip
    for name in set(ip.user_ns) - before:
        ip.user_ns.pop(name, None)


def run(shell, code: str):
    """Run a cell; return IPython's ExecutionResult."""
    return shell.run_cell(code, store_history=False)


def run_ok(shell, code: str):
    """Run a cell that must succeed; return its result value."""
    res = run(shell, code)
    if not res.success:
        raise AssertionError(f"cell failed: {res.error_before_exec or res.error_in_exec!r}")
    return res.result


@pytest.fixture
def scheduler_process():
    """A real `dask scheduler` and one `dask worker` as separate processes on 127.0.0.1."""
    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    bindir = os.path.dirname(sys.executable)
    procs = [subprocess.Popen([os.path.join(bindir, "dask"), "scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    procs.append(subprocess.Popen([os.path.join(bindir, "dask"), "worker", addr, "--nthreads", "1",
                                   "--no-dashboard", "--name", "external-0"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    yield addr
    for p in procs[::-1]:
        p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def kernel_execute(kc, code: str, timeout: float = 120):
    """Run code in a jupyter_client kernel; return (reply content, [(arrival time, iopub msg)] of it)."""
    msg_id = kc.execute(code)
    msgs = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        msgs.append((time.monotonic(), msg))
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    return kc.get_shell_msg(timeout=timeout)["content"], msgs


@pytest.fixture
def no_store():
    """No result store for the test's runs (volunteer-network tests check the network, not the store)."""
    import dask

    with dask.config.set({"depin.store.enabled": False}):
        yield
