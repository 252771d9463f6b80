"""What a run group's zarr.json says: the attributes depin keeps there, and a run's summary from them."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from depin_jupyter.store import ledger
from depin_jupyter.store._digest import group_document, sha256_hex
from depin_jupyter.store.manifest import MANIFEST_ATTR, RunSummary

__all__ = ["GROUPS", "RUN_ATTR", "RUN_ID", "STORE_ATTR", "cache_marker_document", "cache_prefix", "group_attrs",
           "index_document", "summarize"]


STORE_ATTR = "depin_store"


RUN_ATTR = "depin_run"


RUN_ID = re.compile(r"^\d{8}T\d{6}\.\d{6}Z-[0-9a-z]{4,32}$")


GROUPS = ("runs", "ledger", "depin", "depin/index", "depin/cache", "depin/pending")
"""The store's fixed groups (each an attribute-less Zarr group), created with the store."""


def cache_prefix(cache_key: str) -> str:
    """Where the cache markers of ``cache_key`` live."""
    return f"depin/cache/{hashlib.sha256(cache_key.encode()).hexdigest()}"


def index_document(entry: ledger.LedgerEntry) -> bytes:
    """The exact bytes of ``depin/index/<run>/zarr.json`` for the run ``entry`` seals (derived from the ledger)."""
    return group_document({"depin_index": {"seq": entry.seq, "manifest_sha256": entry.manifest_sha256}})


def cache_marker_document(entry: ledger.LedgerEntry) -> bytes:
    """The exact bytes of the cache marker ``depin/cache/<key hash>/<run>/zarr.json`` (derived from the ledger)."""
    return group_document({"depin_cache": {"seq": entry.seq, "run_id": entry.run_id}})


def group_attrs(raw: bytes) -> dict[str, Any]:
    """The attributes of a group zarr.json (ValueError if it is not one)."""
    doc = json.loads(raw)
    if not isinstance(doc, dict) or doc.get("node_type") != "group":
        raise ValueError("not a Zarr group document")
    return dict(doc.get("attributes") or {})


def summarize(run_id: str, raw: bytes | None, entry: ledger.LedgerEntry | None) -> RunSummary:
    """A RunSummary from a run group's zarr.json bytes and its ledger entry (if any)."""
    if raw is None:
        return RunSummary(run_id, None, "incomplete", False, "", (), None, "no run metadata (writer killed)")
    try:
        attrs = group_attrs(raw)
        begin = attrs.get(RUN_ATTR, {})
        manifest = attrs.get(MANIFEST_ATTR)
    except ValueError:
        return RunSummary(run_id, None, "unreadable", False, "", (), None, "zarr.json is not valid JSON")
    name, created, key = begin.get("name"), begin.get("created", ""), begin.get("cache_key")
    if manifest is None:
        status = "aborted" if begin.get("status") == "aborted" else "incomplete"
        detail = begin.get("reason", "") if status == "aborted" else "no manifest (running, or its writer died)"
        return RunSummary(run_id, name, status, False, created, (), key, detail)
    outputs = tuple(manifest.get("outputs", {}))
    if entry is None:
        return RunSummary(run_id, name, "unsealed", False, created, outputs, key,
                          "manifest written but no ledger entry (stopped while sealing)")
    if entry.manifest_sha256 != sha256_hex(raw):
        return RunSummary(run_id, name, "modified", False, created, outputs, key,
                          f"manifest does not match ledger entry {entry.seq}")
    return RunSummary(run_id, name, str(manifest.get("status")), True, created, outputs, key,
                      f"ledger entry {entry.seq}")
