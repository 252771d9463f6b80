"""The cell gateway: on a volunteer network, clients submit `%%depin` cells, never Dask graphs.

A client identity sends a cell as pickle-free bytes (`protocol.cells`) with where it may run; the
coordinator checks it, admits it under the client's lab quota, and builds the Dask task itself through its
own client (connected to itself with the scheduler's certificate), so the only tasks volunteers ever get
are depin's cell runner over those bytes. The gateway remembers who submitted each run: only that client
(or an educator of its lab) may wait for it, take its result, cancel it or list it. A run whose client
disconnects is cancelled unless it was submitted to outlive its kernel.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from depin_jupyter import config
from depin_jupyter.errors import TrustError
from depin_jupyter.network.threads import in_thread
from depin_jupyter.protocol.cells import check_placement, decode_spec
from depin_jupyter.protocol.constants import ENDED_STATES, RUN_KEY_PREFIX

__all__ = ["CellGateway", "GatewayRun", "Replication"]

logger = logging.getLogger("depin.coordinator")

_TERMINAL = ENDED_STATES


def _checked(submission: Any) -> tuple[dict[str, Any], Any, Replication | None]:
    """A submission's placement, spec and replication, checked and decoded (a TrustError if not valid)."""
    where = check_placement(submission.placement)
    parsed = decode_spec(submission.spec, max_bytes=1 << 24)
    return where, parsed, Replication.parse(submission.replication)


@dataclass(frozen=True)
class Replication:
    """How many distinct volunteers run a cell, and how their results must agree (`protocol.quorum`)."""

    k: int
    adaptive: bool
    rtol: float
    atol: float
    k_max: int

    @classmethod
    def parse(cls, value: Any) -> Replication | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise TrustError("a cell's replication settings must be a mapping")
        try:
            k = max(1, min(int(value.get("k", 1)), 16))
            return cls(k=k, adaptive=bool(value.get("adaptive", False)), rtol=float(value.get("rtol", 1e-7)),
                       atol=float(value.get("atol", 0.0)), k_max=max(k, min(int(value.get("k_max", k)), 16)))
        except (TypeError, ValueError) as e:
            raise TrustError(f"a cell's replication settings are not numbers: {e}") from None


@dataclass
class _Plan:
    """A replicated cell's plan, with the workers that may run it and whose they are."""

    plan: Any                 # protocol.quorum.Plan
    candidates: list[str]
    names: dict[str, str]
    k: int                    # replicas wanted (fewer than asked when the default degraded)


def _single_record(plan: _Plan, rep: Replication) -> dict[str, Any]:
    """The record of a cell that asked for replicas but ran once (a trusted volunteer not spot-checked,
    or fewer volunteers than the default wants)."""
    record: dict[str, Any] = {"replicated": False, "adaptive": rep.adaptive, "rtol": rep.rtol, "atol": rep.atol,
                              "accepted": True, "replicas": []}
    if plan.k < rep.k:
        record["degraded_to"] = plan.k
    return record


@dataclass
class GatewayRun:
    """One submitted cell (or one replica of it) and whose it is."""

    key: str
    run_id: str
    name: str                  # the run's label (--name)
    owner: str                 # certificate name of the submitting client
    client_id: str | None      # the Dask client id it was submitted over (cancelled when that one leaves)
    detached: bool             # outlives its client (background runs)
    submitted: float = field(default_factory=time.time)
    future: Any = None
    ended: asyncio.Event | None = None       # set when ``future`` is done, however it ended
    state: str = "queued"      # queued (held by a quota), pending, finished, error, cancelled, lost
    error: str = ""
    worker: str | None = None
    done: asyncio.Event | None = None        # set when a replicated run (no single future) has ended
    written: bool = False      # written down in the state dir (`network.held`): dropped there when forgotten
    payload: bytes | None = None             # a replicated run's accepted result
    replication: dict[str, Any] | None = None  # its record: replicas, verdicts, tolerance
    replicas: list[str] = field(default_factory=list)  # keys of its replicas' own runs


