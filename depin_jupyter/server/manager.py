"""What the JupyterLab routes answer: cluster state and run history, as plain JSON-able dicts.

The Jupyter server holds no Dask client of its own. Each kernel with a live `%%depin` connection
publishes its scheduler address (`cluster.published_sessions`); the manager asks those schedulers
for their workers with read-only scheduler calls (`identity`, `processing`) over a connection that
lives only for the request. Run history comes from the Zarr result store (`depin_jupyter.store`).
Nothing here executes code sent by the browser. Tested without HTTP in tests/server/test_manager.py.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "NOT_CONNECTED",
    "BadRequest",
    "Conflict",
    "DepinManager",
    "ManagerError",
    "NotBuilt",
    "NotFound",
    "Unavailable",
]

# A status poll must answer quickly even when a scheduler is gone: this bounds each scheduler query
# (the kernel's own `depin.connect-timeout` is for connecting, and may be much longer).
STATUS_TIMEOUT_S = 2.0
# Runs are listed newest first; older ones are left off past this many unless the request asks.
DEFAULT_RUN_LIMIT = 100
# The runner submits each cell as a task whose key starts with this (runner._submit_and_wait).
RUN_KEY_PREFIX = "depin-run-"
_RUN_ID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,127}$")

NOT_CONNECTED = ("not connected: run a %%depin cell, or `%depin connect` in a notebook "
                 "(after `%load_ext depin_jupyter`)")


class ManagerError(Exception):
    """A request the manager cannot answer; ``status`` is the HTTP status the route sends."""

    status = 500


class BadRequest(ManagerError):
    status = 400


class NotFound(ManagerError):
    status = 404


class Conflict(ManagerError):
    """The run exists but cannot be served (incomplete, or modified after it was sealed)."""

    status = 409


class NotBuilt(ManagerError):
    status = 501


class Unavailable(ManagerError):
    status = 503


def _published_sessions() -> list[dict[str, Any]]:
    from ..cluster import published_sessions

    return published_sessions()


class DepinManager:
    """Cluster state and run history for the panel; one per Jupyter server.

    ``root_dir``: the server's contents root, against which relative store paths are resolved (the
    panel sends the store beside the active notebook). ``kernel_pids``: returns {pid: kernel id} of the
    server's kernels, so each connection names the notebook kernel it belongs to. ``sessions``: where
    published connections come from (default: `cluster.published_sessions`).
    """

    def __init__(self, root_dir: str, *, kernel_pids: Callable[[], Mapping[int, str]] | None = None,
                 sessions: Callable[[], list[dict[str, Any]]] | None = None,
                 status_timeout: float = STATUS_TIMEOUT_S) -> None:
        self.root_dir = os.path.abspath(root_dir)
        self._kernel_pids = kernel_pids or dict
        self._sessions = sessions or _published_sessions
        self.status_timeout = status_timeout

    # ----- cluster state ---------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """Every published connection with its workers; totals for the status bar."""
        sessions = await asyncio.to_thread(self._sessions)
        try:
            pids = dict(self._kernel_pids())
        except Exception:  # noqa: BLE001 - the kernel mapping is a nicety, never a failure
            pids = {}
        connections = list(await asyncio.gather(*(self._connection(s, pids) for s in sessions)))
        live = [c for c in connections if c["ok"]]
        return {
            "connected": bool(live),
            "message": None if live else (connections[0]["error"] if connections else NOT_CONNECTED),
            "connections": connections,
            "workers": sum(len(c["workers"]) for c in live),
            "gpus": sum(c["gpus"] for c in live),
            "runs_in_flight": sum(c["runs_in_flight"] for c in live),
        }

    async def _connection(self, info: Mapping[str, Any], pids: Mapping[int, str]) -> dict[str, Any]:
        address = str(info.get("scheduler", ""))
        try:
            pid: int | None = int(info["pid"])
        except (KeyError, TypeError, ValueError):
            pid = None
        out: dict[str, Any] = {
            "pid": pid,
            "kernel_id": pids.get(pid) if pid is not None else None,
            "scheduler": address,
            "description": info.get("description"),
            "embedded": bool(info.get("embedded")),
            "target": "embedded local cluster" if info.get("embedded") else address,
            "started": info.get("started"),
            "ok": False,
            "error": None,
            "workers": [],
            "gpus": 0,
            "runs_in_flight": 0,
        }
        if address.startswith("inproc://"):
            out["error"] = (f"the kernel's cluster runs inside the kernel process ({address}), where the "
                            "Jupyter server cannot reach it; set depin.local-cluster.processes: true "
                            "(the default) so the panel can show it")
            return out
        try:
            identity, processing = await asyncio.wait_for(self._query(address), self.status_timeout)
        except Exception as exc:  # noqa: BLE001 - each connection reports its own failure
            reason = "no answer" if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) else \
                f"{type(exc).__name__}: {exc}"
            out["error"] = (f"the scheduler at {address} (kernel pid {info.get('pid')}) did not answer "
                            f"within {self.status_timeout:g}s ({reason}); run `%depin status` in the "
                            f"notebook, or `%depin connect` again")
            return out
        workers = [worker_record(addr, w, processing.get(addr, ()))
                   for addr, w in sorted((identity.get("workers") or {}).items())]
        out.update(ok=True, workers=workers, gpus=sum(w["gpus"] for w in workers),
                   runs_in_flight=sum(w["depin_runs"] for w in workers))
        return out

    async def _query(self, address: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Read-only scheduler calls over a connection that lives only for this request."""
        from distributed.core import rpc
        from distributed.security import Security

        args = Security().get_connection_args("client")  # TLS settings from dask.config, as the kernel
        async with rpc(address, timeout=self.status_timeout, connection_args=args) as scheduler:
            identity = await scheduler.identity(n_workers=-1)
            processing = await scheduler.processing()
        return identity, processing

    # ----- run history -----------------------------------------------------------------------

    def store_url(self, store: str | None) -> str:
        """The store to read: given, else depin.store.url, else ./depin-results.zarr (server root)."""
        if not store:
            from .. import config

            store = config.get("store.url") or "depin-results.zarr"
        store = str(store)
        if "://" in store or os.path.isabs(store):
            return store
        return os.path.normpath(os.path.join(self.root_dir, store))

    def _open(self, store: str | None) -> Any:
        url = self.store_url(store)
        try:
            from ..store import StoreAccessError, open_store
        except Exception as exc:  # noqa: BLE001 - the panel says why instead of failing
            raise Unavailable(f"the result store is not available: {type(exc).__name__}: {exc}") from None
        if "://" not in url and not os.path.isdir(url):
            raise NotFound(f"no depin store at {url} yet: runs appear here once a %%depin cell stores "
                           "its results there (or give another store path)")
        try:
            return open_store(url, create=False, writable=False)
        except StoreAccessError as exc:
            raise Unavailable(str(exc)) from None

    async def runs(self, store: str | None = None, *, limit: int = DEFAULT_RUN_LIMIT,
                   verify: bool = False) -> dict[str, Any]:
        """The runs of a store, newest first, with worker, duration and badges."""
        if limit < 1:
            raise BadRequest(f"limit must be a positive number of runs, got {limit}")
        return await asyncio.to_thread(self._runs, store, limit, verify)

    def _runs(self, store: str | None, limit: int, verify: bool) -> dict[str, Any]:
        rs = self._open(store)
        summaries = list(reversed(rs.runs()))
        problems: dict[str, list[str]] | None = None
        report: dict[str, Any] | None = None
        if verify:
            rep = rs.verify()
            problems = {}
            for p in rep.problems:
                problems.setdefault(p.run_id or "", []).append(str(p))
            report = {"ok": rep.ok, "problems": [str(p) for p in rep.problems],
                      "runs_checked": rep.runs_checked, "chunks_checked": rep.chunks_checked}
        rows = []
        for s in summaries[:limit]:
            manifest = None
            if s.complete:
                try:
                    manifest = rs.manifest(s.run_id)
                except Exception:  # noqa: BLE001 - listed from its summary; the detail route says why
                    manifest = None
            rows.append(run_record(s, manifest, problems))
        return {"store": rs.url, "runs": rows, "total": len(summaries), "verify": report}

    async def run(self, store: str | None, run_id: str, *, full: bool = False) -> dict[str, Any]:
        """The manifest of one complete run (chunk digests counted unless ``full``)."""
        return await asyncio.to_thread(self._run, store, run_id, full)

    def _run(self, store: str | None, run_id: str, full: bool) -> dict[str, Any]:
        self._check_run_id(run_id, store)
        rs = self._open(store)
        from ..store import RunIncompleteError, RunNotFoundError, StoreIntegrityError

        try:
            manifest = rs.manifest(run_id)
        except RunNotFoundError as exc:
            raise NotFound(str(exc)) from None
        except (RunIncompleteError, StoreIntegrityError) as exc:
            raise Conflict(str(exc)) from None
        doc = manifest.to_json()
        return {"store": rs.url, "run_id": run_id, "manifest": doc if full else elide_digests(doc)}

    def _check_run_id(self, run_id: str, store: str | None) -> None:
        if not _RUN_ID.match(run_id or "") or ".." in run_id:
            raise NotFound(f"no run {run_id!r} in {self.store_url(store)}: not a run id")

    async def reproduce(self, store: str | None, run_id: str) -> dict[str, Any]:
        """Re-run one stored run and compare: not built yet (issue #6), so it says so plainly."""
        if not isinstance(run_id, str):
            raise BadRequest("give the run to reproduce as JSON {\"run_id\": ..., \"store\": ...}")
        await self.run(store, run_id)  # 404 / 409 for an unknown or unservable run, as elsewhere
        raise NotBuilt(
            f"reproducing run {run_id} is not built yet (issue #6, `depin reproduce`): the store keeps "
            "the content hashes of a run's inputs, not their values, so a run cannot be re-executed from "
            "the store alone. Re-run the notebook and compare, or check the stored bytes with "
            "`depin verify` (the panel's Verify button)."
        )


