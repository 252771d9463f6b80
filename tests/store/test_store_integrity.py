"""Tamper evidence and crash safety: flipped bytes are named, kills never leave a servable half-run,
concurrent writers both land in one intact ledger chain."""

from __future__ import annotations

import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from depin_jupyter.store import RunIncompleteError, ledger, open_store

WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from depin_jupyter.store import open_store

    url, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rs = open_store(url)
    print("ready", flush=True)
    while len(sys.argv) > 4 and not __import__("os").path.exists(sys.argv[4]):
        time.sleep(0.001)  # start line for concurrent writers
    i = 0
    while count < 0 or i < count:
        w = rs.begin_run(code=f"run {i}", inputs={}, options={}, cache_key=f"{tag}-{i}", name=f"{tag}-{i}")
        for j in range(3):
            w.write_output(f"a{j}", np.full((64, 48), 10 * i + j, dtype="f8"))
        w.write_output("meta", {"i": i})
        w.finish()
        i += 1
""")


@pytest.fixture
def writer_script(tmp_path):
    path = tmp_path / "writer.py"
    path.write_text(WRITER)
    return str(path)


def _env():
    return {**os.environ, "DASK_DEPIN__STORE__CHUNK_BYTES": "4096", "OMP_NUM_THREADS": "1"}


def _check_served_runs_are_whole(rs):
    """Every complete run loads exactly what its writer wrote; every other run refuses to load."""
    complete = incomplete = 0
    for s in rs.runs():
        if not s.complete:
            incomplete += 1
            with pytest.raises(RunIncompleteError):
                rs.load(s.run_id)
            continue
        complete += 1
        i = int(s.name.rsplit("-", 1)[1])
        out = rs.load(s.run_id, lazy=False)
        assert set(out) == {"a0", "a1", "a2", "meta"} and out["meta"] == {"i": i}
        for j in range(3):
            np.testing.assert_array_equal(out[f"a{j}"], np.full((64, 48), 10 * i + j))
    return complete, incomplete


def test_sigkill_at_random_points_never_serves_a_partial_run(tmp_path, writer_script):
    url = str(tmp_path / "killed.zarr")
    open_store(url)
    rng = random.Random(20261125)
    for trial in range(20):
        proc = subprocess.Popen([sys.executable, writer_script, url, f"t{trial}", "-1"],
                                stdout=subprocess.PIPE, env=_env())
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
    rs = open_store(url, create=False)
    complete, incomplete = _check_served_runs_are_whole(rs)
    assert complete > 0 and incomplete > 0  # kills landed both between and inside runs
    report = rs.verify()
    assert report.ok, report.format()
    assert len(report.incomplete) == incomplete and report.runs_checked == complete


def test_two_processes_write_to_one_store_concurrently(tmp_path, writer_script):
    url = str(tmp_path / "shared.zarr")
    open_store(url)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, writer_script, url, tag, "6", str(go)],
                              stdout=subprocess.PIPE, env=_env()) for tag in ("p", "q")]
    for p in procs:
        assert p.stdout.readline().strip() == b"ready"
    go.touch()
    for p in procs:
        assert p.wait(60) == 0
    rs = open_store(url, create=False)
    runs = rs.runs()
    assert len(runs) == 12 and all(s.complete for s in runs)
    entries, problems = ledger.read_chain(rs.zarr_store)
    assert not problems and [e.seq for e in entries] == list(range(1, 13))
    assert {e.run_id for e in entries} == {s.run_id for s in runs}
    assert _check_served_runs_are_whole(rs) == (12, 0)
    assert rs.verify().ok


def test_threads_racing_on_the_ledger_get_distinct_numbers(store):
    start = threading.Barrier(8)
    got: list[int] = []

    def worker(n):
        start.wait()
        for k in range(5):
            got.append(ledger.append(store.zarr_store, f"20260101T000000.000000Z-{n:04d}{k:04d}", "0" * 64, None).seq)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 41))
    entries, problems = ledger.read_chain(store.zarr_store)
    assert not problems and len(entries) == 40


@pytest.fixture
def sealed_store(tmp_path, write_run, small_chunks):
    """A store with three sealed runs of every array kind, plus an incomplete one."""
    rs = open_store(str(tmp_path / "sealed.zarr"))
    rng = np.random.default_rng(3)
    write_run(rs, {"grid": rng.random((30, 20)), "n": 3, "s": "text"})
    write_run(rs, {"ds": xr.Dataset({"t": (("x", "y"), rng.random((8, 9)))}, coords={"x": np.arange(8)}),
                   "lazy": da.from_array(rng.integers(0, 9, 700), chunks=100)})
    write_run(rs, {"flags": rng.random(3000) > 0.5})
    rs.begin_run(code="never finished", inputs={}, options={}, cache_key=None).write_output("x", np.ones(9))
    return rs


def _targets(rs):
    """Every stored byte that matters: (file, what kind, run id, ledger seq, array path, chunk)."""
    out = []
    sealed = {e.run_id: e.seq for e in ledger.read_chain(rs.zarr_store)[0]}
    for rid in sealed:
        root = os.path.join(rs.url, "runs", rid)
        out.append((os.path.join(root, "zarr.json"), "manifest", rid, None, None, None))
        for meta in glob.glob(os.path.join(root, "**", "zarr.json"), recursive=True):
            arr = os.path.relpath(os.path.dirname(meta), root)
            if arr != ".":
                out.append((meta, "metadata", rid, None, arr, None))
        for chunk in glob.glob(os.path.join(root, "**", "c", "**"), recursive=True):
            if os.path.isfile(chunk):
                arr, key = os.path.relpath(chunk, root).split(os.sep + "c" + os.sep, 1)
                out.append((chunk, "chunk", rid, None, arr, "c/" + key.replace(os.sep, "/")))
    for seq in sealed.values():
        out.append((os.path.join(rs.url, ledger.entry_key(seq)), "ledger", None, seq, None, None))
    return out


def test_flipped_bytes_are_found_and_named(sealed_store, flip_byte):
    rs = sealed_store
    assert rs.verify().ok
    targets = _targets(rs)
    kinds = {t[1] for t in targets}
    assert kinds == {"manifest", "metadata", "chunk", "ledger"}
    rng = np.random.default_rng(7)
    picks = []
    for kind in sorted(kinds):  # 25 random positions in each kind of file
        of_kind = [t for t in targets if t[1] == kind]
        picks += [of_kind[int(rng.integers(len(of_kind)))] for _ in range(25)]
    for path, kind, rid, seq, arr, chunk in picks:
        size = os.path.getsize(path)
        original = flip_byte(path, int(rng.integers(size)), rng)
        try:
            report = rs.verify()
            assert not report.ok, (kind, path)
            text = report.format()
            if kind == "ledger":
                assert f"ledger entry {seq}:" in text
            else:
                assert any(p.run_id == rid for p in report.problems), (kind, path, text)
            if kind == "chunk":
                output = arr.split(os.sep)[0]
                assert any(p.chunk == chunk and p.output == output for p in report.problems), text
                assert f"chunk {chunk}" in text
            if kind == "metadata":
                assert any(p.output == arr.split(os.sep)[0] for p in report.problems), text
        finally:
            with open(path, "wb") as f:
                f.write(original)
    assert rs.verify().ok


def test_deleted_and_reordered_ledger_entries_are_detected(sealed_store):
    rs = sealed_store
    root = os.path.join(rs.url, "ledger")
    a, b = os.path.join(root, "000000000001"), os.path.join(root, "000000000002")
    shutil.move(a, a + ".x")
    shutil.move(b, a)
    shutil.move(a + ".x", b)
    report = rs.verify()
    assert not report.ok and "ledger entry 1:" in report.format() and "ledger entry 2:" in report.format()
    shutil.move(a, a + ".x")
    shutil.move(b, a)
    shutil.move(a + ".x", b)
    assert rs.verify().ok
    shutil.rmtree(os.path.join(root, "000000000002"))
    report = rs.verify()
    assert not report.ok and "ledger entry 2: missing" in report.format()


def test_deleted_run_and_chunk_are_reported(sealed_store):
    rs = sealed_store
    first, second = [s.run_id for s in rs.runs() if s.complete][:2]
    shutil.rmtree(os.path.join(rs.url, "runs", first))
    chunk = sorted(glob.glob(os.path.join(rs.url, "runs", second, "lazy", "c", "*")))[2]
    os.remove(chunk)
    report = rs.verify()
    text = report.format()
    assert f"run {first}: sealed by ledger entry 1 but" in text
    assert f"run {second} / output lazy / chunk c/2: chunk missing" in text
    import zarr

    zarr.create_array(rs.url, name=f"runs/{second}/smuggled", shape=(2,), dtype="i1")
    assert f"run {second}: node 'smuggled' is not in the manifest" in rs.verify().format()


def test_a_run_killed_before_its_metadata_is_incomplete_not_missing(tmp_path):
    # The writer made the run's directory and a chunk, then died before writing its zarr.json.
    url = str(tmp_path / "early.zarr")
    open_store(url)
    run_id = "20261125T000000.000000Z-deadbeef"
    chunk = tmp_path / "early.zarr" / "runs" / run_id / "outputs" / "a" / "c" / "0"
    chunk.parent.mkdir(parents=True)
    chunk.write_bytes(b"partial")
    rs = open_store(url, create=False)
    [summary] = rs.runs()
    assert summary.run_id == run_id and not summary.complete
    with pytest.raises(RunIncompleteError, match="killed before it began"):
        rs.load(run_id)


@pytest.mark.parametrize("left", ["empty directory", "half-written metadata"])
def test_a_run_killed_while_creating_its_group_is_incomplete_not_missing(tmp_path, left):
    # Killed after making the run's directory, before its zarr.json landed (nothing, or only the temporary
    # file an atomic write renames): `runs()` lists it, so loading it must say "incomplete", not "no run".
    url = str(tmp_path / "early.zarr")
    open_store(url)
    run_id = "20261125T000000.000000Z-0badf00d"
    d = tmp_path / "early.zarr" / "runs" / run_id
    d.mkdir(parents=True)
    if left == "half-written metadata":  # zarr's LocalStore writes <key>.<uuid>.partial, then renames it
        (d / f"zarr.json.{'0' * 32}.partial").write_bytes(b'{"zarr_for')
    rs = open_store(url, create=False)
    [summary] = rs.runs()
    assert summary.run_id == run_id and not summary.complete
    with pytest.raises(RunIncompleteError, match="killed before it began"):
        rs.load(run_id)
