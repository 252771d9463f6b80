"""A bundle's signed statement (``depin-signature.json``) and the check a reviewer runs on a bundle.

The statement names the signer's public key and pins, at publication: the SHA-256 of the crate and of every
other file of the bundle, and the store's anchor (`depin_jupyter.store.anchor`: where the ledger ends, each run's
digest and their Merkle root, the file listing, the files the ledger does not pin). It is signed with the
author's Ed25519 key (`signing.py`). `check_bundle` checks the signature, that the crate names the same key,
every file, the store (`depin verify`'s checks) and that the store's ledger ends exactly at the signed head.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from depin_jupyter.errors import TrustError
from depin_jupyter.reproduce import signing

__all__ = ["STATEMENT_TYPE", "SIGNATURE_FILE", "BundleCheck", "check_bundle", "crate_file_mismatches", "sign_bundle",
           "sha256_file"]

SIGNATURE_FILE = "depin-signature.json"
STATEMENT_TYPE = "https://w3id.org/depin/bundle-statement/1"
_REFETCH = "re-download the bundle, or ask its author for the original"


def sha256_file(path: pathlib.Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sign_bundle(dest: pathlib.Path, key: signing.SigningKey, *, crate_file: str, store_dir: str,
                files: dict[str, str], anchor: dict[str, Any]) -> dict[str, Any]:
    """Write ``dest/depin-signature.json``: the statement and its signature; returns the statement."""
    statement = {
        "type": STATEMENT_TYPE,
        "signed": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "signer": {"algorithm": signing.ALGORITHM, "public_key": key.public_b64, "fingerprint": key.fingerprint,
                   "name": key.name},
        "crate": {"path": crate_file, "sha256": sha256_file(dest / crate_file)},
        "files": dict(sorted(files.items())),
        "store": {"path": store_dir, **anchor},
    }
    doc = {"statement": statement, "signature": {"algorithm": signing.ALGORITHM, "value": key.sign(statement)}}
    (dest / SIGNATURE_FILE).write_text(_text(doc))
    return statement


def _text(doc: dict[str, Any]) -> str:
    """The one byte form of a signature file (so any edit of it shows, even one that keeps its meaning)."""
    return json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=True) + "\n"


@dataclass
class BundleCheck:
    """What checking a bundle found: problems (any means it must not be trusted), who signed it, the store."""

    path: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    signer: dict[str, Any] | None = None
    store_report: Any = None

    @property
    def ok(self) -> bool:
        return not self.problems and (self.store_report is None or self.store_report.ok)

    def format(self) -> str:
        lines = [f"bundle {self.path}: " + (f"signed by {self.signer.get('name') or 'an unnamed author'}, key "
                                            f"{self.signer['fingerprint']}" if self.signer else "UNSIGNED")]
        lines += [f"MISMATCH {p}" for p in self.problems]
        lines += [f"warning {w}" for w in self.warnings]
        if self.store_report is not None:
            lines += self.store_report.format().splitlines()[:-1]  # its own verdict is replaced by the bundle's
        bad = len(self.problems) + (len(self.store_report.problems) if self.store_report is not None else 0)
        lines.append("OK" if self.ok else f"FAILED: {bad} problem(s)")
        return "\n".join(lines)


def _load_signature(path: pathlib.Path) -> tuple[dict[str, Any], str]:
    text = path.read_bytes().decode("ascii")
    doc = json.loads(text)
    if text != _text(doc):
        raise ValueError("its bytes are not the form depin writes (edited)")
    statement, value = doc["statement"], doc["signature"]["value"]
    if statement.get("type") != STATEMENT_TYPE or doc["signature"].get("algorithm") != signing.ALGORITHM:
        raise ValueError(f"not a {STATEMENT_TYPE} statement signed with {signing.ALGORITHM}")
    return statement, value


def _check_statement(bundle_dir: pathlib.Path, statement: dict[str, Any], crate: dict[str, Any],
                     check: BundleCheck) -> None:
    """The signed digests against the files, and the crate's key against the signer's."""
    signer = statement["signer"]
    if signing.fingerprint(base64.b64decode(signer["public_key"])) != signer["fingerprint"]:
        check.problems.append("the statement's fingerprint is not that of its public key (forged statement)")
    crate_path = bundle_dir / statement["crate"]["path"]
    if not crate_path.is_file() or sha256_file(crate_path) != statement["crate"]["sha256"]:
        check.problems.append(f"{statement['crate']['path']}: differs from the SHA-256 the author signed (the "
                              f"RO-Crate metadata was edited after signing); {_REFETCH}")
    keys = [e for e in crate.get("@graph", []) if e.get("@id") == "#signing-key"]
    if not keys or keys[0].get("value") != signer["public_key"]:
        check.problems.append("the RO-Crate does not name the key that signed the bundle (#signing-key): the "
                              f"signature was replaced; {_REFETCH}")
    for name, digest in statement["files"].items():
        p = bundle_dir / name
        if p.is_symlink() or not p.is_file():
            check.problems.append(f"{name}: missing (or not a plain file), but the author signed it; {_REFETCH}")
        elif sha256_file(p) != digest:
            check.problems.append(f"{name}: differs from the SHA-256 the author signed; {_REFETCH}")


def crate_file_mismatches(bundle_dir: pathlib.Path, crate: dict[str, Any]) -> list[str]:
    """Files the crate describes with a SHA-256 that is missing or differs (signed or not)."""
    bad = []
    for e in crate.get("@graph", []):
        types = e.get("@type", [])
        if "File" in ([types] if isinstance(types, str) else types) and e.get("sha256"):
            f = bundle_dir / e["@id"]
            if f.is_symlink() or not f.is_file() or sha256_file(f) != e["sha256"]:
                bad.append(e["@id"])
    return bad


def _strays(bundle_dir: pathlib.Path, known: set[str], store_dir: str) -> list[str]:
    """Files of the bundle directory that its crate and statement do not describe, and symlinks."""
    out = []
    for dirpath, dirnames, filenames in os.walk(bundle_dir, followlinks=False):
        rel_dir = os.path.relpath(dirpath, bundle_dir)
        if rel_dir == store_dir or rel_dir.startswith(store_dir + os.sep):
            dirnames[:] = []  # the store accounts for itself (`depin verify`)
            continue
        for name in [*dirnames, *filenames]:
            rel = os.path.normpath(os.path.join(rel_dir, name)).replace(os.sep, "/")
            full = bundle_dir / rel
            if full.is_symlink():
                out.append(f"{rel}: a symbolic link (to {os.readlink(full)}); a bundle holds its own files; {_REFETCH}")
            elif full.is_file() and rel not in known:
                out.append(f"{rel}: not described by the bundle's RO-Crate (added after publishing): remove it")
    return out


def check_bundle(bundle: Any, *, keys: Sequence[str] = (), crate_file: str, store_dir: str) -> BundleCheck:
    """Check a `publish.Bundle`: signature, signed digests, stray files, the store and its signed anchor.

    ``keys``: fingerprints the reviewer accepts (the author's, from the paper); empty accepts any signer but
    names it, and an unsigned bundle then only warns.
    """
    from depin_jupyter.store import open_store
    from depin_jupyter.store.anchor import Anchor, check_anchor

    check = BundleCheck(str(bundle.path))
    try:
        crate = json.loads((bundle.path / crate_file).read_text())
        if not isinstance(crate, dict) or not isinstance(crate.get("@graph"), list):
            raise ValueError("no @graph")
    except ValueError as exc:
        check.problems.append(f"{crate_file}: not readable RO-Crate metadata ({exc}); {_REFETCH}")
        crate = {"@graph": []}
    described = {e["@id"] for e in crate.get("@graph", []) if isinstance(e.get("@id"), str)}
    sig_path = bundle.path / SIGNATURE_FILE
    statement = None
    if sig_path.is_file():
        try:
            statement, value = _load_signature(sig_path)
            signing.verify_signature(statement["signer"]["public_key"], statement, value)
            check.signer = dict(statement["signer"])
        except (ValueError, KeyError, TypeError, TrustError) as exc:
            check.problems.append(f"{SIGNATURE_FILE}: not a valid signature of its statement ({exc}); the bundle "
                                  f"was altered after signing; {_REFETCH}")
            statement = None
    elif keys or "#signing-key" in described:
        check.problems.append(f"{SIGNATURE_FILE} is missing: the bundle is not signed"
                              + (" but its RO-Crate names a signing key (the signature was removed)"
                                 if "#signing-key" in described else "") + f"; {_REFETCH}")
    else:
        check.warnings.append("the bundle is not signed: nothing shows whose claim it is, or that its ledger was "
                              "not cut or rebuilt; ask the author for a signed bundle (`depin publish` signs)")
    if check.signer and keys and check.signer["fingerprint"] not in keys:
        check.problems.append(f"signed by key {check.signer['fingerprint']}, not by the key you expect "
                              f"({', '.join(keys)}): this is not the author's claim; {_REFETCH}")
    if statement is not None:
        _check_statement(bundle.path, statement, crate, check)
    check.problems += [f"{name}: differs from the SHA-256 in the bundle's RO-Crate metadata; {_REFETCH}"
                       for name in crate_file_mismatches(bundle.path, crate)
                       if not any(p.startswith(f"{name}:") for p in check.problems)]
    check.problems += _strays(bundle.path, described | {crate_file, SIGNATURE_FILE}, store_dir)
    if check.problems:
        return check
    from depin_jupyter.store import ResultStore, StoreAccessError

    anchor = Anchor.from_json(statement["store"]) if statement is not None else None
    try:
        rs = open_store(str(bundle.store), create=False, writable=False)
    except StoreAccessError as exc:
        check.problems.append(f"{store_dir}: {exc}")
        rs = ResultStore(str(bundle.store.resolve()))  # not a store any more: still name the files that changed
        check.problems += [f"{store_dir}: {p}" for p in check_anchor(rs, anchor)] if anchor else []
        return check
    check.store_report = rs.verify()
    check.problems += [f"{store_dir}: {p}" for p in check_anchor(rs, anchor)] if anchor else []
    return check
