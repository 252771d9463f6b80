"""Virtual labs on a coordinator: quotas per student, fair share, and the educator's view.

A student is a client certificate whose registry entry (``tokens.json``) carries a ``quota`` (``depin token
issue --role client --name STUDENT --quota concurrent=1,gpu-seconds=3600``). The coordinator knows which
certificate each client connection belongs to, so every ``update-graph`` (a submitted cell) is attributed to
a name, and:

* **concurrent**: a student with that many cells queued or running has further ones held back on the
  coordinator (``depin.lab.over-quota: wait``, in order, released as earlier ones finish) or failed at once
  with a message naming the quota (``refuse``). Cells are counted, not tasks: a cell's replicas count once.
* **gpu-seconds / cpu-seconds**: compute time of the student's finished (or failed) tasks, per UTC day
  (GPU workers count GPU-seconds, the others CPU-seconds). A student at or over the quota has new cells
  failed with a message naming the quota and when it resets (00:00 UTC). A cell already running finishes.
* **fair share** (``depin.lab.fair-share``, every client identity, quota or not): each submitted task's
  priority is led by how many tasks its submitter already has in flight, so Dask (lowest priority first,
  on the scheduler's queue and on each worker) serves students round-robin: one with 50 queued cells does
  not starve one with 1.

Usage is kept in ``lab-usage.json`` in the state dir (today's and yesterday's days only). The educator's
view (`depin lab status`, and `%depin status` for an educator's token) is the RPC ``depin_lab_status``,
answered only to educators: a token issued with ``--educator``, a name listed in ``depin.lab.educators``,
or the coordinator's own certificate (used by `depin lab status --state-dir` on the coordinator machine).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections import defaultdict, deque
from typing import Any

from depin_jupyter import config
from depin_jupyter.errors import DepinUsageError

__all__ = ["LabGate", "parse_quota", "read_roster"]

logger = logging.getLogger("depin.lab")

QUOTA_KEYS = ("concurrent", "gpu-seconds", "cpu-seconds")


def parse_quota(text: str | dict[str, Any] | None) -> dict[str, float]:
    """``concurrent=1,gpu-seconds=3600`` -> {"concurrent": 1, "gpu-seconds": 3600.0}; durations allowed for
    the seconds (``gpu-seconds=1h``)."""
    if not text:
        return {}
    if isinstance(text, dict):
        items = list(text.items())
    else:
        items = []
        for part in str(text).replace(";", ",").split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise DepinUsageError(f"quota {part.strip()!r}: write NAME=VALUE, e.g. concurrent=1,gpu-seconds=3600")
            k, v = part.split("=", 1)
            items.append((k.strip(), v.strip()))
    out: dict[str, float] = {}
    for k, v in items:
        k = str(k).replace("_", "-")
        if k not in QUOTA_KEYS:
            raise DepinUsageError(f"unknown quota {k!r}; known: {', '.join(QUOTA_KEYS)}")
        try:
            if k == "concurrent":
                n = float(v)  # type: ignore[arg-type]  # a wrong type is the error below
                if not n.is_integer():
                    raise ValueError(v)
            else:
                from dask.utils import parse_timedelta

                n = float(parse_timedelta(v, default="s"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise DepinUsageError(f"quota {k}={v!r} is not a number") from None
        if n < (1 if k == "concurrent" else 0):
            raise DepinUsageError(f"quota {k}={v} must be {'at least 1' if k == 'concurrent' else '>= 0'}")
        out[k] = n
    return out


def read_roster(path: str) -> list[tuple[str, dict[str, float]]]:
    """A class roster CSV: columns ``name`` and optionally ``quota`` (header row optional)."""
    import csv

    rows: list[tuple[str, dict[str, float]]] = []
    with open(path, newline="") as f:
        for i, rec in enumerate(csv.reader(f)):
            rec = [c.strip() for c in rec]
            if not rec or not rec[0] or rec[0].startswith("#"):
                continue
            if i == 0 and rec[0].lower() == "name":
                continue
            name = rec[0]
            if not all(c.isalnum() or c in "-_.@" for c in name):
                raise DepinUsageError(f"{path}: row {i + 1}: name {name!r} may hold letters, digits and -_.@ only")
            rows.append((name, parse_quota(",".join(rec[1:]).strip(",") or None)))
    if not rows:
        raise DepinUsageError(f"{path}: no students (one row per student: name[,quota])")
    names = [n for n, _ in rows]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise DepinUsageError(f"{path}: names listed twice: {', '.join(sorted(dup))}")
    return rows


def today() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")


def reset_text() -> str:
    now = dt.datetime.now(dt.UTC)
    nxt = (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    left = int((nxt - now).total_seconds())
    return f"it resets at 00:00 UTC (in {left // 3600}h{left % 3600 // 60:02d}m)"


def _unit(key: Any) -> str:
    """What counts as one cell: a run's replicas (``depin-run-<id>-<hex>``) count once."""
    k = str(key).split("~", 1)[0]  # a replica the coordinator added (<key>~<volunteer>) is the same cell
    return k.rsplit("-", 1)[0] if k.startswith("depin-run-") else k


