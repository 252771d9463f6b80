"""Fixtures for the Jupyter server extension: pytest-jupyter's server fixtures (scoped to this folder),
a real CPU LocalCluster, a real published kernel session, and a real result store with runs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

# pytest-jupyter's fixtures and its async-test hooks, for the tests in this folder only (its autouse
# event-loop fixtures must not wrap the rest of the suite; `pytest_plugins` would load it everywhere).
from pytest_jupyter.jupyter_server import *

from depin_jupyter.store import ResultStore, open_store


@pytest.fixture(autouse=True)
def _store_setting_unset() -> Iterator[None]:
    """The suite points depin.store.url at a temp store; these tests check the unset default."""
    import dask

    with dask.config.set({"depin.store.url": None}):
        yield


@pytest.fixture
def jp_server_config() -> dict[str, Any]:
    # The test server does not read the installed jupyter_server_config.d: enable the extension here.
    return {"ServerApp": {"jpserver_extensions": {"depin_jupyter": True}}}


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[Any]:
    """A real LocalCluster with one in-process worker, reachable over TCP like a kernel's cluster."""
    import warnings

    from distributed import LocalCluster

    with warnings.catch_warnings():
        # The scheduler's small HTTP server (health, metrics) falls back to a random port when 8787
        # is taken by another cluster on this machine, with a warning that is no concern here.
        warnings.filterwarnings("ignore", message="Port 8787 is already in use", category=UserWarning)
        cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp",
                               host="127.0.0.1", dashboard_address=None)
    with cluster:
        yield cluster


@pytest.fixture
def published(local_cluster: Any, jp_environ: Any) -> Iterator[Any]:
    """A real `cluster.Session` on the LocalCluster, published as a kernel does it.

    `jp_environ` points JUPYTER_RUNTIME_DIR (where sessions are published) at a temp dir for this
    test, the same one the test server reads, so no real kernel on this machine shows up.
    """
    from distributed import Client

    from depin_jupyter.kernel.cluster import Session

    client = Client(local_cluster, set_as_default=False)
    session = Session(client, None, "test LocalCluster (1 in-process worker)")
    assert session.session_file is not None and session.session_file.exists()
    try:
        yield session
    finally:
        session.close()


def write_run(rs: ResultStore, *, name: str | None = "demo", status: str = "ok",
              worker: dict[str, Any] | None = None) -> str:
    """Begin, write one array output and a value, finish; the run id."""
    import numpy as np

    w = rs.begin_run(code="y = x + 1", inputs={"x": "xxh3:00"}, options={}, cache_key=None, name=name)
    w.write_output("y", np.arange(1000, dtype="float64"))
    w.write_output("n", 3)
    w.finish(status=status, worker=worker or {"name": "worker-7", "address": "tcp://127.0.0.1:1",
                                              "host": "lab", "gpus": []},
             timings={"total_s": 1.25})
    return w.run_id


@pytest.fixture
def store_with_runs(jp_root_dir: Any) -> tuple[ResultStore, list[str]]:
    """A store at the server root's depin-results.zarr: two complete runs and one left incomplete."""
    rs = open_store(str(jp_root_dir / "depin-results.zarr"))
    first = write_run(rs, name="first")
    second = write_run(rs, name="second")
    unfinished = rs.begin_run(code="z = 1", inputs={}, options={}, cache_key=None, name="unfinished").run_id
    return rs, [first, second, unfinished]
