"""The rest of `depin verify`: every file of the store accounted for, every metadata document well formed, the
derived indexes equal to what the ledger implies, no symbolic links, and the ledger's newest entry present.

The digest checks (`verify.py`) cover what the ledger pins: sealed runs' manifests, array metadata and chunks,
and the entries themselves. Everything else depin writes is either fixed (the store's groups), derived from
the ledger byte for byte (``depin/index``, ``depin/cache``), pinned by the first entry (the root document), or
belongs to a run that is not sealed (never served, so its bytes carry no digest: only its structure is checked).
A file that fits none of these is reported, as is any symbolic link (a local store would follow it out of
the store). What cannot be seen here without an outside anchor is a ledger cut off together with every trace
its cut entries left; a signed bundle (`depin publish`) pins the head.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from zarr.abc.store import Store

from depin_jupyter.store import _io, ledger
from depin_jupyter.store._digest import group_document, sha256_hex
from depin_jupyter.store._layout import (
    GROUPS,
    RUN_ID,
    STORE_ATTR,
    cache_marker_document,
    cache_prefix,
    group_attrs,
    index_document,
)
from depin_jupyter.store.findings import Problem
from depin_jupyter.store.manifest import MANIFEST_ATTR, OutputRecord, RunManifest

__all__ = ["Audit", "audit_store", "sealed_keys"]

_RESTORE = "restore the store from a good copy (its published bundle or a backup)"
_FIXED = {f"{g}/zarr.json" for g in GROUPS}
_EMPTY_GROUP = group_document({})


@dataclass
class Audit:
    """Problems (verification fails) and notes (harmless leftovers of killed writers, legacy layouts)."""

    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    keys: int = 0


@dataclass(frozen=True)
class _Context:
    sealed: Mapping[str, ledger.LedgerEntry]
    manifests: Mapping[str, RunManifest]
    runs: frozenset[str]
    allowed: Mapping[str, str]


def sealed_keys(manifests: Mapping[str, RunManifest]) -> dict[str, str]:
    """Every key the sealed, readable runs account for (manifest, array metadata, chunks) -> its run id."""
    keys: dict[str, str] = {}
    for run_id, m in manifests.items():
        keys[f"runs/{run_id}/zarr.json"] = run_id
        for rec in m.outputs.values():
            if rec.kind == "xarray" and rec.path:
                keys[f"{rec.path}/zarr.json"] = run_id
            for path, arr in rec.arrays().items():
                keys[f"{path}/zarr.json"] = run_id
                keys.update({f"{path}/{c}": run_id for c in arr.chunk_digests or {}})
    return keys


def all_keys(store: Store) -> list[str]:
    """Every key of the store, sorted (temporary files of killed writers excluded)."""
    from zarr.core.sync import sync

    _io.list_dir(store, "")  # refreshes fsspec's listing cache of the whole store

    async def listing() -> list[str]:
        return [k async for k in store.list()]

    return sorted(k for k in sync(listing()) if not _io.PARTIAL.search(k))


def audit_store(store: Store, url: str, entries: Sequence[ledger.LedgerEntry],
                manifests: Mapping[str, RunManifest], run_ids: Sequence[str]) -> Audit:
    """Account for every file of ``store``; ``manifests`` are the sealed runs whose manifests verified."""
    ctx = _Context({e.run_id: e for e in entries}, manifests, frozenset(run_ids), sealed_keys(manifests))
    out = Audit()
    keys = all_keys(store)
    out.keys = len(keys)
    docs = _io.get_many(store, [k for k in keys if k.endswith("zarr.json") and k not in ctx.allowed
                                and not (k.startswith("ledger/") and k.count("/") == 2)])  # entries: read_chain
    for key in keys:
        problem = _classify(key, docs.get(key), ctx, out.notes)
        if problem is not None:
            out.problems.append(problem)
    if "zarr.json" in docs:
        out.problems += _check_root(docs["zarr.json"] or b"", entries, out.notes)
    out.problems += _check_runs(keys, docs, ctx, out.notes)
    _note_ledger_tail(store, keys, out.notes)
    if _io.is_local(url) and os.path.isdir(url):
        out.problems += _check_files(url, out.notes)
    return out


def _classify(key: str, raw: bytes | None, ctx: _Context, notes: list[str]) -> Problem | None:
    """The problem with one key, if any (the root and the ledger are checked elsewhere)."""
    if key == "zarr.json" or key in ctx.allowed:
        return None
    if key in _FIXED:
        return None if raw == _EMPTY_GROUP else Problem(
            f"the fixed group document differs from the one depin writes ({_EMPTY_GROUP.decode()!r}): "
            f"edited or damaged; {_RESTORE}", key=key)
    parts = key.split("/")
    if parts[0] == "runs":
        return _classify_run_key(key, parts, raw, ctx)
    if parts[0] == "ledger":
        if len(parts) == 3 and len(parts[1]) == 12 and parts[1].isdigit() and parts[2] == "zarr.json":
            return None
    elif parts[0] == "depin":
        if len(parts) == 2 and parts[1].startswith("probe-"):
            notes.append(f"leftover {key}: a writability probe of a process killed meanwhile; delete it")
            return None
        if len(parts) >= 4 and parts[1] in ("index", "cache", "pending") and parts[-1] == "zarr.json":
            return _classify_derived(key, parts, raw, ctx, notes)
    return Problem(f"a file depin did not write (not part of a run, the ledger or their indexes): delete it, "
                   f"or {_RESTORE}", key=key)


def _classify_run_key(key: str, parts: list[str], raw: bytes | None, ctx: _Context) -> Problem | None:
    run_id = parts[1] if len(parts) > 2 else None
    if run_id is None or not RUN_ID.match(run_id):
        return Problem("not inside a run group (run ids look like 20261125T170119.108548Z-9d386dd2): delete it, "
                       f"or {_RESTORE}", key=key)
    if run_id in ctx.sealed:
        manifest = ctx.manifests.get(run_id)
        if manifest is None:
            return None  # its manifest does not verify: reported by the digest checks
        nodes = {r.path.rsplit("/", 1)[-1] for r in manifest.outputs.values() if r.path}
        if parts[2] in nodes:  # nodes outside the manifest are reported by the digest checks
            return Problem("a file inside a sealed output that its manifest does not list (added after sealing): "
                           f"delete it, or {_RESTORE}", run_id=run_id, key=key)
        return None
    if parts[-1] == "zarr.json":
        why = _metadata_problem(raw)
        if why:
            return Problem(f"{why}; the run is not sealed (never served): delete runs/{run_id}, or {_RESTORE}",
                           run_id=run_id, key=key)
    return None


def _metadata_problem(raw: bytes | None) -> str | None:
    """Why ``raw`` is not a Zarr 3 node document, or None."""
    try:
        doc = json.loads(raw or b"")
    except ValueError as exc:
        return f"not valid JSON ({exc})"
    if not isinstance(doc, dict) or doc.get("zarr_format") != 3 or doc.get("node_type") not in ("group", "array"):
        return "not a Zarr 3 group or array document"
    return None


def _classify_derived(key: str, parts: list[str], raw: bytes | None, ctx: _Context,
                      notes: list[str]) -> Problem | None:
    """``depin/index``, ``depin/cache``, ``depin/pending``: each must follow from the ledger and the runs."""
    kind, run_id = parts[1], parts[2]
    if kind == "cache":
        if len(parts) == 4:
            return None if raw == _EMPTY_GROUP else Problem(
                f"the cache key's group document is not the one depin writes: delete depin/cache/{run_id}, "
                f"or {_RESTORE}", key=key)
        return _check_marker(key, parts[2], parts[3], raw, ctx) if len(parts) == 5 else _stray(key)
    if len(parts) == 4 and kind == "index":
        return _check_index(key, run_id, raw, ctx)
    if kind == "pending" and len(parts) in (4, 5):
        return _check_pending(key, parts, run_id, raw, ctx, notes)
    return _stray(key)


def _stray(key: str) -> Problem:
    return Problem(f"a file depin did not write: delete it, or {_RESTORE}", key=key)


def _claimed_seq(raw: bytes | None, attr: str) -> int | None:
    try:
        return int(group_attrs(raw or b"")[attr]["seq"])
    except (ValueError, KeyError, TypeError):
        return None


def _check_index(key: str, run_id: str, raw: bytes | None, ctx: _Context) -> Problem | None:
    entry = ctx.sealed.get(run_id)
    if entry is None:
        seq = _claimed_seq(raw, "depin_index")
        return Problem(f"says run {run_id} was sealed{f' by ledger entry {seq}' if seq else ''}, but no ledger entry "
                       f"seals it: the ledger's newest entries were removed (or this index was forged); {_RESTORE}",
                       run_id=run_id, key=key)
    if raw != index_document(entry):
        return Problem(f"differs from what ledger entry {entry.seq} implies (edited): delete it (depin falls back to "
                       f"the ledger), or {_RESTORE}", run_id=run_id, key=key)
    return None


def _check_marker(key: str, key_hash: str, run_id: str, raw: bytes | None, ctx: _Context) -> Problem | None:
    entry, manifest = ctx.sealed.get(run_id), ctx.manifests.get(run_id)
    if entry is None:
        seq = _claimed_seq(raw, "depin_cache")
        return Problem(f"a cache marker for run {run_id}{f' (ledger entry {seq})' if seq else ''}, which no ledger "
                       f"entry seals: the ledger's newest entries were removed (or the marker forged); {_RESTORE}",
                       run_id=run_id, key=key)
    if manifest is None:
        return None  # reported with its manifest
    if (manifest.cache_key is None or manifest.status != "ok"
            or cache_prefix(manifest.cache_key) != f"depin/cache/{key_hash}"):
        return Problem("a cache marker filed under a cache key its run does not have (moved or forged): delete it "
                       "(a missing marker only costs a recomputation)", run_id=run_id, key=key)
    if raw != cache_marker_document(entry):
        return Problem(f"differs from what ledger entry {entry.seq} implies (edited): delete it (a missing marker "
                       "only costs a recomputation)", run_id=run_id, key=key)
    return None


def _check_pending(key: str, parts: list[str], run_id: str, raw: bytes | None, ctx: _Context,
                   notes: list[str]) -> Problem | None:
    """Pending output records: only a run that is not sealed yet has them."""
    if run_id in ctx.sealed:
        notes.append(f"leftover {key}: its run was sealed, then its writer was killed before cleaning up; "
                     "harmless (delete it)")
        return None
    if run_id not in ctx.runs:
        return Problem(f"pending records for run {run_id}, which the store does not hold: delete "
                       f"depin/pending/{run_id}", run_id=run_id, key=key)
    if len(parts) == 4:
        ok = raw == _EMPTY_GROUP
    else:
        try:
            OutputRecord.from_json(group_attrs(raw or b"")["depin_output"]["record"])
            ok = True
        except (ValueError, KeyError, TypeError):
            ok = False
    return None if ok else Problem(
        "a pending record that is not what depin writes (damaged or edited); the run is not sealed (never "
        f"served): delete runs/{run_id} and depin/pending/{run_id}, or {_RESTORE}", run_id=run_id, key=key)


def _check_root(raw: bytes, entries: Sequence[ledger.LedgerEntry], notes: list[str]) -> list[Problem]:
    """The root document: the form depin writes, and the digest ledger entry 1 links to."""
    try:
        attrs = group_attrs(raw)
        info = attrs[STORE_ATTR]
        form_ok = (set(attrs) == {STORE_ATTR} and set(info) == {"format", "created"}
                   and isinstance(info["format"], int) and isinstance(info["created"], str)
                   and raw == group_document(attrs))
    except (ValueError, KeyError, TypeError):
        form_ok = False
    if not form_ok:
        return [Problem(f"the store's root document is not in the form depin writes (edited or damaged); {_RESTORE}",
                        key="zarr.json")]
    first = entries[0] if entries and entries[0].seq == 1 else None
    if first is None:
        return []
    if first.prev_entry_sha256 == ledger.GENESIS:
        notes.append("the root document (zarr.json) predates root pinning: ledger entry 1 does not hold its digest")
    elif first.prev_entry_sha256 != sha256_hex(raw):
        return [Problem("differs from the digest ledger entry 1 holds: the root document was changed after the "
                        f"first run was sealed; {_RESTORE}", key="zarr.json")]
    return []


def _check_runs(keys: Sequence[str], docs: Mapping[str, bytes | None], ctx: _Context,
                notes: list[str]) -> list[Problem]:
    """A finished writer's run with no ledger entry lost it; a sealed run without its index is only slower."""
    problems = []
    keyset = set(keys)
    for run_id in sorted(ctx.runs):
        if run_id in ctx.sealed:
            if f"depin/index/{run_id}/zarr.json" not in keyset:
                notes.append(f"run {run_id} has no depin/index entry (its writer was killed just after sealing); "
                             "harmless: loads fall back to the ledger")
            continue
        raw = docs.get(f"runs/{run_id}/zarr.json")
        try:
            finished = MANIFEST_ATTR in group_attrs(raw or b"")
        except ValueError:
            continue
        if finished and f"depin/pending/{run_id}/zarr.json" not in keyset:
            problems.append(Problem(
                "its writer finished sealing it (manifest written, pending records removed) but no ledger entry "
                f"seals it: its ledger entry was deleted; {_RESTORE}", run_id=run_id))
    return problems