class LabGate:
    """The coordinator's per-student accounting, held by the scheduler (``sched.lab``)."""

    def __init__(self, sched: Any) -> None:
        self.sched = sched
        self.client_names: dict[str, str] = {}           # client id -> certificate name
        self.inflight: dict[str, dict[str, set[str]]] = defaultdict(dict)  # name -> unit -> keys in flight
        self.key_owner: dict[str, str] = {}              # task key -> name of the submitting student
        self.held: dict[str, deque[dict[str, Any]]] = defaultdict(deque)  # name -> update-graph calls held
        self.wakeup = asyncio.Event()
        usage = sched.state.read_json("lab-usage.json", {})
        self.usage: dict[str, dict[str, dict[str, float]]] = usage if isinstance(usage, dict) else {}
        self.dirty = False

    # --- identities ---
    def entry(self, name: str) -> dict[str, Any]:
        """The newest live registry entry of ``name`` (quota, educator)."""
        for c in reversed(self.sched.state.registry()["certificates"]):
            if c["name"] == name and not c.get("revoked"):
                return c
        return {}

    def quota(self, name: str) -> dict[str, float]:
        return parse_quota(self.entry(name).get("quota"))

    def is_educator(self, name: str, role: str) -> bool:
        return role == "scheduler" or bool(self.entry(name).get("educator")) or \
            name in (config.get("lab.educators") or ())

    # --- accounting ---
    def used(self, name: str) -> dict[str, float]:
        return self.usage.get(today(), {}).get(name, {})

    def account(self, key: str, kind: str, seconds: float) -> None:
        name = self.key_owner.get(key)
        if name is None:
            return
        day = self.usage.setdefault(today(), {})
        for old in [d for d in self.usage if d < (dt.datetime.now(dt.UTC)
                                                 - dt.timedelta(days=1)).strftime("%Y-%m-%d")]:
            self.usage.pop(old)
        entry = day.setdefault(name, {"gpu_seconds": 0.0, "cpu_seconds": 0.0, "tasks": 0})
        entry[kind] = entry.get(kind, 0.0) + max(0.0, seconds)
        entry["tasks"] = entry.get("tasks", 0) + 1
        self.dirty = True

    def done(self, key: str) -> None:
        """A task left the queued/running states (finished, erred, released or forgotten)."""
        name = self.key_owner.pop(key, None)
        if name is None:
            return
        units = self.inflight.get(name, {})
        keys = units.get(_unit(key))
        if keys is not None:
            keys.discard(key)
            if not keys:
                units.pop(_unit(key), None)
                self.wakeup.set()

    def count(self, name: str) -> int:
        return len(self.inflight.get(name, {}))

    # --- admission ---
    def over_seconds(self, name: str, quota: dict[str, float]) -> str | None:
        used = self.used(name)
        for q, field, what in (("gpu-seconds", "gpu_seconds", "GPU"), ("cpu-seconds", "cpu_seconds", "CPU")):
            if q in quota and used.get(field, 0.0) >= quota[q]:
                return (f"depin lab quota: {name!r} has used {used.get(field, 0.0):.1f} of the {quota[q]:g} "
                        f"{what}-seconds allowed per day (quota {q}={quota[q]:g}); {reset_text()}. Ask your "
                        f"educator to raise it.")
        return None

    def fail(self, client: str, keys: Any, text: str) -> None:
        """Fail the submitted keys with ``text`` (the client receives text, never a pickle)."""
        for key in keys:
            self.sched.report({"op": "task-erred", "key": key, "exception": text, "traceback": None},
                              client=client)

    async def admit(self, client: str, keys: Any, submit: Any, fail: Any = None, name: str | None = None,
                    tracked: bool = False) -> None:
        """Run ``submit()`` (the real update-graph, or the gateway's task) when the student's quota allows;
        else hold or fail (``fail(client, keys, text)``; default: a task-erred text to the client).

        The client's stream awaits this handler, so a held cell waits in a background task: the stream
        (heartbeats, releases, the student's other messages) keeps flowing. ``name``: the submitter, when the
        gateway submits for it (else the client's certificate name). ``tracked``: the keys stay counted
        until their tasks end (`done`), even when ``submit`` returns before the tasks exist (the gateway).
        """
        name = name or self.client_names.get(client)
        quota = self.quota(name) if name else {}
        fail = fail or self.fail
        if name is not None and tracked and not quota:  # counted (fair share needs to know whose it is)
            return await self._submit(name, [str(k) for k in keys], submit, None)
        if not quota or name is None:
            return await submit()
        why = self.over_seconds(name, quota)
        if why is not None:
            logger.info("refused cells of %r: %s", name, why)
            return fail(client, keys, why)
        raw = list(keys)
        keys = [str(k) for k in keys]
        if not self._fits(name, quota, keys) or any(not t.get("cancelled") for t in self.held.get(name, ())):
            if config.get("lab.over-quota") == "refuse":
                return fail(client, keys, (
                    f"depin lab quota: {name!r} already has {self.count(name)} cell(s) queued or running "
                    f"(quota concurrent={int(quota['concurrent'])}); this cell was refused "
                    f"(depin.lab.over-quota: refuse). Run it again when one has finished."))
            ticket = {"client": client, "keys": set(keys), "raw": None if tracked else raw, "fail": fail}
            self.held[name].append(ticket)
            self.sched.in_background(self._hold, name, quota, ticket, submit)
            return None
        return await self._submit(name, keys, submit, None if tracked else raw)

    def _fits(self, name: str, quota: dict[str, float], keys: list[str]) -> bool:
        limit = int(quota.get("concurrent", 0))
        units = {_unit(k) for k in keys} - set(self.inflight.get(name, {}))
        return not limit or not units or self.count(name) + len(units) <= limit

    async def _hold(self, name: str, quota: dict[str, float], ticket: dict[str, Any], submit: Any) -> None:
        keys = sorted(ticket["keys"])
        client = ticket["client"]
        try:
            while True:
                queue = self.held[name]
                while queue and queue[0].get("cancelled"):
                    queue.popleft()
                if ticket.get("cancelled") or (client not in self.sched.clients and not client.startswith("depin-gateway:")):
                    return None  # released, or the student left while the cell waited
                if queue and queue[0] is ticket and self._fits(name, quota, keys):
                    break
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), 0.5)
                except TimeoutError:
                    pass
        finally:
            if ticket in self.held[name]:
                self.held[name].remove(ticket)
            self.wakeup.set()
        why = self.over_seconds(name, quota)
        if why is not None:
            return ticket["fail"](client, keys, why)
        await self._submit(name, keys, submit, ticket["raw"])

    async def _submit(self, name: str, keys: list[str], submit: Any, raw: list[Any] | None = None) -> None:
        for k in keys:  # counted before the graph exists, so a second submission in the same tick waits
            self.key_owner[k] = name
            self.inflight[name].setdefault(_unit(k), set()).add(k)
        ok = False
        try:
            result = await submit()
            ok = True
            return result
        finally:
            if raw is not None or not ok:
                # a graph that failed to build, or keys already computed, leave nothing in flight
                live = {str(k) for k in raw or () if k in self.sched.tasks
                        and self.sched.tasks[k].state not in ("memory", "erred", "forgotten")}
                for k in keys:
                    if k not in live:
                        self.done(k)

    def release_held(self, client: str, keys: Any = None) -> None:
        """The client released keys (or left): drop held submissions of them."""
        for tickets in self.held.values():
            for t in tickets:
                if t["client"] == client and (keys is None or t["keys"] & {str(k) for k in keys}):
                    t["cancelled"] = True
        self.wakeup.set()

    # --- fair share ---
    def prioritize(self, client: str, tasks: list[Any]) -> None:
        """Lead each new task's priority with how many tasks its submitter has in flight (round-robin)."""
        if not config.get("lab.fair-share"):
            return
        def owner(ts: Any) -> str | None:  # the student behind a task: the gateway submits for them
            return self.key_owner.get(str(ts.key)) or next(
                (self.client_names.get(c.client_key) for c in ts.who_wants or ()), None)

        for key in tasks:
            ts = self.sched.tasks.get(key)
            name = (owner(ts) if ts is not None else None) or self.client_names.get(client)
            if name is not None:
                break
        else:
            return
        rank = sum(1 for ts in self.sched.tasks.values()
                   if ts.state in ("queued", "processing", "waiting", "no-worker")
                   and ts.priority is not None and owner(ts) == name)
        for key in tasks:
            ts = self.sched.tasks.get(key)
            if ts is None or ts.priority is None or ts.state != "released" or len(ts.priority) != 3:
                continue
            ts.priority = (ts.priority[0], rank, *ts.priority[1:])
            rank += 1

    # --- the educator's view ---
    def status(self) -> dict[str, Any]:
        connected: dict[str, int] = defaultdict(int)
        for cid, name in self.client_names.items():
            if cid in self.sched.clients:
                connected[name] += 1
        running: dict[str, int] = defaultdict(int)
        queued: dict[str, int] = defaultdict(int)
        for key, name in self.key_owner.items():
            ts = self.sched.tasks.get(key)
            if ts is not None and ts.state == "processing":
                running[name] += 1
            elif ts is not None:
                queued[name] += 1
        for name, tickets in self.held.items():
            queued[name] += sum(len(t["keys"]) for t in tickets if not t.get("cancelled"))
        students: dict[str, Any] = {}
        for c in self.sched.state.registry()["certificates"]:
            if c["role"] != "client":
                continue
            n = c["name"]
            if c.get("quota") is None and n not in connected and not self.used(n) and not c.get("educator"):
                continue  # a client that is no student of this lab, or has not been seen today
            students[n] = {"connected": connected.get(n, 0), "running": running.get(n, 0),
                           "queued": queued.get(n, 0), "used": self.used(n), "quota": self.quota(n),
                           "revoked": bool(c.get("revoked")) and not self.entry(n),
                           "educator": bool(c.get("educator"))}
        return {"day": today(), "reset": reset_text(), "over_quota": config.get("lab.over-quota"),
                "students": students}