def worker_record(address: str, w: Mapping[str, Any], processing: Any = ()) -> dict[str, Any]:
    """One worker row: scheduler identity + NVML metrics (when the worker has a GPU) → panel fields."""
    metrics = w.get("metrics") or {}
    gpu = w.get("gpu") or {}               # distributed's NVML startup info: name, memory-total
    gpu_now = metrics.get("gpu") or {}     # NVML real-time metrics: utilization, memory-used
    task_counts = metrics.get("task_counts")
    counts: dict[str, Any] = task_counts if isinstance(task_counts, dict) else {}
    gpus = int((w.get("resources") or {}).get("GPU", 0) or 0) or (1 if gpu.get("name") else 0)
    keys = [str(k) for k in processing or ()]
    return {
        "address": address,
        "name": str(w.get("name", address)),
        "host": w.get("host"),
        "status": w.get("status"),
        "nthreads": int(w.get("nthreads") or 0),
        "memory_limit": int(w.get("memory_limit") or 0) or None,
        "memory_used": metrics.get("memory"),
        "cpu_percent": metrics.get("cpu"),
        "gpus": gpus,
        "gpu_model": gpu.get("name"),
        "gpu_memory_total": gpu.get("memory-total"),
        "gpu_memory_used": gpu_now.get("memory-used"),
        "gpu_utilization": gpu_now.get("utilization"),
        "executing": int(counts.get("executing", 0) or 0),
        "depin_runs": sum(k.startswith(RUN_KEY_PREFIX) for k in keys),
        # The volunteer network (issues #4, #5) will say whose machine this is and how trusted it is.
        "volunteer": None,
        "trust": None,
        "credit": None,
    }


