"""`depin publish`: a signed bundle (notebook, store copy, lock, RO-Crate, signature) that verifies and reproduces."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_reproduce import _notebook, published  # noqa: F401  (the fixture: a notebook run into a store)

from depin_jupyter.errors import DepinUsageError, StoreIntegrityError
from depin_jupyter.reproduce.publish import CRATE_FILE, LOCK_FILE, SIGNATURE_FILE, STORE_DIR, open_bundle, publish

DEPIN = os.path.join(os.path.dirname(sys.executable), "depin")


def _depin(*args, env=None):
    return subprocess.run([DEPIN, *map(str, args)], capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})


def test_bundle_holds_everything_verifies_and_reproduces(published, author, tmp_path):  # noqa: F811
    nb_path, store = published
    out = tmp_path / "bundle"
    proc = _depin("publish", nb_path, "--store", store, "--out", out, "--author-id", "https://orcid.org/0000-0002-1825-0097",
                  "--affiliation", "Analytical Engine Society", "--affiliation-url", "https://example.org/")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "with 2 run(s)" in proc.stdout and "lacks what RO-Crate recommends" not in proc.stderr
    assert (out / "paper.ipynb").read_bytes() == nb_path.read_bytes()
    assert any(line.startswith("numpy==") for line in (out / LOCK_FILE).read_text().splitlines())
    crate = json.loads((out / CRATE_FILE).read_text())
    graph = {e["@id"]: e for e in crate["@graph"]}
    root = graph["./"]
    assert root["license"]["@id"] == "https://spdx.org/licenses/CC-BY-4.0" and root["description"]
    assert graph["https://orcid.org/0000-0002-1825-0097"]["name"] == "Ada Lovelace"
    assert graph["#signing-key"]["identifier"] == author.fingerprint
    actions = [e for e in graph.values() if e["@type"] == "CreateAction"]
    assert len(actions) == 2
    for action in actions:
        cell = action["object"][0] if isinstance(action["object"], list) else action["object"]
        assert graph[cell["@id"]]["text"].strip()
        assert graph[action["instrument"]["@id"]]["name"] == "Python"
        results = action["result"] if isinstance(action["result"], list) else [action["result"]]
        for res in results:
            if res["@id"].startswith(STORE_DIR):
                assert (out / res["@id"]).is_dir(), res  # each dataset named is in the copied store
    y = next(e for e in graph.values() if e.get("name") == "y" and e["@id"].startswith(STORE_DIR))
    assert y["identifier"].startswith("blake3:") and len(y["identifier"]) == 7 + 64 and "(1000,)" in y["description"]
    head = graph["#ledger-head"]["value"]
    signature = json.loads((out / SIGNATURE_FILE).read_text())
    assert signature["statement"]["store"]["head_sha256"] == head
    readme = (out / "README.md").read_text()
    assert author.fingerprint in readme and author.public_b64 in readme and head in readme
    assert graph["README.md"]["encodingFormat"] == "text/markdown" and "README.md" in signature["statement"]["files"]
    assert open_bundle(str(out)).runs and open_bundle(str(tmp_path)) is None

    proc = _depin("verify", out, "--key", author.fingerprint)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"signed by Ada Lovelace, key {author.fingerprint}" in proc.stdout
    report = tmp_path / "review.html"
    proc = _depin("reproduce", out, "--report", report, "--key", author.fingerprint)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "REPRODUCED" in proc.stdout and f"key {author.fingerprint}" in proc.stdout
    assert "<table>" in report.read_text() and json.loads(report.with_suffix(".json").read_text())["ok"]


def test_a_flipped_byte_or_an_edited_notebook_fails_verify_and_stops_reproduce(published, author, tmp_path):  # noqa: F811
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
    assert proc.returncode == 1 and "paper.ipynb: differs from the SHA-256 the author signed" in proc.stderr
    proc = _depin("reproduce", out2)
    assert proc.returncode == 1 and "paper.ipynb: differs from the SHA-256 the author signed" in proc.stdout


def test_an_unverifiable_store_is_not_published(published, author, tmp_path):  # noqa: F811
    nb_path, store = published
    chunk = next(p for p in store.rglob("*") if p.is_file() and "/c/" in str(p) and "runs" in str(p))
    chunk.write_bytes(b"\0" + chunk.read_bytes()[1:])
    with pytest.raises(StoreIntegrityError, match="does not verify; nothing was published"):
        publish(str(nb_path), str(store), str(tmp_path / "b"))
    assert not (tmp_path / "b").exists()


def test_publishing_needs_a_key_and_a_license_or_says_it_is_unsigned(published, tmp_path):  # noqa: F811
    nb_path, store = published
    with pytest.raises(DepinUsageError, match="no signing key at .*depin key create"):
        publish(str(nb_path), str(store), str(tmp_path / "b"), license="MIT")
    with pytest.raises(DepinUsageError, match="RO-Crate requires a license.*--license"):
        publish(str(nb_path), str(store), str(tmp_path / "b"), unsigned=True)
    proc = _depin("publish", nb_path, "--store", store, "--out", tmp_path / "b", "--license", "MIT", "--unsigned")
    assert proc.returncode == 0 and "NOT signed" in proc.stderr and "--author" in proc.stderr
    assert not (tmp_path / "b" / SIGNATURE_FILE).exists()
    proc = _depin("verify", tmp_path / "b")
    assert proc.returncode == 0 and "UNSIGNED" in proc.stdout and "warning the bundle is not signed" in proc.stdout
    proc = _depin("verify", tmp_path / "b", "--key", "SHA256:whoever")
    assert proc.returncode == 1 and "depin-signature.json is missing" in proc.stderr


def test_key_create_and_show(tmp_path):
    keys = tmp_path / "k"
    proc = _depin("key", "create", "--name", "Grace Hopper", "--dir", keys)
    assert proc.returncode == 0, proc.stderr
    assert (keys / "ed25519.pem").stat().st_mode & 0o777 == 0o600 and keys.stat().st_mode & 0o777 == 0o700
    fingerprint = next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("fingerprint:"))
    shown = _depin("key", "show", env={"DASK_DEPIN__KEYS__DIR": str(keys)})
    assert shown.returncode == 0 and fingerprint in shown.stdout and "Grace Hopper" in shown.stdout
    again = _depin("key", "create", "--dir", keys)
    assert again.returncode == 1 and "already exists" in again.stderr and fingerprint in again.stderr
    os.chmod(keys / "ed25519.pem", 0o644)
    shown = _depin("key", "show", "--dir", keys)
    assert shown.returncode == 1 and f"chmod 600 {keys / 'ed25519.pem'}" in shown.stderr
