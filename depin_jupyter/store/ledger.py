"""The ledger: an append-only hash chain of sealed runs, so any later edit or reordering shows.

Entry ``n`` is the Zarr group ``ledger/<n, 12 digits>`` whose ``zarr.json`` attribute
``depin_ledger_entry`` holds {seq, run_id, manifest_sha256, prev_entry_sha256, cache_key, time,
entry_sha256}; ``prev_entry_sha256`` is the SHA-256 of entry ``n-1``'s raw ``zarr.json`` bytes
(for the first entry: of the store's root ``zarr.json``, so the root document is pinned too; stores
written before that hold 64 zeros there) and ``entry_sha256`` the SHA-256 of the canonical JSON of the
other fields.
Concurrent writers claim a sequence number by an exclusive create of its key and move on when
another writer got there first. Like any hash chain without an outside anchor, it cannot show that
its newest entries were cut off: publish the head digest (`head_digest`) to pin it.
"""

from __future__ import annotations

import datetime as _dt
import json
import random
import time
from dataclasses import dataclass
from typing import Any

from zarr.abc.store import Store

from depin_jupyter.store import _io
from depin_jupyter.store._digest import canonical_json, group_document, sha256_hex

PREFIX = "ledger"
ENTRY_ATTR = "depin_ledger_entry"
GENESIS = "0" * 64
_FIELDS = ("seq", "run_id", "manifest_sha256", "prev_entry_sha256", "cache_key", "time")


@dataclass(frozen=True)
class LedgerEntry:
    """One sealed run in chain order; ``raw_sha256`` is the digest of its stored bytes."""

    seq: int
    run_id: str
    manifest_sha256: str
    prev_entry_sha256: str
    cache_key: str | None
    time: str
    entry_sha256: str
    raw_sha256: str


class LedgerEntryError(ValueError):
    """A stored ledger entry that is unreadable, not canonical, or whose self-digest does not match."""


def entry_key(seq: int) -> str:
    """The store key of entry ``seq``."""
    return f"{PREFIX}/{seq:012d}/zarr.json"


def now() -> str:
    """UTC time in ISO 8601 with microseconds, the format of every depin timestamp."""
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def encode_entry(fields: dict[str, Any]) -> bytes:
    """The exact bytes stored for an entry (its self-digest added)."""
    body = {k: fields[k] for k in _FIELDS}
    body["entry_sha256"] = sha256_hex(canonical_json(body))
    return group_document({ENTRY_ATTR: body})


def parse_entry(raw: bytes, seq: int) -> LedgerEntry:
    """Check and decode the bytes stored for entry ``seq``; LedgerEntryError says what is wrong."""
    try:
        body = json.loads(raw)["attributes"][ENTRY_ATTR]
        fields = {k: body[k] for k in _FIELDS}
        claimed = body["entry_sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise LedgerEntryError(f"unreadable ({type(exc).__name__}: {exc})") from None
    if sha256_hex(canonical_json(fields)) != claimed:
        raise LedgerEntryError("its fields do not match its own entry_sha256 (edited)")
    if encode_entry(fields) != raw:
        raise LedgerEntryError("its bytes are not the canonical form of its fields (edited)")
    if fields["seq"] != seq:
        raise LedgerEntryError(f"it claims seq {fields['seq']} (moved or renumbered)")
    return LedgerEntry(**fields, entry_sha256=claimed, raw_sha256=sha256_hex(raw))


def sequence_numbers(store: Store) -> list[int]:
    """The sequence numbers that have a directory under ``ledger/`` (an entry may still be absent)."""
    return sorted(int(n) for n in _io.list_dir(store, PREFIX) if n.isdigit())


def _head(store: Store) -> tuple[int, bytes | None]:
    """The newest present entry: (seq, raw bytes), or (0, None) for an empty ledger."""
    for seq in reversed(sequence_numbers(store)):
        raw = _io.get(store, entry_key(seq))
        if raw is not None:
            return seq, raw
    return 0, None


def root_link(store: Store) -> str:
    """What entry 1 links to: the SHA-256 of the store's root ``zarr.json`` (GENESIS if there is none)."""
    raw = _io.get(store, "zarr.json")
    return GENESIS if raw is None else sha256_hex(raw)


def append(store: Store, run_id: str, manifest_sha256: str, cache_key: str | None,
           *, max_attempts: int = 1000) -> LedgerEntry:
    """Chain a sealed run; safe against other writers appending at the same time."""
    seq, prev_raw = _head(store)
    for _ in range(max_attempts):
        fields = {
            "seq": seq + 1,
            "run_id": run_id,
            "manifest_sha256": manifest_sha256,
            "prev_entry_sha256": root_link(store) if prev_raw is None else sha256_hex(prev_raw),
            "cache_key": cache_key,
            "time": now(),
        }
        raw = encode_entry(fields)
        if _io.create(store, entry_key(seq + 1), raw):
            return parse_entry(raw, seq + 1)
        # someone else took seq + 1: chain onto theirs and try the next number
        seq += 1
        prev_raw = _io.get(store, entry_key(seq))
        if prev_raw is None:  # their write is not visible yet (eventual listing): re-read the head
            time.sleep(random.uniform(0.001, 0.02))
            seq, prev_raw = _head(store)
    raise TimeoutError(f"could not append run {run_id} to the ledger after {max_attempts} attempts")


def find(store: Store, run_id: str) -> LedgerEntry | None:
    """The entry sealing ``run_id``, scanning from the newest (fallback when the index lacks it)."""
    for seq in reversed(sequence_numbers(store)):
        raw = _io.get(store, entry_key(seq))
        if raw is None:
            continue
        try:
            entry = parse_entry(raw, seq)
        except LedgerEntryError:
            continue
        if entry.run_id == run_id:
            return entry
    return None


def read_chain(store: Store) -> tuple[list[LedgerEntry], list[tuple[int, str]]]:
    """All entries in order, plus problems as (seq, message): gaps, edits and broken links."""
    seqs = sequence_numbers(store)
    raws = _io.get_many(store, [entry_key(s) for s in seqs])
    present = {s: raws[entry_key(s)] for s in seqs if raws[entry_key(s)] is not None}
    last = max(present, default=0)
    entries: list[LedgerEntry] = []
    problems: list[tuple[int, str]] = []
    prev_sha: str | None = None  # entry 1 links to the root document: `audit.check_root` checks that link
    seen: dict[str, int] = {}
    for seq in range(1, last + 1):
        raw = present.get(seq)
        if raw is None:
            problems.append((seq, "missing (deleted, or the chain was cut)"))
            prev_sha = None
            continue
        try:
            entry = parse_entry(raw, seq)
        except LedgerEntryError as exc:
            problems.append((seq, str(exc)))
            prev_sha = sha256_hex(raw)
            continue
        if prev_sha is not None and entry.prev_entry_sha256 != prev_sha:
            problems.append((seq, "prev_entry_sha256 does not match the previous entry (chain broken)"))
        if entry.run_id in seen:
            problems.append((seq, f"run {entry.run_id} was already sealed by entry {seen[entry.run_id]}"))
        seen[entry.run_id] = seq
        entries.append(entry)
        prev_sha = entry.raw_sha256
    return entries, problems


def head_digest(store: Store) -> str:
    """SHA-256 of the newest entry's bytes: publish it to pin the whole chain."""
    _, raw = _head(store)
    return GENESIS if raw is None else sha256_hex(raw)
