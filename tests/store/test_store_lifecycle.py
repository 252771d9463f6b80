"""A run is served only once sealed: manifest last, then the ledger; the cache obeys the same rule."""

from __future__ import annotations

import glob
import os
import shutil

import numpy as np
import pytest
from zarr.storage import WrapperStore

from depin_jupyter.errors import DepinUsageError
from depin_jupyter.store import RunIncompleteError, StoreIntegrityError, _io, ledger


class Recording(WrapperStore):
    """Logs every key written and read, in order."""

    def __init__(self, store, log):
        super().__init__(store)
        self.log = log

    def _with_store(self, store):
        return type(self)(store, self.log)

    async def set(self, key, value):
        self.log.append(("set", key))
        await self._store.set(key, value)

    async def set_if_not_exists(self, key, value):
        self.log.append(("set", key))
        await self._store.set_if_not_exists(key, value)

    async def get(self, key, prototype=None, byte_range=None):
        self.log.append(("get", key))
        return await self._store.get(key, prototype, byte_range)


@pytest.fixture
def recorded(monkeypatch):
    """Route every store access through `Recording`; the shared log."""
    log: list[tuple[str, str]] = []
    real = _io.open_zarr_store
    monkeypatch.setattr(_io, "open_zarr_store", lambda url, so=None: Recording(real(url, so), log))
    return log


def _is_chunk(key: str) -> bool:
    return "/c/" in key or key.endswith("/c")


def test_unfinished_run_is_listed_incomplete_and_never_served(store, write_run):
    done = write_run(store, {"x": np.arange(3)}, cache_key="k")
    w = store.begin_run(code="y = 2", inputs={}, options={}, cache_key="k", name="pending")
    w.write_output("x", np.arange(4))
    summaries = {s.run_id: s for s in store.runs()}
    assert [s.run_id for s in store.runs()] == sorted([done, w.run_id])  # time-ordered
    assert summaries[done].complete and summaries[done].status == "ok"
    assert not summaries[w.run_id].complete and summaries[w.run_id].status == "incomplete"
    with pytest.raises(RunIncompleteError, match="incomplete"):
        store.load(w.run_id)
    with pytest.raises(RunIncompleteError):
        store.manifest(w.run_id)
    assert store.lookup_cache("k") == done  # the newer, unfinished run is not served
    report = store.verify()
    assert report.ok and [s.run_id for s in report.incomplete] == [w.run_id]


def test_aborted_run_stays_incomplete(store):
    w = store.begin_run(code="boom", inputs={}, options={}, cache_key="k")
    w.write_output("x", np.ones(2))
    w.abort("cell raised ValueError")
    (s,) = store.runs()
    assert (s.status, s.complete, s.detail) == ("aborted", False, "cell raised ValueError")
    with pytest.raises(RunIncompleteError, match="aborted"):
        store.load(w.run_id)
    with pytest.raises(DepinUsageError, match="aborted"):
        w.finish()
    assert store.lookup_cache("k") is None and store.verify().ok


def test_manifest_is_written_last_then_the_ledger(store, recorded, small_chunks):
    w = store.begin_run(code="x = 1", inputs={}, options={}, cache_key="key")
    w.write_output("a", np.random.default_rng(0).random((40, 40)))
    w.write_output("b", np.arange(500))
    recorded.clear()
    w.finish()
    sets = [k for op, k in recorded if op == "set"]
    run_meta = f"runs/{w.run_id}/zarr.json"
    manifest_at = sets.index(run_meta)
    assert not any(k.startswith(f"runs/{w.run_id}/") for k in sets[manifest_at + 1:])
    (ledger_at,) = [i for i, k in enumerate(sets) if k.startswith("ledger/") and k != "ledger/zarr.json"]
    assert ledger_at > manifest_at
    assert all(i > ledger_at for i, k in enumerate(sets) if k.startswith(("depin/index/", "depin/cache/")))


def test_chunks_are_written_before_the_manifest(store, recorded, small_chunks):
    w = store.begin_run(code="x = 1", inputs={}, options={}, cache_key=None)
    w.write_output("a", np.arange(2000.0))
    w.finish()
    sets = [k for op, k in recorded if op == "set"]
    chunk_positions = [i for i, k in enumerate(sets) if _is_chunk(k)]
    assert len(chunk_positions) == 16
    assert max(chunk_positions) < len(sets) - 1 - sets[::-1].index(f"runs/{w.run_id}/zarr.json")