def _worker_label(worker: Mapping[str, Any] | None) -> str | None:
    if not worker:
        return None
    for key in ("name", "address", "host"):
        if worker.get(key):
            return str(worker[key])
    return None


def _duration(timings: Mapping[str, Any]) -> float | None:
    """Wall time as the notebook saw it: total, else shipping + remote, else the cell's own run time."""
    t = {k: float(v) for k, v in timings.items() if isinstance(v, (int, float))}
    for key in ("total_s", "total"):
        if key in t:
            return t[key]
    if "remote_s" in t:
        return t["remote_s"] + t.get("ship_s", 0.0)
    return t.get("run_s")


def run_record(summary: Any, manifest: Any | None, problems: Mapping[str, list[str]] | None) -> dict[str, Any]:
    """One history row: the store's RunSummary, enriched from the manifest of a complete run.

    ``verified`` is None unless the request asked to verify (then: True when every chunk, the manifest
    and the ledger entry of the run re-hash to their digests). ``sealed``: the manifest matches its
    ledger entry, so the run is served.
    """
    worker = dict(manifest.worker) if manifest is not None else {}
    extra = dict(manifest.extra) if manifest is not None else {}
    gpus = worker.get("gpus") or []
    return {
        "run_id": summary.run_id,
        "name": summary.name,
        "status": summary.status,
        "complete": summary.complete,
        "sealed": summary.complete,
        "created": summary.created,
        "outputs": list(summary.outputs),
        "cache_key": summary.cache_key,
        "detail": summary.detail,
        "worker": _worker_label(worker),
        "worker_address": worker.get("address"),
        "gpu": (gpus[0].get("name") if gpus and isinstance(gpus[0], dict) else None),
        "duration_s": _duration(dict(manifest.timings)) if manifest is not None else None,
        "cached": bool(extra.get("cached") or extra.get("cached_from")),
        "verified": None if problems is None or not summary.complete else not problems.get(summary.run_id),
        "problems": (problems or {}).get(summary.run_id, []),
    }


def elide_digests(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest with each per-chunk digest map replaced by its count (`full=1` keeps them)."""
    def shorten(rec: Mapping[str, Any]) -> dict[str, Any]:
        rec = dict(rec)
        if isinstance(rec.get("chunk_digests"), Mapping):
            rec["chunk_digests"] = len(rec["chunk_digests"])
        if isinstance(rec.get("variables"), Mapping):
            rec["variables"] = {k: shorten(v) for k, v in rec["variables"].items()}
        return rec

    return {**doc, "outputs": {k: shorten(v) for k, v in (doc.get("outputs") or {}).items()}}