def _note_ledger_tail(store: Store, keys: Sequence[str], notes: list[str]) -> None:
    """Ledger directories past the newest entry: an interrupted append, or a newest entry deleted with every
    trace of it (a run's index or cache marker naming it is a problem, found above)."""
    present = {int(k.split("/")[1]) for k in keys if k.startswith("ledger/") and k.count("/") == 2
               and k.split("/")[1].isdigit()}
    newest = max(present, default=0)
    for seq in ledger.sequence_numbers(store):
        if seq > newest:
            notes.append(f"ledger/{seq:012d}/ is empty: an append was interrupted, or the newest entry was deleted "
                         "with every trace of it (a signed bundle's head tells which)")


def _check_files(root: str, notes: list[str]) -> list[Problem]:
    """Symbolic links and special files in a local store (zarr would follow a link out of the store)."""
    problems = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            run_id = rel.split("/")[1] if rel.startswith("runs/") and rel.count("/") >= 1 else None
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                problems.append(Problem(f"a symbolic link (to {os.readlink(path)}): a store holds its own files; "
                                        f"replace it by a copy of what it should hold, or {_RESTORE}",
                                        run_id=run_id, key=rel))
            elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                problems.append(Problem(f"not a regular file or directory: delete it, or {_RESTORE}",
                                        run_id=run_id, key=rel))
            elif _io.PARTIAL.search(name):
                notes.append(f"leftover {rel}: a temporary file of a writer killed mid-write; harmless (delete it)")
    return problems