def make_plugin(gate: LabGate) -> Any:
    """The scheduler plugin feeding `LabGate`: fair-share priorities, in-flight counts, seconds used."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    class _LabPlugin(SchedulerPlugin):
        name = "depin-lab"

        def update_graph(self, scheduler: Any, *, client: str, tasks: list[Any], **kwargs: Any) -> None:
            gate.prioritize(client, tasks)  # runs before the new tasks become ready

        def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
            if finish not in ("memory", "erred", "forgotten"):
                return
            k = str(key)
            if start == "processing" and finish in ("memory", "erred") and k in gate.key_owner:
                seconds = sum(float(s.get("stop", 0)) - float(s.get("start", 0))
                              for s in kwargs.get("startstops") or () if s.get("action") == "compute")
                ws = gate.sched.workers.get(kwargs.get("worker"))
                kind = "gpu_seconds" if ws is not None and ws.resources.get("GPU") else "cpu_seconds"
                gate.account(k, kind, seconds)
            gate.done(k)

    return _LabPlugin()


def fetch_lab_status(token_text: str | None = None, state: Any = None, timeout: float = 10.0) -> dict[str, Any]:
    """The coordinator's live lab status, asked as an educator (a token) or as the coordinator itself (its
    state dir: on the coordinator machine)."""
    from distributed.core import rpc

    from depin_jupyter.protocol.rpc import AsyncCoordinator

    if token_text is not None:
        from depin_jupyter.protocol.identity import Token

        token = Token.decode(token_text)
        token.check_valid("client")
        address, args = token.address, token.security("client").get_connection_args("client")
    else:
        if not state.exists:
            raise DepinUsageError(f"no coordinator in {state.path}; pass --state-dir, or --token with an "
                                  f"educator's token")
        address, args = state.address, state.scheduler_client_security().get_connection_args("client")

    async def ask() -> dict[str, Any]:
        async with rpc(address, connection_args=args, timeout=timeout) as s:
            return await AsyncCoordinator(s).lab_status()

    status = asyncio.run(ask())
    if "error" in status:
        raise DepinUsageError(f"refused by the coordinator: {status['error']}")
    return status
