"""Opening a store fails early and clearly when it cannot be written or reached; S3 works end to end."""

from __future__ import annotations

import os
import tempfile
import threading

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

from depin_jupyter.errors import DepinError
from depin_jupyter.store import StoreAccessError, ledger, open_store


@pytest.fixture
def public_tmp():
    """A directory another user can traverse (tmp_path's parents are private to root)."""
    path = tempfile.mkdtemp(prefix="depin-ro-")
    os.chmod(path, 0o755)
    yield path
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def test_existing_store_in_a_read_only_directory(public_tmp, read_only_dir, write_run):
    url = os.path.join(public_tmp, "results.zarr")
    write_run(open_store(url), {"x": np.arange(3)})
    for d, _, _ in os.walk(url):
        os.chmod(d, 0o555)
    try:
        with read_only_dir(url):
            with pytest.raises(StoreAccessError, match=rf"{url} is not writable.*--store URL"):
                open_store(url)
            rs = open_store(url, create=False, writable=False)  # reading still works
            assert [s.complete for s in rs.runs()] == [True] and rs.verify().ok
    finally:
        for d, _, _ in os.walk(url):
            os.chmod(d, 0o755)


def test_new_store_in_a_read_only_directory(public_tmp, read_only_dir):
    url = os.path.join(public_tmp, "new.zarr")
    with read_only_dir(public_tmp), pytest.raises(StoreAccessError, match=rf"{url}.*(Permission|denied)"):
        open_store(url)
    assert not os.path.exists(url)


def test_path_under_a_file_and_missing_or_foreign_stores(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StoreAccessError, match="file/x.zarr"):
        open_store(str(tmp_path / "file" / "x.zarr"))
    with pytest.raises(StoreAccessError, match="does not exist"):
        open_store(str(tmp_path / "absent.zarr"), create=False)
    assert not (tmp_path / "absent.zarr").exists()
    import zarr

    zarr.create_group(str(tmp_path / "foreign.zarr"), zarr_format=3)
    with pytest.raises(StoreAccessError, match="not a depin result store"):
        open_store(str(tmp_path / "foreign.zarr"))


def test_unreachable_s3_endpoint_fails_before_compute():
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}, "retries": 1,
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
    with pytest.raises(StoreAccessError, match=r"s3://nowhere/x.zarr.*(credentials|network)") as info:
        open_store("s3://nowhere/x.zarr", storage_options=options)
    assert isinstance(info.value, DepinError)


def test_default_url_comes_from_config_then_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with dask.config.set({"depin.store.url": None}):  # the suite may point it at a scratch store
        assert open_store().url == str(tmp_path / "depin-results.zarr")
    with dask.config.set({"depin.store.url": str(tmp_path / "configured.zarr")}):
        assert open_store().url == str(tmp_path / "configured.zarr")


def test_s3_store_write_load_verify(s3_store_url, write_run):
    url, options = s3_store_url
    rs = open_store(url, storage_options=options)
    x = np.random.default_rng(0).random((50, 40))
    ds = xr.Dataset({"v": ("i", np.arange(6.0))}, coords={"i": np.arange(6)})
    with dask.config.set({"depin.store.chunk-bytes": 4096}):
        w = rs.begin_run(code="x = ...", inputs={}, options={}, cache_key="s3-key")
    w.write_output("x", x)
    w.write_output("d", da.from_array(np.arange(1000), chunks=250))
    w.write_output("ds", ds)
    w.write_output("n", 42)
    m = w.finish()
    assert len(m.outputs["x"].chunk_digests) == 5
    again = open_store(url, storage_options=options, create=False)
    out = again.load(w.run_id, lazy=False)
    np.testing.assert_array_equal(out["x"], x)
    np.testing.assert_array_equal(out["d"], np.arange(1000))
    xr.testing.assert_identical(out["ds"], ds)
    assert out["n"] == 42
    assert again.lookup_cache("s3-key") == w.run_id
    assert again.verify().ok
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    key = url.removeprefix("s3://") + f"/runs/{w.run_id}/x/c/1/0"
    fs.pipe(key, b"tampered")
    report = open_store(url, storage_options=options, create=False).verify()
    assert not report.ok and f"run {w.run_id} / output x / chunk c/1/0" in report.format()


def test_s3_ledger_appends_race_safely(s3_store_url):
    url, options = s3_store_url
    rs = open_store(url, storage_options=options)
    start = threading.Barrier(4)

    def worker(n):
        start.wait()
        for k in range(3):
            ledger.append(rs.zarr_store, f"20260101T000000.000000Z-{n:04d}{k:04d}", "0" * 64, None)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries, problems = ledger.read_chain(rs.zarr_store)
    assert not problems and [e.seq for e in entries] == list(range(1, 13))
