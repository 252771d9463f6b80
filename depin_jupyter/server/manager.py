"""What the JupyterLab routes answer: cluster state and run history, as plain JSON-able dicts.

The Jupyter server holds no Dask client of its own. Each kernel with a live `%%depin` connection
publishes its scheduler address (`cluster.published_sessions`); the manager asks those schedulers
for their workers with read-only scheduler calls (`identity`, `processing`) over a connection that
lives only for the request. A kernel on a volunteer network also publishes its client token (mode 0600,
same user): the manager then joins with that identity (mutual TLS) and asks the coordinator for the
volunteers' credit. Run history comes from the Zarr result store (`depin_jupyter.store`).

Reproduction (`reproduce_start`) re-executes a notebook *file under the server root* in a separate
process (`python -m depin_jupyter.server.reproduce_job`, which calls `depin_jupyter.reproduce.rerun.reproduce`):
nothing here executes code sent by the browser. Tested without HTTP in tests/server/test_server_manager.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from depin_jupyter.server.records import elide_digests, run_record, trust_record, worker_record

__all__ = [
    "NOT_CONNECTED",
    "BadRequest",
    "Conflict",
    "DepinManager",
    "ManagerError",
    "NotFound",
    "Unavailable",
]

# A status poll must answer quickly even when a scheduler is gone: this bounds each scheduler query
# (the kernel's own `depin.connect-timeout` is for connecting, and may be much longer).
STATUS_TIMEOUT_S = 2.0
# Runs are listed newest first; older ones are left off past this many unless the request asks.
DEFAULT_RUN_LIMIT = 100
# The runner submits each cell as a task whose key starts with this (runner._submit_and_wait).
# Finished reproduce jobs are kept (for the panel to read their report) this long, at most this many.
JOB_KEEP_S = 3600.0
JOB_KEEP_MAX = 50
# A reproduce job is stopped past this (each cell also has nbclient's own timeout inside).
REPRODUCE_TIMEOUT_S = 3 * 3600.0
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


class Unavailable(ManagerError):
    status = 503


def _published_sessions() -> list[dict[str, Any]]:
    from depin_jupyter.kernel.cluster import published_sessions

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
        self._securities: dict[str, Any] = {}
        self._no_identities: set[str] = set()
        self._jobs: dict[str, dict[str, Any]] = {}
        self._jobs_lock = threading.Lock()

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
            "reproducing": self._reproducing(pid),
            "ok": False,
            "error": None,
            "workers": [],
            "gpus": 0,
            "runs_in_flight": 0,
            "volunteer": False,
        }
        if address.startswith("inproc://"):
            out["error"] = (f"the kernel's cluster runs inside the kernel process ({address}), where the "
                            "Jupyter server cannot reach it; set depin.local-cluster.processes: true "
                            "(the default) so the panel can show it")
            return out
        token = info.get("token")
        volunteer = bool(info.get("volunteer")) or bool(token)
        out["volunteer"] = volunteer
        try:
            security = self._security(str(token)) if token else None
        except Exception as exc:  # noqa: BLE001 - a damaged token is this connection's failure only
            out["error"] = (f"the kernel (pid {info.get('pid')}) published a volunteer-network token the "
                            f"server cannot use ({type(exc).__name__}: {exc}); `%depin connect TOKEN` again")
            return out
        try:
            identity, processing, credits = await asyncio.wait_for(
                self._query(address, security, credits=volunteer), self.status_timeout)
        except Exception as exc:  # noqa: BLE001 - each connection reports its own failure
            reason = "no answer" if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) else \
                f"{type(exc).__name__}: {exc}"
            out["error"] = (f"the scheduler at {address} (kernel pid {info.get('pid')}) did not answer "
                            f"within {self.status_timeout:g}s ({reason}); run `%depin status` in the "
                            f"notebook, or `%depin connect` again")
            return out
        workers = [worker_record(addr, w, processing.get(addr, ()), credits=credits, volunteer=volunteer)
                   for addr, w in sorted((identity.get("workers") or {}).items())]
        out.update(ok=True, workers=workers, gpus=sum(w["gpus"] for w in workers),
                   runs_in_flight=sum(w["depin_runs"] for w in workers))
        return out

    def _reproducing(self, pid: int | None) -> str | None:
        """The notebook a reproduce job runs in this kernel process (its parent is the job), if any."""
        with self._jobs_lock:
            jobs = {j.get("pid"): j["notebook"] for j in self._jobs.values() if j["state"] == "running"}
        if pid is None or not any(jobs):
            return None
        try:
            import psutil

            return jobs.get(psutil.Process(pid).ppid())
        except Exception:  # noqa: BLE001 - gone, or no psutil: no label
            return None

    def _security(self, token: str) -> Any:
        """The client identity of a published volunteer-network token (one Security per token)."""
        security = self._securities.get(token)
        if security is None:
            from depin_jupyter.protocol.identity import Token

            security = Token.decode(token).security("client")
            if len(self._securities) > 32:  # tokens of long-gone kernels
                self._securities.clear()
            self._securities[token] = security
        return security

    async def _query(self, address: str, security: Any = None, *, credits: bool = False
                     ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
        """Read-only scheduler calls over a connection that lives only for this request.

        ``security``: the kernel's volunteer-network identity (else TLS settings from dask.config, as the
        kernel has them). ``credits``: also ask a depin coordinator for its credit ledger (None when the
        scheduler has none, e.g. a plain Dask scheduler, or any error: "unknown").
        """
        from distributed.core import rpc
        from distributed.security import Security

        from depin_jupyter.protocol.rpc import AsyncCoordinator

        args = (security or Security()).get_connection_args("client")
        async with rpc(address, timeout=self.status_timeout, connection_args=args) as scheduler:
            identity = await scheduler.identity(n_workers=-1)
            if credits:  # a volunteer network: a client sees only its own runs, as the coordinator lists them
                processing: dict[str, list[str]] = {}
                for job in await AsyncCoordinator(scheduler).jobs():
                    if job.get("worker"):
                        processing.setdefault(str(job["worker"]), []).append(str(job["key"]))
            else:
                processing = await scheduler.processing()
            ledger: dict[str, Any] | None = None
            if credits:
                try:
                    answer = await AsyncCoordinator(scheduler).credits()
                    ledger = answer if isinstance(answer, dict) else None
                except Exception:  # noqa: BLE001 - no coordinator, or it refused: credit unknown
                    ledger = None
                names = None
                if address not in self._no_identities:
                    try:  # {worker address: certificate name}, where the coordinator tells it
                        names = await AsyncCoordinator(scheduler).identities()
                    except Exception:  # noqa: BLE001 - an older coordinator: names from the workers' own
                        names = None
                    if not isinstance(names, dict):
                        self._no_identities.add(address)  # not asked again (no warning in its log each poll)
                reputation = None
                if isinstance(names, dict):
                    try:  # {certificate name: streak, valid, invalid, checked, agreement} (replicated runs)
                        reputation = await AsyncCoordinator(scheduler).reputation()
                    except Exception:  # noqa: BLE001 - an older coordinator: trust unknown
                        reputation = None
                    for addr, name in names.items():
                        w = (identity.get("workers") or {}).get(addr)
                        if isinstance(w, dict) and isinstance(name, str):
                            w["depin_volunteer"] = name
                            if isinstance(reputation, dict):
                                w["depin_trust"] = trust_record(reputation.get(name))
        return identity, processing, ledger

    # ----- run history -----------------------------------------------------------------------

    def store_url(self, store: str | None) -> str:
        """The store to read: given, else depin.store.url, else ./depin-results.zarr (server root)."""
        if not store:
            from depin_jupyter import config

            store = config.get("store.url") or "depin-results.zarr"
        store = str(store)
        if "://" in store or os.path.isabs(store):
            return store
        return os.path.normpath(os.path.join(self.root_dir, store))

    def _open(self, store: str | None) -> Any:
        url = self.store_url(store)
        try:
            from depin_jupyter.store import StoreAccessError, open_store
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
        from depin_jupyter.store import RunIncompleteError, RunNotFoundError, StoreIntegrityError

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

    # ----- reproduction ----------------------------------------------------------------------

    def notebook_path(self, notebook: Any) -> str:
        """The absolute path of ``notebook`` (relative to the server root); 400 outside it, 404 missing."""
        if not isinstance(notebook, str) or not notebook.strip():
            raise BadRequest('give the notebook to reproduce as JSON {"notebook": "path/from/the/root.ipynb"}')
        rel = notebook.strip()
        if "\x00" in rel or os.path.isabs(rel) or rel.startswith("~"):
            raise BadRequest(f"the notebook must be a path relative to the server root, not {rel!r}")
        root = os.path.realpath(self.root_dir)
        path = os.path.realpath(os.path.join(root, rel))
        if os.path.commonpath([root, path]) != root:
            raise BadRequest(f"the notebook {rel!r} is outside the server root")
        if not path.endswith(".ipynb"):
            raise BadRequest(f"{rel!r} is not a notebook (.ipynb)")
        if not os.path.isfile(path):
            raise NotFound(f"no notebook {rel!r} under the server root")
        return path

    def reproduce_store(self, store: Any, notebook_path: str) -> str:
        """The published store: given (a URL, or a path from the server root, as the runs route), else
        depin.store.url, else ./depin-results.zarr, relative to the notebook's directory."""
        if store is not None and not isinstance(store, str):
            raise BadRequest("store must be a path or a URL")
        if store:
            url = self.store_url(store)
        else:
            from depin_jupyter import config

            url = str(config.get("store.url") or "depin-results.zarr")
            if "://" not in url and not os.path.isabs(url):
                url = os.path.normpath(os.path.join(os.path.dirname(notebook_path), url))
        if "://" not in url and not os.path.isdir(url):
            raise NotFound(f"no depin store at {url}: the notebook's published runs are compared against it "
                           "(give the store the notebook wrote to)")
        return url

    async def reproduce_start(self, notebook: Any, store: Any = None) -> dict[str, Any]:
        """Start reproducing a notebook file against its store; the job (the running one, if any)."""
        path = self.notebook_path(notebook)
        url = self.reproduce_store(store, path)
        rel = os.path.relpath(path, os.path.realpath(self.root_dir))
        with self._jobs_lock:
            self._prune_jobs()
            for job in self._jobs.values():
                if job["notebook"] == rel and job["state"] == "running":
                    return self._job_view(job)
            job = {"job": uuid.uuid4().hex[:16], "notebook": rel, "store": url, "state": "running",
                   "started": time.time(), "finished": None, "report": None, "error": None}
            self._jobs[job["job"]] = job
        threading.Thread(target=self._run_job, args=(job, path, url), name=f"depin-reproduce-{job['job']}",
                         daemon=True).start()
        return self._job_view(job)

    def reproduce_job(self, job_id: str) -> dict[str, Any]:
        with self._jobs_lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise NotFound(f"no reproduce job {job_id!r} (finished jobs are kept for an hour)")
            return self._job_view(job)

    async def reproduce_wait(self, job_id: str, timeout: float = REPRODUCE_TIMEOUT_S) -> dict[str, Any]:
        """The job once it is no longer running (for tests and scripts)."""
        deadline = time.monotonic() + timeout
        while (job := self.reproduce_job(job_id))["state"] == "running" and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        return job

    @staticmethod
    def _job_view(job: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: job[k] for k in ("job", "notebook", "store", "state", "started", "finished")}
        if job["state"] == "done":
            out["report"] = job["report"]
        elif job["state"] == "failed":
            out["error"] = job["error"]
        return out

    def _prune_jobs(self) -> None:
        done = sorted((j for j in self._jobs.values() if j["state"] != "running"), key=lambda j: j["finished"])
        now = time.time()
        for i, j in enumerate(done):
            if now - j["finished"] > JOB_KEEP_S or len(done) - i > JOB_KEEP_MAX:
                self._jobs.pop(j["job"], None)

    def _run_job(self, job: dict[str, Any], notebook: str, store: str) -> None:
        """Run `reproduce` in its own process: it sets environment variables for the fresh kernel it
        starts, which must not leak into this server's other kernels, and a crash stays there."""
        fd, out = tempfile.mkstemp(prefix="depin-reproduce-", suffix=".json")
        os.close(fd)
        try:
            with subprocess.Popen(
                    [sys.executable, "-m", "depin_jupyter.server.reproduce_job", notebook, store, out],
                    cwd=os.path.dirname(notebook), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, text=True) as proc:
                job["pid"] = proc.pid  # its kernel's connection is labelled in the status
                try:
                    output, _ = proc.communicate(timeout=REPRODUCE_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
                    raise
            if proc.returncode == 0:
                with open(out) as f:
                    report = json.load(f)
                result: dict[str, Any] = {"state": "done", "report": report}
            else:
                tail = "\n".join((output or "").strip().splitlines()[-15:])
                result = {"state": "failed", "error": tail or f"reproduce exited with status {proc.returncode}"}
        except subprocess.TimeoutExpired:
            result = {"state": "failed", "error": f"reproduce did not finish within {REPRODUCE_TIMEOUT_S:g} s"}
        except Exception as exc:  # noqa: BLE001 - the job reports its own failure
            result = {"state": "failed", "error": f"{type(exc).__name__}: {exc}"}
        finally:
            try:
                os.unlink(out)
            except OSError:
                pass
        with self._jobs_lock:
            job.update(result, finished=time.time())


