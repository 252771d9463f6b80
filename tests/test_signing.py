"""Signed bundles: every forgery a hash chain alone cannot see (a cut ledger, a rebuilt store, a backdated run, a
re-signed or stripped bundle, an edited crate) is reported with its cause, and so is a flipped byte in any file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_reproduce import _notebook, published  # noqa: F401  (the fixture: a notebook run into a store)

from depin_jupyter.reproduce.publish import CRATE_FILE, SIGNATURE_FILE, STORE_DIR, check, publish
from depin_jupyter.reproduce.signing import create_key
from depin_jupyter.store import ledger, open_store

DEPIN = os.path.join(os.path.dirname(sys.executable), "depin")


def _verify(bundle, *keys):
    args = [DEPIN, "verify", str(bundle)] + [a for k in keys for a in ("--key", k)]
    proc = subprocess.run(args, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture
def signed(published, author, tmp_path):  # noqa: F811
    """A signed bundle whose store also holds a run that never finished (files no ledger digest covers)."""
    nb_path, store = published
    w = open_store(str(store), create=False).begin_run(code="never finished", inputs={}, options={}, cache_key=None)
    w.write_output("partial", np.arange(10.0))
    out = tmp_path / "bundle"
    publish(str(nb_path), str(store), str(out))
    assert _verify(out, author.fingerprint)[0] == 0
    return out


def _entries(bundle):
    return ledger.read_chain(open_store(str(bundle / STORE_DIR), create=False).zarr_store)[0]


def _store_alone_verifies(bundle):
    return open_store(str(bundle / STORE_DIR), create=False).verify().ok


def test_a_cut_ledger_is_reported(signed, author):
    last = _entries(signed)[-1]
    store = signed / STORE_DIR
    shutil.rmtree(store / "runs" / last.run_id)
    shutil.rmtree(store / "ledger" / f"{last.seq:012d}")
    shutil.rmtree(store / "depin" / "index" / last.run_id)
    for marker in store.glob(f"depin/cache/*/{last.run_id}"):
        shutil.rmtree(marker)
    assert _store_alone_verifies(signed)  # a hash chain alone cannot see it
    rc, out = _verify(signed, author.fingerprint)
    assert rc == 1 and (f"ledger entry {last.seq}: the ledger ends at entry {last.seq - 1}, but the signed head is "
                        f"entry {last.seq}: entries {last.seq}..{last.seq} were cut off after signing") in out


def test_a_store_rebuilt_with_the_same_run_ids_and_a_changed_value_is_reported(signed, author, tmp_path):
    src = open_store(str(signed / STORE_DIR), create=False)
    rebuilt = open_store(str(tmp_path / "rebuilt.zarr"))
    for s in [s for s in src.runs() if s.complete]:
        m = src.manifest(s.run_id)
        values = src.load(s.run_id, lazy=False)
        if "y" in values:
            values["y"] = values["y"] + 1.0  # the forged number, with every digest recomputed
        w = rebuilt.begin_run(code=m.code, inputs=dict(m.inputs), options=dict(m.options), cache_key=m.cache_key,
                              name=m.name, run_id=m.run_id)
        for k, v in values.items():
            w.write_output(k, v)
        w.finish(worker=dict(m.worker), environment=dict(m.environment), timings=dict(m.timings))
    shutil.rmtree(signed / STORE_DIR)
    shutil.copytree(tmp_path / "rebuilt.zarr", signed / STORE_DIR)
    assert _store_alone_verifies(signed)
    rc, out = _verify(signed, author.fingerprint)
    forged = next(e for e in _entries(signed) if "y" in src.manifest(e.run_id).outputs)
    assert rc == 1 and f"ledger entry {forged.seq}: seals run {forged.run_id} with manifest" in out
    assert "the run was replaced or the store rebuilt after signing" in out


def test_a_backdated_run_appended_with_a_valid_ledger_entry_is_reported(signed, author):
    rs = open_store(str(signed / STORE_DIR), create=False)
    w = rs.begin_run(code="y = x * 2 + offset\ntotal = float(y.sum())", inputs={}, options={}, cache_key=None,
                     name="double", run_id="20200101T000000.000000Z-0badc0de")
    w.write_output("y", np.full(1000, 7.0))
    w.write_output("total", 7000.0)
    w.finish()
    assert _store_alone_verifies(signed)
    n = len(_entries(signed)) - 1
    rc, out = _verify(signed, author.fingerprint)
    assert rc == 1 and (f"ledger entry {n + 1}: comes after the signed head (entry {n}): run "
                        "20200101T000000.000000Z-0badc0de was added after signing") in out


def test_a_bundle_re_signed_by_someone_else_names_them_and_fails_against_the_authors_key(signed, author, tmp_path):
    forger = create_key(tmp_path / "forger", name="Mallory")
    import dask

    nb = signed / "paper.ipynb"
    with dask.config.set({"depin.keys.dir": str(tmp_path / "forger")}):
        publish(str(nb), str(signed / STORE_DIR), str(tmp_path / "forged"))
    rc, out = _verify(tmp_path / "forged")
    assert rc == 0 and f"signed by Mallory, key {forger.fingerprint}" in out  # whose claim it is, said plainly
    rc, out = _verify(tmp_path / "forged", author.fingerprint)
    assert rc == 1 and f"signed by key {forger.fingerprint}, not by the key you expect ({author.fingerprint})" in out


def test_a_removed_signature_and_an_edited_crate_are_reported(signed, author, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(signed, copy)
    os.remove(copy / SIGNATURE_FILE)
    rc, out = _verify(copy)
    assert rc == 1 and "its RO-Crate names a signing key (the signature was removed)" in out

    crate = json.loads((signed / CRATE_FILE).read_text())
    total = next(e for e in crate["@graph"] if e.get("name") == "total")
    total["value"] = "999.0"
    (signed / CRATE_FILE).write_text(json.dumps(crate, indent=1))
    rc, out = _verify(signed, author.fingerprint)
    assert rc == 1 and "ro-crate-metadata.json: differs from the SHA-256 the author signed" in out


def _bundle_files(root):
    out = []
    for dirpath, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, n), root).replace(os.sep, "/") for n in names]
    return sorted(out)


def _located(text, rel):
    """The report names the flipped file, or the run or ledger entry it belongs to."""
    parts = rel.split("/")
    if parts[0] != STORE_DIR:
        return f"{rel}: " in text
    key = "/".join(parts[1:])
    if f"file {key}" in text or (parts[1] == "runs" and len(parts) > 3 and f"run {parts[2]}" in text):
        return True
    return parts[1] == "ledger" and len(parts) == 4 and f"ledger entry {int(parts[2])}:" in text


def test_a_flipped_byte_in_any_file_of_a_signed_bundle_is_found_and_located(signed, author, flip_byte):
    files = _bundle_files(signed)
    [unsealed] = [s.run_id for s in open_store(str(signed / STORE_DIR), create=False).runs() if not s.complete]
    assert SIGNATURE_FILE in files and any(f.startswith(f"{STORE_DIR}/runs/{unsealed}/partial/c/") for f in files)
    assert any(f.startswith(f"{STORE_DIR}/depin/pending/{unsealed}/") for f in files)
    rng = np.random.default_rng(20)
    for rel in files:
        path = signed / rel
        size = os.path.getsize(path)
        for pos in sorted({0, size // 2, size - 1, int(rng.integers(size))}):
            original = flip_byte(str(path), pos, rng)
            try:
                result = check(str(signed), keys=(author.fingerprint,))
                assert not result.ok, (rel, pos)
                assert _located(result.format(), rel), (rel, pos, result.format())
            finally:
                path.write_bytes(original)
    assert check(str(signed), keys=(author.fingerprint,)).ok


@pytest.fixture
def flip_byte():
    def flip(path, pos, rng):
        with open(path, "rb") as f:
            data = f.read()
        changed = bytearray(data)
        changed[pos] ^= int(rng.integers(1, 256))
        with open(path, "wb") as f:
            f.write(changed)
        return data

    return flip