def test_writer_stopped_while_sealing_leaves_an_unsealed_incomplete_run(store, monkeypatch):
    w = store.begin_run(code="x = 1", inputs={}, options={}, cache_key="k")
    w.write_output("x", np.arange(10))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("writer stopped between manifest and ledger")

    monkeypatch.setattr(ledger, "append", killed)
    with pytest.raises(KeyboardInterrupt):
        w.finish()
    (s,) = store.runs()
    assert (s.status, s.complete) == ("unsealed", False)
    with pytest.raises(RunIncompleteError, match="no ledger entry"):
        store.load(w.run_id)
    assert store.lookup_cache("k") is None
    report = store.verify()
    assert report.ok and report.incomplete[0].status == "unsealed"


def test_finish_refuses_a_run_that_lost_a_chunk(store, small_chunks):
    w = store.begin_run(code="x = 1", inputs={}, options={}, cache_key=None)
    w.write_output("x", np.arange(1000.0))
    chunk = sorted(glob.glob(os.path.join(store.url, "runs", w.run_id, "x", "c", "*")))[3]
    os.remove(chunk)
    with pytest.raises(StoreIntegrityError, match="chunks"):
        w.finish()
    assert not store.runs()[0].complete


def test_finish_twice_and_abort_after_finish_are_errors(store):
    w = store.begin_run(code="x = 1", inputs={}, options={}, cache_key=None)
    w.finish()
    with pytest.raises(DepinUsageError, match="already finished"):
        w.finish()
    with pytest.raises(DepinUsageError, match="no more outputs"):
        w.write_output("late", np.ones(2))
    with pytest.raises(DepinUsageError, match="already finished"):
        w.abort("late")


def test_lookup_cache_returns_newest_complete_ok_run(store, write_run):
    assert store.lookup_cache("k") is None
    first = write_run(store, {"x": np.arange(3)}, cache_key="k")
    second = write_run(store, {"x": np.arange(4)}, cache_key="k")
    write_run(store, {"x": np.arange(5)}, cache_key="k", status="error")  # a failed cell is not a result
    other = write_run(store, {"x": np.arange(6)}, cache_key="other")
    assert store.lookup_cache("k") == second
    assert store.lookup_cache("other") == other
    assert store.lookup_cache("missing") is None
    # a tampered manifest is skipped: the older intact run is served instead
    path = os.path.join(store.url, "runs", second, "zarr.json")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace('"run_s": 0.01', '"run_s": 0.02'))
    assert store.lookup_cache("k") == first
    shutil.rmtree(os.path.join(store.url, "runs", first, "x"))  # an output gone: not served either
    assert store.lookup_cache("k") is None


def test_lookup_cache_reads_no_chunks(store, write_run, recorded, small_chunks):
    rid = write_run(store, {"big": np.random.default_rng(0).random((64, 64)), "n": 1}, cache_key="k")
    chunk = sorted(glob.glob(os.path.join(store.url, "runs", rid, "big", "c", "*", "*")))[5]
    os.remove(chunk)
    recorded.clear()
    assert store.lookup_cache("k") == rid
    assert recorded and not [k for _, k in recorded if _is_chunk(k)]
    lazy = store.load(rid)["big"]  # lazy: still no chunk read
    assert not [k for _, k in recorded if _is_chunk(k)] and lazy.shape == (64, 64)
    report = store.verify()
    assert not report.ok
    assert any(p.run_id == rid and p.chunk == os.path.relpath(chunk, os.path.join(store.url, "runs", rid, "big"))
               for p in report.problems)


def test_load_falls_back_to_the_ledger_when_the_index_is_missing(store, write_run):
    rid = write_run(store, {"x": np.arange(3)})
    shutil.rmtree(os.path.join(store.url, "depin", "index", rid))
    np.testing.assert_array_equal(store.load(rid, lazy=False)["x"], np.arange(3))


def test_truncated_uncompressed_chunk_is_an_integrity_error_on_load(store, write_run, small_chunks):
    import dask.config

    with dask.config.set({"depin.store.compression": "none"}):
        rid = write_run(store, {"x": np.arange(4000.0).reshape(400, 10)})
    chunk = os.path.join(store.url, "runs", rid, "x", "c", "7", "0")
    with open(chunk, "r+b") as f:
        f.truncate(100)
    with pytest.raises(StoreIntegrityError, match="c/7/0 is truncated"):
        store.load(rid, lazy=False)


def test_another_process_can_finish_a_run_it_did_not_begin(store):
    w = store.begin_run(code="x = 1", inputs={}, options={}, cache_key="k")
    w.write_output("x", np.arange(3))
    again = store.writer(w.run_id)  # e.g. a new kernel, or the worker that ran the cell
    again.write_output("y", 2)
    assert sorted(again.finish().outputs) == ["x", "y"]
    assert store.lookup_cache("k") == w.run_id