class CellGateway:
    """Cells submitted by client identities, run through the coordinator's own Dask client."""

    def __init__(self, sched: Any) -> None:
        self.sched = sched
        self.runs: dict[str, GatewayRun] = {}
        self.by_run_id: dict[str, str] = {}   # run id -> task key (stream events name their run id)
        self._client: Any = None
        self._client_lock = asyncio.Lock()
        from depin_jupyter.network.held import HeldResults

        # runs written down in the state dir: a restarted coordinator still has them (`network.held`)
        self.held = HeldResults(sched.state.path / "held")
        self._resumable: dict[str, Any] = {}  # key -> HeldSubmission of a run to submit again (`resume`)
        self._wakers: dict[str, set[asyncio.Event]] = {}  # key a kernel is submitting -> its long polls to wake
        self._restore()

    def _restore(self) -> None:
        """The runs a previous coordinator process wrote down (background runs, and cells that lasted
        ``depin.coordinator.hold-after``): finished ones with their results;
        the ones it was running are submitted again (`resume`) from the submission kept with them (their
        volunteers' work went with it), or named lost where none was kept."""
        for held in self.held.load(config.seconds("coordinator.result-ttl") or 3600.0):
            rec = held.record
            state, error = rec.state, rec.error
            again = state in ("queued", "pending") and held.submission is not None
            if state in ("queued", "pending") and not again:
                state, error = "lost", "the coordinator restarted while it ran, and its result went with it: run it again"
            run = GatewayRun(rec.key, rec.run_id, rec.name, rec.owner, None, True, submitted=rec.submitted,
                             state="queued" if again else state, error=error, worker=rec.worker,
                             done=None if again else asyncio.Event(), payload=held.payload,
                             replication=rec.replication)
            if again:
                self._resumable[run.key] = held.submission  # type: ignore[assignment]
            else:
                run.done.set()  # type: ignore[union-attr]
            self.runs[run.key] = run
            self.by_run_id[run.run_id] = run.key
        if self.runs:
            logger.info("holding %d run(s) kept by the previous coordinator process, %d to run again",
                        len(self.runs), len(self._resumable))

    def resume(self) -> None:
        """Submit again the runs the previous coordinator process was running (once it listens)."""
        for key, submission in list(self._resumable.items()):
            del self._resumable[key]
            run = self.runs.get(key)
            if run is not None and run.state == "queued":
                self.sched.in_background(self._launch_held, run, submission)

    async def _launch_held(self, run: GatewayRun, submission: Any) -> None:
        try:
            await self._launch(run, submission)
        except Exception as e:  # noqa: BLE001 - its owner is told why, as text
            logger.warning("could not run %s again after the restart: %s", run.key, e)
            run.state, run.error = "lost", f"the coordinator restarted while it ran and could not run it again ({e})"
            await self._keep(run)

    async def _keep(self, run: GatewayRun, submission: Any = None) -> None:
        """Write a run down (again): submitted (with what runs it again), or ended with its result."""
        from depin_jupyter.network.held import HeldRecord

        run.written = True
        payload = None
        if run.state == "finished":
            payload = run.payload if run.done is not None else self.sched.relay.get(run.key, pop=False)
        record = HeldRecord(run.key, run.run_id, run.name, run.owner, run.submitted, run.state, run.error,
                            run.worker, run.replication, len(payload) if payload is not None else 0)
        try:
            await asyncio.to_thread(self.held.keep, record, payload, config.nbytes("coordinator.relay-max-bytes"),
                                    submission)
        except OSError:
            logger.exception("could not keep run %s in %s", run.key, self.held.root)
        if run.key not in self.runs:  # fetched (or forgotten) while it was being written: not to be handed again
            self.held.drop(run.key)

    async def _keep_when_ended(self, run: GatewayRun) -> None:
        """A background run's end, settled as soon as it comes (its kernel may be gone), and written down."""
        if run.ended is not None:
            await run.ended.wait()
            if run.state == "pending":
                await self._settle(run)
        elif run.done is not None:
            await run.done.wait()
        if run.key in self.runs:  # not fetched meanwhile
            await self._keep(run)

    async def client(self) -> Any:
        """The coordinator's own client (started on first use, with the scheduler's certificate)."""
        async with self._client_lock:
            if self._client is None:
                from distributed import Client

                self._client = await Client(self.sched.address, security=self.sched.state.scheduler_client_security(),
                                            asynchronous=True, name="depin-gateway", set_as_default=False)
            return self._client

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    # --- who may see what ---
    def _may_see(self, name: str, run: GatewayRun) -> bool:
        return run.owner == name or self.sched.lab.is_educator(name, "client")

    def owned(self, name: str, key: str) -> GatewayRun:
        run = self.runs.get(key)
        if run is None or not self._may_see(name, run):
            raise TrustError(f"no run {key!r} of {name!r} on this coordinator (a client sees only its own runs)")
        return run

    def run_of(self, run_id: str) -> GatewayRun | None:
        key = self.by_run_id.get(run_id)
        return None if key is None else self.runs.get(key)

    # --- submit, wait, cancel ---
    async def submit(self, name: str, client_id: str | None, key: str, spec: bytes, inputs: bytes,
                     blob: bytes | None, placement: Any, detached: bool = False, replication: Any = None) -> str:
        from depin_jupyter.network.held import HeldSubmission

        if not isinstance(key, str) or not key.startswith(RUN_KEY_PREFIX) or key in self.runs or key in self.sched.tasks:
            raise TrustError(f"refused cell key {key!r}: it must be a new {RUN_KEY_PREFIX}... key")
        submission = HeldSubmission(spec, inputs, blob, placement, replication)
        checked = _checked(submission)
        parsed = checked[1]
        if self.sched.lab.client_names.get(client_id or "") != name:
            client_id = None  # not this identity's connection: the run is tied to no client
        run = GatewayRun(key, parsed["run_id"], str(parsed.get("name") or "cell"), name, client_id, bool(detached))
        self.runs[key] = run
        self.by_run_id[run.run_id] = key
        for woken in self._wakers.pop(key, ()):
            woken.set()  # its kernel's long poll returns, to poll again with this run in it
        # Private data (inside the task, by the kernel's privacy rule) never goes to this disk: such a run is
        # written down without its submission, and is named lost rather than run again after a restart.
        kept = None if parsed.get("private") is True else submission
        if run.detached:
            await self._keep(run, kept)  # a restarted coordinator runs it again from this
        else:
            self.sched.in_background(self._hold_later, run, kept)
        await self._launch(run, submission, checked)
        return "OK"

    async def _hold_later(self, run: GatewayRun, submission: Any | None) -> None:
        """A cell its kernel waits for, written down once it has lasted ``depin.coordinator.hold-after``: its
        submission while it runs (a restarted coordinator runs it again), then its result if it ended and its
        kernel has not fetched it (a restarted one hands it over). A cell fetched sooner never touches the disk."""
        await asyncio.sleep(config.seconds("coordinator.hold-after") or 0.0)
        if run.key not in self.runs:
            return
        if run.state in ("queued", "pending") and not (run.ended is not None and run.ended.is_set()):
            await self._keep(run, submission)
        await self._until_ended(run, time.monotonic() + (config.seconds("coordinator.result-ttl") or 3600.0))
        if run.key in self.runs and run.state in _TERMINAL:
            await self._keep(run)

    async def _launch(self, run: GatewayRun, submission: Any, checked: Any = None) -> None:
        """Admit ``run`` under its owner's lab quota and start it: one Dask task, or replicas judged here.
        ``checked``: `_checked(submission)` when the caller has it already."""
        spec, inputs, blob = submission.spec, submission.inputs, submission.blob
        where, parsed, rep = checked or _checked(submission)
        key, name = run.key, run.owner

        async def start() -> None:
            run.state = "pending"
            plan = None if rep is None or rep.k <= 1 else self._plan(where, rep)
            if plan is None or not plan.plan.replicated:
                # one run: Dask places it (and re-runs it elsewhere if its volunteer is lost)
                if plan is not None and rep is not None:
                    run.replication = _single_record(plan, rep)
                run.future, run.ended = await self._task(key, spec, inputs, blob, where, name)
            else:
                run.done = asyncio.Event()
                self.sched.in_background(self._replicated, run, parsed, spec, inputs, blob, plan, rep)
            if run.detached:
                self.sched.in_background(self._keep_when_ended, run)

        def refuse(_client: str, _keys: Any, text: str) -> None:
            run.state, run.error = "error", text
            if run.detached:
                self.sched.in_background(self._keep, run)

        await self.sched.lab.admit(run.client_id or f"depin-gateway:{name}", [key], start, fail=refuse, name=name,
                                   tracked=True)

    async def _task(self, key: str, spec: bytes, inputs: bytes, blob: bytes | None, where: dict[str, Any],
                    owner: str) -> tuple[Any, asyncio.Event]:
        """The Dask task of one run of ``owner``'s (the cell runner over the submitted bytes, placed as asked),
        and an event set when it is done. Its result, a marker, is never gathered: nobody dials a volunteer."""
        from depin_jupyter.worker.entry import run_cell_gateway  # pickled by reference: the worker's runner

        client = await self.client()
        loop = asyncio.get_running_loop()
        ended = asyncio.Event()
        future = client.submit(run_cell_gateway, spec, inputs, blob, owner, key=key, pure=False, **where)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(ended.set))
        return future, ended

    async def wait(self, name: str, key: str, timeout: float, connected: Any = None,
                   keep: bool = False) -> dict[str, Any]:
        """The run's state after waiting up to ``timeout`` s for it to end; a finished run's payload.

        ``connected()``: whether the asker is still there when the run ends. A long poll whose client went
        away meanwhile must not take the result with it (a background run's new kernel fetches it).
        ``keep``: a detached run stays after handing its result over, until `release` (a map's batches: a
        new kernel attaching to the map gets those its dead kernel had fetched too)."""
        run = self.owned(name, key)
        await self._until_ended(run, time.monotonic() + max(0.0, min(float(timeout), 60.0)))
        return self._answer(run, connected, keep, name)

    async def wait_many(self, name: str, keys: list[str], timeout: float, connected: Any = None,
                        keep: Any = (), pending: Any = ()) -> dict[str, dict[str, Any]]:
        """`wait` for many runs in one long poll (a kernel's cells and map batches: one connection, not one
        each): the answers of those that ended, as soon as one has, or after ``timeout`` s, or as soon as one
        of ``pending`` (cells the kernel is submitting right now) arrives, so its kernel can poll again with
        that one too. A key that names no run of ``name`` gets a lost answer (the run was fetched already,
        or this coordinator restarted without it)."""
        kept = {str(k) for k in keep} if isinstance(keep, (list, tuple, set)) else set()
        coming = [k for k in pending if isinstance(k, str)][:256] if isinstance(pending, (list, tuple)) else []
        deadline = time.monotonic() + max(0.0, min(float(timeout), 60.0))
        answers: dict[str, dict[str, Any]] = {}
        live: dict[str, GatewayRun] = {}
        for key in [k for k in keys if isinstance(k, str)][:4096] if isinstance(keys, (list, tuple)) else ():
            run = self.runs.get(key)
            if run is None or not self._may_see(name, run):
                answers[key] = {"state": "lost", "error": "the coordinator no longer holds this run (it restarted "
                                "without it, or its result was handed over already)"}
            else:
                live[key] = run
        if live and not answers and not any(k in self.runs for k in coming):
            woken = asyncio.Event()
            for k in coming:
                self._wakers.setdefault(k, set()).add(woken)
            waits = [asyncio.ensure_future(self._until_ended(run, deadline)) for run in live.values()]
            stirred = asyncio.ensure_future(woken.wait())
            try:
                await asyncio.wait([*waits, stirred], timeout=max(0.0, deadline - time.monotonic()),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for f in (*waits, stirred):
                    f.cancel()
                for k in coming:
                    waiting = self._wakers.get(k)
                    if waiting is not None:
                        waiting.discard(woken)
                        if not waiting:
                            del self._wakers[k]
        for key, run in live.items():
            if run.ended is not None and run.ended.is_set() and run.state == "pending":
                await self._settle(run)
            if run.state in _TERMINAL:
                answers[key] = self._answer(run, connected, key in kept, name)
        return answers

    async def _until_ended(self, run: GatewayRun, deadline: float) -> None:
        """Wait until ``run`` ended or ``deadline`` (`time.monotonic`); an ended task is settled."""
        while run.future is None and run.done is None and run.state == "queued" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # held by a lab quota
        if run.done is not None and run.state == "pending":
            try:
                await asyncio.wait_for(run.done.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                pass
        elif run.ended is not None and run.state == "pending":
            try:
                await asyncio.wait_for(run.ended.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                pass
            if run.ended.is_set():
                await self._settle(run)

    def _answer(self, run: GatewayRun, connected: Any, keep: bool, asker: str) -> dict[str, Any]:
        """What ``asker`` is told of ``run`` (a finished run's payload; a big one as its parts: `network.results`);
        an ended run handed over is forgotten, unless ``keep`` (a detached run) or its asker went away."""
        answer: dict[str, Any] = {"state": run.state, "error": run.error, "worker": run.worker,
                                  "replication": run.replication}
        if connected is not None and not connected():
            return answer  # nobody to hand it to: the result stays for the next asker
        keep = keep and run.detached
        if run.state == "finished":
            payload = run.payload if run.done is not None else self.sched.relay.get(run.key, pop=not keep)
            answer.update(self.sched.results.hand_over(run.key, payload, asker))
        if run.state in _TERMINAL and not keep:
            self.forget(run.key)
        return answer

    def release(self, name: str, names: list[str]) -> int:
        """Forget the ended detached runs of ``name`` with these run names (kept by ``wait(keep=True)``)."""
        wanted = {str(n) for n in names}
        gone = [run.key for run in self.runs.values()
                if run.owner == name and run.detached and run.name in wanted and run.state in _TERMINAL]
        for key in gone:
            self.sched.relay.drop(key)
            self.forget(key)
        return len(gone)

    async def _settle(self, run: GatewayRun) -> None:
        """Turn a done future into the run's state (text only: nothing from a volunteer is unpickled here)."""
        fut = run.future
        if fut.status == "finished":
            run.state = "finished" if run.key in self.sched.relay else "lost"
            run.error = "" if run.state == "finished" else "the volunteer finished but sent no result"
        elif fut.status == "cancelled":
            run.state = "cancelled"
        elif fut.status == "error":
            exc = await fut.exception()
            from distributed import KilledWorker

            if isinstance(exc, KilledWorker):
                last = getattr(exc, "last_worker", None)
                run.worker = getattr(last, "address", None)
                who = self.sched.worker_names.get(run.worker or "", run.worker)
                run.state, run.error = "lost", f"the volunteer {who} running it died or left, and so did the retries"
            else:
                run.state, run.error = "error", str(exc)[:4000]
        elif fut.status == "lost":
            run.state, run.error = "lost", "the volunteer holding its result left"

    async def cancel(self, name: str, key: str, reason: str = "cancelled by its client") -> bool:
        run = self.owned(name, key)
        live = [r.future for r in (run, *(self.runs[k] for k in run.replicas if k in self.runs))
                if r.future is not None and r.state == "pending"]
        if live:
            client = await self.client()
            await client.cancel(live, reason=reason, force=True)
        self.sched.lab.release_held(run.client_id or f"depin-gateway:{name}", [key])
        was_live = run.state in ("queued", "pending")
        run.state = "cancelled"
        return was_live

    def forget(self, key: str) -> None:
        run = self.runs.pop(key, None)
        if run is None:
            return
        self.sched.lab.done(key)  # also when its task never existed (refused, cancelled while held)
        self.by_run_id.pop(run.run_id, None)
        if run.detached or run.written:
            self.held.drop(key)
        if run.future is not None:
            run.future.release()
        for k in run.replicas:
            self.forget(k)

    def jobs(self, name: str) -> list[dict[str, Any]]:
        """The runs ``name`` may see: its own (an educator: everyone's), as plain records."""
        out = []
        replicas = {k for run in self.runs.values() for k in run.replicas}
        for run in self.runs.values():
            # In flight, or a background run that ended with nobody fetching it yet (a new kernel may).
            if self._may_see(name, run) and (run.state in ("queued", "pending")
                                             or (run.detached and run.key not in replicas)):
                ts = self.sched.tasks.get(run.key)
                where = ts.processing_on.address if ts is not None and ts.processing_on is not None else None
                out.append({"key": run.key, "run_id": run.run_id, "name": run.name, "owner": run.owner,
                            "submitted": run.submitted, "state": "running" if where else run.state,
                            "worker": where, "detached": run.detached, "replica": run.key in replicas})
        return out

    async def client_gone(self, client_id: str) -> None:
        """A client left: its runs that were not meant to outlive it are cancelled (and their slots freed)."""
        for run in list(self.runs.values()):
            if run.client_id == client_id and not run.detached and run.state in ("queued", "pending"):
                try:
                    await self.cancel(run.owner, run.key, reason="its client disconnected")
                except Exception:
                    logger.exception("could not cancel %s", run.key)
                self.forget(run.key)

    def expire(self) -> None:
        """Forget finished runs nobody fetched within ``depin.coordinator.result-ttl``."""
        ttl = config.seconds("coordinator.result-ttl") or 3600.0
        now = time.time()
        self.sched.results.expire(ttl)
        for run in list(self.runs.values()):
            if run.state in _TERMINAL and now - run.submitted > ttl:
                self.sched.relay.drop(run.key)
                self.forget(run.key)

    # --- replicated runs: the coordinator judges (`protocol.quorum`), nobody reports verdicts to it ---
    def _plan(self, where: dict[str, Any], rep: Replication) -> _Plan:
        """Who runs a replicated cell first (`protocol.quorum.plan`), among the volunteers that may run it."""
        import random

        from depin_jupyter.protocol import quorum

        candidates = self.sched.workers_for(where)
        names = {w: self.sched.worker_names.get(w, w) for w in candidates}
        k = rep.k
        if rep.adaptive and 0 < len(set(names.values())) < k:
            k = len(set(names.values()))  # the default degrades to the volunteers there are; --replicas K does not
        if not candidates:
            return _Plan(quorum.Plan([], rep.adaptive, True), [], {}, k)
        plan = quorum.plan(candidates, names, k, rep.adaptive, dict(self.sched.reputation),
                           int(config.get("trust-streak")), random.Random())
        return _Plan(plan, candidates, names, k)

    async def _replicated(self, run: GatewayRun, spec: Any, spec_bytes: bytes, inputs: bytes, blob: bytes | None,
                          plan: _Plan, rep: Replication) -> None:
        """Run the cell on distinct volunteers until a tolerant majority agrees; keep reputation and credit."""
        from depin_jupyter.protocol import quorum
        from depin_jupyter.protocol.cells import encode_spec

        assert run.done is not None
        loop = asyncio.get_running_loop()
        names = plan.names
        payloads: dict[int, bytes] = {}  # id of a replica's decoded result -> its raw payload

        def run_one(worker: str, primary: bool) -> dict[str, Any]:
            rspec = spec_bytes if primary else encode_spec(
                {**spec, "run_id": f"{spec['run_id']}-{names[worker]}"})  # type: ignore[typeddict-item]
            rkey = run.key if primary else f"{run.key}~{names[worker]}"
            future = asyncio.run_coroutine_threadsafe(
                self._one_replica(run, rkey, rspec, inputs, blob, worker, primary), loop)
            result, payload = future.result()
            payloads[id(result)] = payload
            return result

        try:
            if not plan.candidates:
                raise quorum.ReplicationError("no connected volunteer can run this cell (pool, GPUs)")
            result, record = await in_thread(quorum.run, run_one, plan.plan, plan.candidates, names, plan.k,
                                              rep.k_max, rep.rtol, rep.atol)
            if plan.k < rep.k:
                record["degraded_to"] = plan.k
            run.payload, run.replication, run.state = payloads.get(id(result)), record, "finished"
            self._judge(record, run)
        except Exception as e:  # noqa: BLE001 - the client is told why, as text
            run.state, run.error = "error", f"{type(e).__name__}: {e}"
        finally:
            run.done.set()

    async def _one_replica(self, parent: GatewayRun, key: str, spec: bytes, inputs: bytes, blob: bytes | None,
                           worker: str, primary: bool) -> tuple[dict[str, Any], bytes]:
        """One replica's run (its own key) on ``worker``, waited for; its decoded result (pickle-free) and raw
        payload. A replica whose worker leaves has no vote (Dask would wait for a pinned worker forever)."""
        from depin_jupyter.protocol import safe_codec
        from depin_jupyter.protocol.payloads import from_payload

        if primary:
            replica = parent
        else:
            self.sched.lab.key_owner.setdefault(key, parent.owner)  # its compute counts toward the quota
            replica = GatewayRun(key, f"{parent.run_id}~{key.rsplit('~', 1)[-1]}", parent.name, parent.owner,
                                 parent.client_id, parent.detached, state="pending")
            self.runs[key] = replica
            parent.replicas.append(key)
        pin = {"workers": [worker], "allow_other_workers": False}
        future, ended = await self._task(key, spec, inputs, blob, pin, parent.owner)
        replica.future = future
        gone = 0
        while not ended.is_set():
            try:
                await asyncio.wait_for(ended.wait(), 1.0)
            except TimeoutError:
                gone = gone + 1 if worker not in self.sched.workers else 0
                if gone >= 2:
                    client = await self.client()
                    await client.cancel([future], reason="its volunteer left", force=True)
                    raise RuntimeError(f"the volunteer's worker {worker} left before its replica finished") from None
        holder = GatewayRun(key, replica.run_id, replica.name, replica.owner, None, False, future=future,
                            state="pending")
        await self._settle(holder)
        if holder.state != "finished":
            raise RuntimeError(holder.error or holder.state)
        payload = self.sched.relay.get(key, pop=True)
        if payload is None:
            raise RuntimeError("the volunteer finished but sent no result")
        try:
            return dict(from_payload(payload, max_bytes=config.nbytes("coordinator.relay-max-bytes"))), payload
        except safe_codec.DecodeError as e:
            raise RuntimeError(f"its result was refused ({e}). Nothing from it was unpickled") from None

    def _judge(self, record: dict[str, Any], run: GatewayRun) -> None:
        """The coordinator's own verdicts: reputation and credit of each replica's volunteer."""
        from depin_jupyter.network.credit import apply_verdicts

        if not record.get("replicated"):
            return
        verdicts = []
        for r in record.get("replicas") or ():
            if r.get("verdict") is None:
                continue
            key = f"{run.key}~{r.get('volunteer')}"
            verdicts.append({"address": r.get("worker"), "key": key if key in run.replicas else run.key,
                             "valid": r.get("verdict") == "valid"})
        if apply_verdicts(verdicts, worker_names=self.sched.worker_names, reputation=self.sched.reputation,
                          credits=self.sched.credits, spent=self.sched.key_credit):
            self.sched.credits_dirty = True
        self.sched.reputation_dirty = True
