"""What a signed bundle pins about its store: where the ledger ends, each run's digest and their Merkle root, the
listing of every file, and the digest of each file the ledger does not pin.

A hash chain cannot show that its newest entries were cut off, that it was rebuilt from scratch with recomputed
digests, or that an entry was appended later: an `Anchor` recorded (and signed) at publication can. Rules, so a
reviewer can re-check without depin:

- run leaf: ``sha256(0x00 || "<seq> <run id> <manifest sha256>")`` for each ledger entry in order;
- Merkle root: RFC 6962 (``node = sha256(0x01 || left || right)``, the larger power-of-two split first;
  ``sha256("")`` for an empty ledger);
- listing digest: ``sha256`` of ``"<key>\\n"`` for every key of the store, sorted;
- unpinned files: ``sha256`` of each file no ledger digest covers (root document, runs that are not sealed,
  pending records, killed writers' leftovers).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from depin_jupyter.store import _io, audit, ledger
from depin_jupyter.store._digest import sha256_hex
from depin_jupyter.store._layout import GROUPS
from depin_jupyter.store.findings import Problem
from depin_jupyter.store.manifest import MANIFEST_ATTR, RunManifest

if TYPE_CHECKING:
    from depin_jupyter.store._store import ResultStore

__all__ = ["Anchor", "anchor_of", "check_anchor", "merkle_root", "run_leaf"]

_RESTORE = "re-download the bundle, or ask its author"


@dataclass(frozen=True)
class Anchor:
    """The state of a store at publication (JSON form: `to_json`)."""

    ledger_entries: int
    head_sha256: str
    runs: tuple[tuple[int, str, str], ...]
    runs_merkle_root: str
    files: int
    listing_sha256: str
    unpinned: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"ledger_entries": self.ledger_entries, "head_sha256": self.head_sha256,
                "runs": [list(r) for r in self.runs], "runs_merkle_root": self.runs_merkle_root,
                "files": self.files, "listing_sha256": self.listing_sha256, "unpinned": dict(self.unpinned)}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Anchor:
        """Inverse of `to_json`; KeyError/TypeError/ValueError on a malformed document."""
        return cls(int(doc["ledger_entries"]), str(doc["head_sha256"]),
                   tuple((int(s), str(r), str(m)) for s, r, m in doc["runs"]), str(doc["runs_merkle_root"]),
                   int(doc["files"]), str(doc["listing_sha256"]), {str(k): str(v) for k, v in doc["unpinned"].items()})


def run_leaf(seq: int, run_id: str, manifest_sha256: str) -> bytes:
    """The Merkle leaf hash of one sealed run."""
    return hashlib.sha256(b"\x00" + f"{seq} {run_id} {manifest_sha256}".encode()).digest()


def merkle_root(leaves: Sequence[bytes]) -> str:
    """RFC 6962 Merkle tree hash of leaf hashes, hex."""
    def mth(lo: int, hi: int) -> bytes:
        if hi - lo == 1:
            return leaves[lo]
        split = 1 << ((hi - lo - 1).bit_length() - 1)
        return hashlib.sha256(b"\x01" + mth(lo, lo + split) + mth(lo + split, hi)).digest()

    return (mth(0, len(leaves)) if leaves else hashlib.sha256(b"").digest()).hex()


def _sealed_manifests(rs: ResultStore, entries: Sequence[ledger.LedgerEntry]) -> dict[str, RunManifest]:
    """The manifests the ledger pins (those whose bytes match their entry)."""
    raws = _io.get_many(rs.zarr_store, [f"runs/{e.run_id}/zarr.json" for e in entries])
    out = {}
    for e in entries:
        raw = raws[f"runs/{e.run_id}/zarr.json"]
        if raw is not None and sha256_hex(raw) == e.manifest_sha256:
            try:
                out[e.run_id] = RunManifest.from_json(json.loads(raw)["attributes"][MANIFEST_ATTR])
            except (ValueError, KeyError, TypeError):
                continue
    return out


def _pinned(keys: Sequence[str], entries: Sequence[ledger.LedgerEntry],
            manifests: Mapping[str, RunManifest]) -> set[str]:
    """Keys whose exact bytes follow from the ledger (checked by `depin verify` itself)."""
    sealed = {e.run_id for e in entries}
    pinned = set(audit.sealed_keys(manifests)) | {f"{g}/zarr.json" for g in GROUPS}
    for k in keys:
        parts = k.split("/")
        if k.startswith("ledger/") and len(parts) == 3:
            pinned.add(k)
        elif k.startswith("depin/index/") and len(parts) == 4 and parts[2] in sealed:
            pinned.add(k)
        elif k.startswith("depin/cache/") and (len(parts) == 4 or (len(parts) == 5 and parts[3] in sealed)):
            pinned.add(k)
    return pinned


def anchor_of(rs: ResultStore) -> Anchor:
    """The anchor of ``rs`` as it is now (call it on a store that verifies)."""
    store = rs.zarr_store
    entries, _ = ledger.read_chain(store)
    keys = audit.all_keys(store)
    loose = sorted(set(keys) - _pinned(keys, entries, _sealed_manifests(rs, entries)))
    digests = _io.hash_keys(store, loose)
    runs = tuple((e.seq, e.run_id, e.manifest_sha256) for e in entries)
    return Anchor(ledger_entries=len(entries), head_sha256=ledger.head_digest(store), runs=runs,
                  runs_merkle_root=merkle_root([run_leaf(*r) for r in runs]), files=len(keys),
                  listing_sha256=_listing_digest(keys), unpinned={k: d for k, d in digests.items() if d is not None})


def _listing_digest(keys: Sequence[str]) -> str:
    return hashlib.sha256("".join(f"{k}\n" for k in sorted(keys)).encode()).hexdigest()


def check_anchor(rs: ResultStore, anchor: Anchor) -> list[Problem]:
    """Where ``rs`` departs from ``anchor``: a ledger cut, extended or rewritten, replaced runs, changed files."""
    store = rs.zarr_store
    entries, _ = ledger.read_chain(store)
    problems = _check_ledger(entries, anchor)
    if merkle_root([run_leaf(*r) for r in anchor.runs]) != anchor.runs_merkle_root:
        problems.append(Problem("the signed run list does not give the signed Merkle root: the statement is "
                                f"inconsistent; {_RESTORE}", key="(signed statement)"))
    keys = audit.all_keys(store)
    digests = _io.hash_keys(store, sorted(anchor.unpinned))
    for key, want in sorted(anchor.unpinned.items()):
        got = digests.get(key)
        if got != want:
            what = "is missing" if got is None else "differs from its signed SHA-256"
            problems.append(Problem(f"{what} (a file the ledger does not pin, so the signature does); {_RESTORE}",
                                    run_id=key.split("/")[1] if key.startswith("runs/") else None, key=key))
    if not problems and (len(keys) != anchor.files or _listing_digest(keys) != anchor.listing_sha256):
        problems.append(Problem(f"the store holds {len(keys)} files, the signed listing {anchor.files} (files added, "
                                f"removed or renamed after signing; `depin verify` on the store names strays); "
                                f"{_RESTORE}", key="(file listing)"))
    return problems


def _check_ledger(entries: Sequence[ledger.LedgerEntry], anchor: Anchor) -> list[Problem]:
    """The ledger must end exactly at the signed head, and every run must be the signed one."""
    problems = []
    have = {e.seq: e for e in entries}
    newest = max(have, default=0)
    n = anchor.ledger_entries
    if newest < n:
        problems.append(Problem(f"the ledger ends at entry {newest}, but the signed head is entry {n}: entries "
                                f"{newest + 1}..{n} were cut off after signing (truncated); {_RESTORE}",
                                ledger_seq=newest + 1))
    for e in entries:
        if e.seq > n:
            problems.append(Problem(f"comes after the signed head (entry {n}): run {e.run_id} was added after "
                                    f"signing (backdated or appended); it is not part of the author's claim",
                                    ledger_seq=e.seq, run_id=e.run_id))
    for seq, run_id, digest in anchor.runs:
        got = have.get(seq)
        if got is not None and (got.run_id, got.manifest_sha256) != (run_id, digest):
            problems.append(Problem(f"seals run {got.run_id} with manifest {got.manifest_sha256[:16]}…, but the "
                                    f"signed entry {seq} sealed run {run_id} with manifest {digest[:16]}…: the run "
                                    f"was replaced or the store rebuilt after signing; {_RESTORE}", ledger_seq=seq))
    head = have.get(n)
    if head is not None and n and head.raw_sha256 != anchor.head_sha256 and not problems:
        problems.append(Problem("differs from the signed head (its bytes were rewritten after signing); "
                                f"{_RESTORE}", ledger_seq=n))
    return problems
