"""Store fixtures: real stores in tmp_path, a real S3 API (moto server on 127.0.0.1), a real cluster."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from depin_jupyter.store import ResultStore, open_store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def store(tmp_path: Any) -> ResultStore:
    """A fresh local store."""
    return open_store(str(tmp_path / "results.zarr"))


def _write_run(rs: ResultStore, outputs: dict[str, Any], *, cache_key: str | None = None,
               name: str | None = None, status: str = "ok", code: str = "pass") -> str:
    """Begin, write every output, finish; the run id."""
    w = rs.begin_run(code=code, inputs={"a": "sha256:00"}, options={"gpu": None},
                     cache_key=cache_key, name=name)
    for k, v in outputs.items():
        w.write_output(k, v)
    w.finish(status=status, timings={"run_s": 0.01})
    return w.run_id


@pytest.fixture
def write_run() -> Any:
    """`write_run(store, {name: value}, cache_key=..., status=...)` -> run id of a finished run."""
    return _write_run


@pytest.fixture
def small_chunks() -> Iterator[None]:
    """Tiny chunks (1 KiB) so small test arrays span many chunk files."""
    import dask.config

    with dask.config.set({"depin.store.chunk-bytes": 1024}):
        yield


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """`python -m moto.server` on a free 127.0.0.1 port (RECIPES §9), with dummy AWS credentials."""
    port = _free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({k: env[k] for k in saved})
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("moto server did not start")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_store_url(moto_endpoint: str) -> tuple[str, dict[str, Any]]:
    """A new bucket on the moto server: (s3:// URL of a store in it, storage_options)."""
    import s3fs

    options = {"client_kwargs": {"endpoint_url": moto_endpoint}}
    bucket = f"depin-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**options).mkdir(bucket)
    return f"s3://{bucket}/results.zarr", options


@pytest.fixture(scope="module")
def dask_client() -> Iterator[Any]:
    """A real distributed cluster: 2 worker processes, 1 thread each."""
    from distributed import Client, LocalCluster

    with (LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
          Client(cluster) as client):
        yield client


@pytest.fixture
def read_only_dir() -> Any:
    """Context manager factory: `with read_only_dir(path):` the path is unwritable for this process."""
    return _read_only_dir


@contextlib.contextmanager
def _read_only_dir(path: str) -> Iterator[None]:
    """Make ``path`` unwritable for this process (as root, by dropping to `nobody` meanwhile)."""
    os.chmod(path, 0o555)
    dropped = os.geteuid() == 0
    try:
        if dropped:
            os.setegid(65534)
            os.seteuid(65534)
        yield
    finally:
        if dropped:
            os.seteuid(0)
            os.setegid(0)
        os.chmod(path, 0o755)


@pytest.fixture
def flip_byte() -> Any:
    """`flip_byte(path, pos, rng)` -> original bytes (write them back to undo)."""
    return _flip_byte


def _flip_byte(path: str, pos: int, rng: np.random.Generator) -> bytes:
    """XOR one byte of a file with a random non-zero mask; returns the original bytes."""
    with open(path, "rb") as f:
        data = f.read()
    changed = bytearray(data)
    changed[pos] ^= int(rng.integers(1, 256))
    with open(path, "wb") as f:
        f.write(changed)
    return data
