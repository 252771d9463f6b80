"""Runs in flight on a cluster: who started them, how old they are, and cancelling them.

Each `%%depin` run registers itself in the scheduler's metadata (``depin/runs/<run id>``) when it is
submitted, so any client of the same scheduler — another kernel, the `depin` CLI — can list and
cancel it, also after the kernel that started it is gone.
"""

from __future__ import annotations

import functools
import getpass
import re
import socket
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["Job", "owner", "register", "list_jobs", "cancel_jobs"]

_PREFIX = ("depin", "runs")
_BATCH = re.compile(r"(.+)\[\d+\]")


@functools.lru_cache(maxsize=1)
def owner() -> str:
    """Who this process runs as: user@host (what `--mine` matches)."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


@dataclass(frozen=True)
class Job:
    """A run the scheduler still holds."""

    run_id: str
    name: str
    owner: str
    key: str
    started: float
    state: str            # the scheduler's task state: queued, processing, ...
    worker: str | None

    @property
    def age(self) -> float:
        return time.time() - self.started

    @property
    def map_name(self) -> str | None:
        """The map this run is a batch of (`depin_jupyter.map` names its batches ``NAME[i]``), if any."""
        found = _BATCH.fullmatch(self.name)
        return found.group(1) if found else None

    def matches(self, target: str | None) -> bool:
        """Whether ``target`` names this run: its run id, its name, or the map it is a batch of."""
        return bool(target) and (target in (self.run_id, self.name) or self.map_name == target)


def register(client: Any, run_id: str, key: str, name: str) -> None:
    """Record a submitted run on the scheduler without waiting for the answer (no latency added)."""
    info = {"key": key, "name": name, "owner": owner(), "started": time.time()}

    async def send() -> None:
        try:
            await client.scheduler.set_metadata(keys=[*_PREFIX, run_id], value=info)
        except Exception:  # noqa: BLE001, S110 - listing is best effort; the run itself is unaffected
            pass

    client.loop.add_callback(send)


def _task_states(keys: list[str], dask_scheduler: Any = None) -> dict[str, tuple[str, str | None]]:
    out = {}
    for k in keys:
        ts = dask_scheduler.tasks.get(k)
        if ts is not None and ts.state not in ("memory", "erred", "released", "forgotten"):
            out[k] = (ts.state, ts.processing_on.address if ts.processing_on else None)
    return out


def list_jobs(client: Any, untrusted: bool = False) -> list[Job]:
    """Runs still queued or executing on the client's scheduler, oldest first.

    ``untrusted``: a volunteer network, where the coordinator itself lists the runs a client may see (its
    own; an educator's: its lab's) — clients there read no scheduler metadata and run nothing on it."""
    if untrusted:
        from depin_jupyter.protocol.rpc import Coordinator

        listed = Coordinator.of_client(client).jobs()
        return sorted((Job(str(j["run_id"]), str(j["name"]), str(j["owner"]), str(j["key"]), float(j["submitted"]),
                           str(j["state"]), j.get("worker")) for j in listed), key=lambda j: j.started)
    runs = client.get_metadata(list(_PREFIX), default={}) or {}
    states = client.run_on_scheduler(_task_states, [r["key"] for r in runs.values()]) if runs else {}
    jobs = [Job(run_id, r["name"], r["owner"], r["key"], r["started"], *states[r["key"]])
            for run_id, r in runs.items() if r["key"] in states]
    return sorted(jobs, key=lambda j: j.started)


def cancel_jobs(client: Any, jobs: list[Job], untrusted: bool = False) -> list[Job]:
    """Cancel ``jobs`` for every client that wants them; the worker plugin stops their cells."""
    if untrusted:
        from depin_jupyter.protocol.rpc import Coordinator

        coordinator = Coordinator.of_client(client)
        return [j for j in jobs if coordinator.cancel_cell(j.key)]
    from distributed import Future

    if jobs:
        futures: list[Any] = [Future(j.key, client) for j in jobs]
        client.cancel(futures, force=True, reason="cancelled with depin cancel")
    return jobs


def format_jobs(jobs: list[Job]) -> str:
    """A table of the runs, then a line per map: how many of its batches run, wait, or ended."""
    if not jobs:
        return "no runs in flight"
    rows = [("run", "name", "owner", "age", "state", "worker")]
    rows += [(j.run_id, j.name, j.owner, f"{j.age:.0f}s", j.state, j.worker or "-") for j in jobs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)) for r in rows]
    maps: dict[tuple[str, str], list[Job]] = {}
    for j in jobs:
        if j.map_name is not None:
            maps.setdefault((j.owner, j.map_name), []).append(j)
    for (who, name), batches in maps.items():
        running = sum(j.state in ("running", "processing") for j in batches)
        ended = sum(j.state in ("finished", "error", "cancelled", "lost", "memory") for j in batches)
        lines.append(f"map {name} ({who}): {len(batches)} batch(es) here: {running} running, "
                     f"{len(batches) - running - ended} waiting, {ended} ended and kept for attach_map "
                     f"(`depin cancel {name}` stops it)")
    return "\n".join(lines)
