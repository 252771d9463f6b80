"""`depin publish`: a bundle (notebook, store copy, lock, RO-Crate) that verifies and reproduces."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_reproduce import _notebook, published  # noqa: F401  (the fixture: a notebook run into a store)

from depin_jupyter.errors import StoreIntegrityError
from depin_jupyter.publish import CRATE_FILE, LOCK_FILE, STORE_DIR, open_bundle, publish

DEPIN = os.path.join(os.path.dirname(sys.executable), "depin")


def _depin(*args):
    return subprocess.run([DEPIN, *map(str, args)], capture_output=True, text=True)


def test_bundle_holds_everything_verifies_and_reproduces(published, tmp_path):  # noqa: F811
    nb_path, store = published
    out = tmp_path / "bundle"
    proc = _depin("publish", nb_path, "--store", store, "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "with 2 run(s)" in proc.stdout
    assert (out / "paper.ipynb").read_bytes() == nb_path.read_bytes()
    assert any(line.startswith("numpy==") for line in (out / LOCK_FILE).read_text().splitlines())
    crate = json.loads((out / CRATE_FILE).read_text())
    graph = {e["@id"]: e for e in crate["@graph"]}
    actions = [e for e in graph.values() if e["@type"] == "CreateAction"]
    assert len(actions) == 2
    for action in actions:
        assert graph[action["instrument"]["@id"]]["text"].strip()
        for res in action["result"]:
            if res["@id"].startswith(STORE_DIR):
                assert (out / res["@id"]).is_dir(), res  # each dataset named is in the copied store
    y = next(e for e in graph.values() if e.get("name") == "y" and e["@id"].startswith(STORE_DIR))
    assert len(y["blake3"]) == 64 and "sha256" not in y and "(1000,)" in y["description"]  # the algorithm used
    assert crate["@context"][1]["blake3"].endswith("#blake3")
    assert open_bundle(str(out)).runs and open_bundle(str(tmp_path)) is None

    assert _depin("verify", out).returncode == 0
    report = tmp_path / "review.html"
    proc = _depin("reproduce", out, "--report", report)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "REPRODUCED" in proc.stdout
    assert "<table>" in report.read_text() and json.loads(report.with_suffix(".json").read_text())["ok"]


def test_a_flipped_byte_or_an_edited_notebook_fails_verify_and_stops_reproduce(published, tmp_path):  # noqa: F811
    nb_path, store = published
    out = tmp_path / "bundle"
    publish(str(nb_path), str(store), str(out))
    chunk = next(p for p in (out / STORE_DIR).rglob("*") if p.is_file() and "/c/" in str(p))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    proc = _depin("verify", out)
    assert proc.returncode == 1 and "MISMATCH" in proc.stdout + proc.stderr
    proc = _depin("reproduce", out)
    assert proc.returncode == 1 and "does not verify; nothing was re-executed" in proc.stdout

    out2 = tmp_path / "bundle2"
    publish(str(nb_path), str(store), str(out2))
    nb = out2 / "paper.ipynb"
    nb.write_text(nb.read_text().replace("offset = 0.0", "offset = 0.5"))
    proc = _depin("verify", out2)
    assert proc.returncode == 1 and "paper.ipynb" in proc.stderr
    proc = _depin("reproduce", out2)
    assert proc.returncode == 1 and "differ from its RO-Crate record: paper.ipynb" in proc.stderr


def test_an_unverifiable_store_is_not_published(published, tmp_path):  # noqa: F811
    nb_path, store = published
    chunk = next(p for p in store.rglob("*") if p.is_file() and "/c/" in str(p) and "runs" in str(p))
    chunk.write_bytes(b"\0" + chunk.read_bytes()[1:])
    with pytest.raises(StoreIntegrityError, match="does not verify; nothing was published"):
        publish(str(nb_path), str(store), str(tmp_path / "b"))
    assert not (tmp_path / "b").exists()
