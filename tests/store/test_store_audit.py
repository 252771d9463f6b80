"""Every file of a store is accounted for: one flipped byte anywhere is found and located; deleted ledger entries,
symlinks out of the store and stray files are reported; a killed writer's leftovers are only noted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from depin_jupyter.store import ledger, open_store

DEPIN = os.path.join(os.path.dirname(sys.executable), "depin")


@pytest.fixture
def sealed_only(tmp_path, write_run, small_chunks):
    """A store of sealed runs of every output kind, with cache markers and indexes, and no unsealed run."""
    rs = open_store(str(tmp_path / "audited.zarr"))
    rng = np.random.default_rng(11)
    write_run(rs, {"grid": rng.random((30, 20)), "n": 3, "s": "text"}, cache_key="k1")
    write_run(rs, {"ds": xr.Dataset({"t": (("x", "y"), rng.random((8, 9)))}, coords={"x": np.arange(8)}),
                   "lazy": da.from_array(rng.integers(0, 9, 700), chunks=100)}, cache_key="k2")
    write_run(rs, {"flags": rng.random(3000) > 0.5}, name="flags")
    assert rs.verify().ok, rs.verify().format()
    return rs


def _files(root):
    out = []
    for dirpath, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, n), root).replace(os.sep, "/") for n in names]
    return sorted(out)


def _located(report, rel):
    """Whether some problem names the place of ``rel``: its file, its run, or its ledger entry."""
    parts = rel.split("/")
    for p in report.problems:
        if p.key == rel:
            return True
        if parts[0] == "runs" and len(parts) > 2 and p.run_id == parts[1]:
            return True
        if parts[0] == "ledger" and len(parts) == 3 and p.ledger_seq == int(parts[1]):
            return True
    return False


def test_a_flipped_byte_in_any_file_is_found_and_located(sealed_only, flip_byte):
    rs = sealed_only
    files = _files(rs.url)
    groups = {"zarr.json", "runs/zarr.json", "ledger/zarr.json", "depin/zarr.json", "depin/cache/zarr.json",
              "depin/index/zarr.json", "depin/pending/zarr.json"}
    assert groups <= set(files) and any(f.startswith("depin/cache/") and f.count("/") == 4 for f in files)
    rng = np.random.default_rng(2026)
    flips = 0
    for rel in files:
        path = os.path.join(rs.url, rel)
        size = os.path.getsize(path)
        for pos in sorted({0, size // 2, size - 1, *rng.integers(0, size, 3).tolist()}):
            original = flip_byte(path, int(pos), rng)
            try:
                report = rs.verify()
                assert not report.ok, (rel, pos)
                assert _located(report, rel), (rel, pos, report.format())
                flips += 1
            finally:
                with open(path, "wb") as f:
                    f.write(original)
    assert flips > 4 * len(files) and rs.verify().ok


def test_a_changed_digit_in_the_root_document_is_found(sealed_only):
    root = os.path.join(sealed_only.url, "zarr.json")
    text = open(root).read()
    created = json.loads(text)["attributes"]["depin_store"]["created"]
    changed = created[:-3] + ("1" if created[-3] != "1" else "2") + created[-2:]  # still a valid timestamp
    with open(root, "w") as f:
        f.write(text.replace(created, changed))
    text = sealed_only.verify().format()
    assert "MISMATCH file zarr.json: differs from the digest ledger entry 1 holds" in text


@pytest.mark.parametrize("how", ["entry file", "entry directory"])
def test_deleting_the_newest_ledger_entry_fails(sealed_only, how):
    rs = sealed_only
    newest = ledger.read_chain(rs.zarr_store)[0][-1]
    target = os.path.join(rs.url, "ledger", f"{newest.seq:012d}")
    if how == "entry file":
        os.remove(os.path.join(target, "zarr.json"))
    else:
        shutil.rmtree(target)
    report = rs.verify()
    assert not report.ok
    text = report.format()
    assert (f"file depin/index/{newest.run_id}/zarr.json (run {newest.run_id}): says run {newest.run_id} was sealed "
            f"by ledger entry {newest.seq}, but no ledger entry seals it") in text
    assert f"run {newest.run_id}: its writer finished sealing it" in text
    proc = subprocess.run([DEPIN, "verify", rs.url], capture_output=True, text=True)
    assert proc.returncode == 1 and "its ledger entry was deleted" in proc.stderr


def test_deleting_the_newest_entry_with_every_trace_is_noted_not_hidden(sealed_only):
    # Without an outside anchor this looks like a writer killed while sealing; a signed bundle tells them apart
    # (tests/test_signing.py). Here the store still verifies, and says what it cannot know.
    rs = sealed_only
    newest = ledger.read_chain(rs.zarr_store)[0][-1]
    os.remove(os.path.join(rs.url, "ledger", f"{newest.seq:012d}", "zarr.json"))
    shutil.rmtree(os.path.join(rs.url, "depin", "index", newest.run_id))
    os.makedirs(os.path.join(rs.url, "depin", "pending", newest.run_id))
    with open(os.path.join(rs.url, "depin", "pending", newest.run_id, "zarr.json"), "wb") as f:
        f.write(open(os.path.join(rs.url, "depin", "pending", "zarr.json"), "rb").read())
    report = rs.verify()
    assert report.ok and any(s.run_id == newest.run_id and s.status == "unsealed" for s in report.incomplete)
    assert any("is empty: an append was interrupted, or the newest entry was deleted" in n for n in report.notes)


def test_symlinks_out_of_the_store_are_reported(sealed_only, tmp_path):
    rs = sealed_only
    runs = [s.run_id for s in rs.runs()]
    chunk = os.path.join(rs.url, "runs", runs[0], "grid", "c", "0", "0")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(chunk, outside / "chunk")
    os.remove(chunk)
    os.symlink(outside / "chunk", chunk)  # same bytes: the digests alone would pass
    run_dir = os.path.join(rs.url, "runs", runs[2])
    shutil.move(run_dir, outside / "run")
    os.symlink(outside / "run", run_dir)
    text = rs.verify().format()
    assert f"MISMATCH file runs/{runs[0]}/grid/c/0/0 (run {runs[0]}): a symbolic link (to {outside / 'chunk'})" in text
    assert f"MISMATCH file runs/{runs[2]} (run {runs[2]}): a symbolic link (to {outside / 'run'})" in text


def test_stray_files_anywhere_are_reported(sealed_only):
    rs = sealed_only
    run = rs.runs()[0].run_id
    stray = ["notes.txt", "runs/readme", f"runs/{run}/grid/extra", "ledger/000000000001/copy.json",
             "depin/index/zarr.json.bak", "depin/cache/abc/def/ghi/zarr.json", "extra/zarr.json"]
    for rel in stray:
        os.makedirs(os.path.dirname(os.path.join(rs.url, rel)) or rs.url, exist_ok=True)
        with open(os.path.join(rs.url, rel), "w") as f:
            f.write("{}")
    report = rs.verify()
    assert {p.key for p in report.problems} >= set(stray), report.format()


def test_a_killed_writers_leftovers_are_notes_and_an_unsealed_run_is_checked(sealed_only):
    rs = sealed_only
    run = rs.runs()[0].run_id
    leftover = os.path.join(rs.url, "depin", "pending", run, "grid")
    os.makedirs(leftover)
    with open(os.path.join(leftover, "zarr.json"), "w") as f:
        f.write("{}")
    with open(os.path.join(rs.url, "runs", run, f"zarr.json.{'0' * 32}.partial"), "w") as f:
        f.write("{")
    w = rs.begin_run(code="unfinished", inputs={}, options={}, cache_key=None)
    w.write_output("x", np.ones(5))
    report = rs.verify()
    assert report.ok, report.format()
    assert any(f"leftover depin/pending/{run}/grid/zarr.json" in n for n in report.notes)
    assert any(".partial: a temporary file of a writer killed" in n for n in report.notes)
    meta = os.path.join(rs.url, "runs", w.run_id, "x", "zarr.json")
    with open(meta, "w") as f:
        f.write('{"zarr_format": 3, "node_type": "arr')
    text = rs.verify().format()
    assert f"MISMATCH file runs/{w.run_id}/x/zarr.json (run {w.run_id}): not valid JSON" in text
