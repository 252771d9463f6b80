"""`depin verify`: re-hash every chunk, manifest and ledger entry and name each place that differs.

The files the digests do not cover (groups, indexes, unsealed runs, links) are accounted for in `audit.py`.

Incomplete runs (no manifest, aborted, or unsealed by a writer killed mid-finish) are listed, not
counted as errors: they were never served. A sealed run whose bytes changed is an error. Each digest
is checked with the algorithm it names (``blake3:``/``sha256:``; bare hex is SHA-256, as old stores wrote).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from depin_jupyter.store import _io, audit, ledger
from depin_jupyter.store._digest import output_digest_like, sha256_hex
from depin_jupyter.store.findings import Problem
from depin_jupyter.store.manifest import MANIFEST_ATTR, OutputRecord, RunManifest, RunSummary

__all__ = ["Problem", "VerifyReport", "verify_store"]

if TYPE_CHECKING:
    from depin_jupyter.store._store import ResultStore


@dataclass(frozen=True)
class VerifyReport:
    """What `verify` found: problems (any means failure) and the runs that are not complete."""

    url: str
    problems: tuple[Problem, ...]
    incomplete: tuple[RunSummary, ...]
    runs_checked: int
    chunks_checked: int
    ledger_entries: int
    head_digest: str
    notes: tuple[str, ...] = ()
    files_checked: int = 0

    @property
    def ok(self) -> bool:
        """True when every sealed run, chunk and ledger entry matches its digest."""
        return not self.problems

    def format(self) -> str:
        """The human report printed by `depin verify`."""
        lines = [(f"store {self.url}: {self.runs_checked} complete runs, {self.chunks_checked} chunks, "
                  f"{self.ledger_entries} ledger entries, {self.files_checked} files checked; "
                  f"ledger head {self.head_digest}")]
        lines += [f"MISMATCH {p}" for p in self.problems]
        lines += [f"incomplete {s.run_id} ({s.status}): {s.detail}" for s in self.incomplete]
        lines += [f"note {n}" for n in self.notes]
        lines.append("OK" if self.ok else f"FAILED: {len(self.problems)} problem(s)")
        return "\n".join(lines)


def _check_outputs(run_id: str, manifest: RunManifest, hashes: dict[str, str | None],
                   listed: dict[str, set[str]], metas: dict[str, bytes | None]) -> list[Problem]:
    """Compare one sealed run's stored arrays with the digests its manifest holds."""
    problems: list[Problem] = []
    for out_name, rec in manifest.outputs.items():
        group_meta = metas.get(f"{rec.path}/zarr.json") or b""
        if rec.kind == "xarray" and sha256_hex(group_meta) != rec.metadata_sha256:
            problems.append(Problem("group metadata (zarr.json) differs", run_id, out_name, rec.path))
        for path, arr in rec.arrays().items():
            short = path.removeprefix(f"runs/{run_id}/")
            if sha256_hex(metas.get(f"{path}/zarr.json") or b"") != arr.metadata_sha256:
                problems.append(Problem("array metadata (zarr.json) differs or is missing", run_id,
                                        out_name, short))
            expected = dict(arr.chunk_digests or {})
            if output_digest_like(expected, arr.digest or "") != arr.digest:
                problems.append(Problem("chunk digest list does not give the output digest", run_id,
                                        out_name, short))
            for chunk in sorted(listed.get(path, set()) - set(expected)):
                problems.append(Problem("unexpected chunk (not in the manifest)", run_id, out_name, short, chunk))
            for chunk, digest in sorted(expected.items()):
                got = hashes.get(f"{path}/{chunk}")
                if got is None:
                    problems.append(Problem("chunk missing", run_id, out_name, short, chunk))
                elif got != digest:
                    problems.append(Problem("chunk bytes differ from their digest", run_id, out_name,
                                            short, chunk))
    return problems


def verify_store(rs: ResultStore) -> VerifyReport:
    """Check the ledger chain, every sealed manifest and every chunk of every complete run."""
    from depin_jupyter.store._layout import RUN_ATTR, summarize

    store = rs.zarr_store
    entries, chain = ledger.read_chain(store)
    problems = [Problem(msg, ledger_seq=seq) for seq, msg in chain]
    sealed = {e.run_id: e for e in entries}
    ids = [n for n in _io.list_dir(store, "runs") if n != "zarr.json"]
    raws = _io.get_many(store, [f"runs/{r}/zarr.json" for r in ids])
    incomplete: list[RunSummary] = []
    to_check: dict[str, RunManifest] = {}
    for run_id in sorted(ids):
        raw, entry = raws[f"runs/{run_id}/zarr.json"], sealed.get(run_id)
        if entry is None:
            incomplete.append(summarize(run_id, raw, None))
            continue
        if raw is None:
            problems.append(Problem(f"sealed by ledger entry {entry.seq} but its manifest is gone", run_id))
        elif sha256_hex(raw) != entry.manifest_sha256:
            problems.append(Problem(f"manifest (zarr.json) does not match ledger entry {entry.seq}", run_id))
        else:
            try:
                attrs = json.loads(raw)["attributes"]
                if attrs[RUN_ATTR]["run_id"] != run_id or attrs[MANIFEST_ATTR]["run_id"] != run_id:
                    raise ValueError("it names another run id (moved or copied)")
                to_check[run_id] = RunManifest.from_json(attrs[MANIFEST_ATTR])
            except Exception as exc:  # sealed, yet not a manifest depin can read  # noqa: BLE001 - any failure is reported, not raised
                problems.append(Problem(f"manifest unreadable: {type(exc).__name__}: {exc}", run_id))
    for run_id, entry in sealed.items():
        if run_id not in ids:
            problems.append(Problem(f"sealed by ledger entry {entry.seq} but the run group is gone", run_id))
    arrays: dict[str, OutputRecord] = {}
    groups: list[str] = []
    for m in to_check.values():
        for rec in m.outputs.values():
            arrays.update(rec.arrays())
            if rec.kind == "xarray" and rec.path:
                groups.append(rec.path)
    listed: dict[str, set[str]] = {}
    for path in arrays:
        keys = {k[len(path) + 1:] for k in _io.list_prefix(store, path)}
        listed[path] = {k for k in keys if k == "c" or k.startswith("c/")}
    recorded = {f"{p}/{c}": d for p, rec in arrays.items() for c, d in (rec.chunk_digests or {}).items()}
    hashes = _io.check_keys(store, recorded)
    metas = _io.get_many(store, [f"{p}/zarr.json" for p in [*arrays, *groups]])
    for run_id, manifest in to_check.items():
        problems += _check_outputs(run_id, manifest, hashes, listed, metas)
        stored = {n for n in _io.list_dir(store, f"runs/{run_id}") if n != "zarr.json"}
        for extra in sorted(stored - {r.path.rsplit("/", 1)[-1] for r in manifest.outputs.values() if r.path}):
            problems.append(Problem(f"node {extra!r} is not in the manifest (added after sealing)", run_id))
    found = audit.audit_store(store, rs.url, entries, to_check, ids)
    return VerifyReport(
        url=rs.url, problems=tuple(problems + found.problems), incomplete=tuple(incomplete),
        runs_checked=len(to_check), chunks_checked=len(recorded), ledger_entries=len(entries),
        head_digest=ledger.head_digest(store), notes=tuple(found.notes), files_checked=found.keys,
    )
