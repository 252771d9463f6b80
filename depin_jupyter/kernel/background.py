"""`%%depin --background`: a run that returns at once; its outputs are bound later, never under a cell's feet.

A finished run's outputs are bound before the next cell runs (IPython's ``pre_run_cell`` event) or
when the user asks (`%depin wait`), and never over a name the user rebound (or an input changed)
since submitting: those values stay in the handle's ``outputs``. Output the run printed is shown when
it is bound, headed by the run's name.
"""

from __future__ import annotations

import queue
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from distributed import fire_and_forget

from depin_jupyter.kernel.binding import view_values
from depin_jupyter.kernel.cluster import Session
from depin_jupyter.kernel.jobs import register as register_job
from depin_jupyter.kernel.records import CellOutcome, Prepared, RunOptions
from depin_jupyter.kernel.runner import finish, make_spec, prepare, record_run
from depin_jupyter.kernel.shipping import fingerprints, ship_inputs
from depin_jupyter.kernel.stream import emit
from depin_jupyter.protocol.records import RunSpec
from depin_jupyter.store import persist
from depin_jupyter.worker.entry import run_cell as remote_run_cell

__all__ = ["BackgroundRun", "submit", "bind_finished", "wait"]

_MISSING = object()


@dataclass
class BackgroundRun:
    """The live handle `%%depin --background` returns."""

    prep: Prepared
    shipped: Any
    spec: RunSpec
    future: Any
    stream: queue.Queue[dict[str, Any]]
    snapshot: dict[str, Any]                 # name -> object bound when submitted (identity check)
    submitted: float = field(default_factory=time.time)
    worker: str | None = None
    bound: bool = False
    outcome: CellOutcome | None = None
    error: BaseException | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    clean: Any = None                        # a volunteer's events: made inert (None drops one)
    store: Any = None                        # volunteer networks: the kernel stores the run when bound
    hashes: dict[str, str] = field(default_factory=dict)
    _printed: list[dict[str, Any]] = field(default_factory=list)
    _seen: int = 0

    @property
    def name(self) -> str:
        return self.prep.label

    @property
    def run_id(self) -> str:
        return self.prep.run_id

    def done(self) -> bool:
        return bool(self.future.done())

    def status(self) -> str:
        self._pump()
        if self.bound:
            return "failed" if self.error is not None else "bound"
        if self.done():
            return "finished" if self.future.status == "finished" else self.future.status
        return "running" if self.worker else "queued"

    def _pump(self) -> None:
        """Move arrived stream events into the handle (output is shown when the run is bound)."""
        while True:
            try:
                msg = self.stream.get_nowait()
            except queue.Empty:
                return
            if self.clean is not None:
                msg = self.clean(msg)
                if msg is None:
                    continue
            self._seen += 1
            if msg.get("kind") == "start":
                self.worker = msg.get("worker")
            else:
                self._printed.append(msg)

    def __repr__(self) -> str:
        elapsed = time.time() - self.submitted
        where = f" on {self.worker}" if self.worker else ""
        return (f"<depin background run {self.name!r} ({self.run_id}): {self.status()}{where}, "
                f"{elapsed:.1f}s — %depin wait {self.name} binds its outputs>")


def submit(session: Session, code: str, namespace: dict[str, Any], options: RunOptions,
           hidden: dict[str, Any] | None = None) -> BackgroundRun:
    """Check, ship and submit the cell; return a handle without waiting for it."""
    __tracebackhide__ = True
    if options.name and options.name in session.background and not session.background[options.name].bound:
        from depin_jupyter.errors import DepinUsageError

        raise DepinUsageError(f"a background run named {options.name!r} is still pending: %depin wait "
                              f"{options.name} or %depin cancel {options.name} first, or choose another --name")
    if options.name is None:
        options = RunOptions(**{**options.__dict__, "name": f"bg{len(session.background) + 1}"})
    prep = prepare(session, code, namespace, options, hidden)
    store = persist.open_for(options)  # probed before any compute
    hashes = fingerprints(namespace, prep.names)
    if session.untrusted:
        return _submit_to_coordinator(session, namespace, prep, store, hashes)
    shipped = ship_inputs(session.client, namespace, prep.names, session.inputs, prep.bundle, hashes)
    spec = make_spec(prep, shipped)
    if store is not None:
        # The worker stores the results itself, so they reach the store even if this kernel dies.
        spec["record"] = {"url": store.url, "storage_options": store.storage_options, "label": prep.label,
                          "hashes": hashes, "options": prep.options, "pool": prep.pool, "private": prep.private,
                          "key": persist.cache_key(code, hashes, prep.bundle.key if prep.bundle else None,
                                                   prep.options, persist.deps_digests(prep.options.deps))}
    stream = session.streams.open(prep.run_id)
    key = f"depin-run-{prep.run_id}-{uuid.uuid4().hex[:6]}"
    future = session.client.submit(remote_run_cell, spec, shipped.args, key=key, pure=False, **prep.placement)
    if store is not None:
        fire_and_forget(future)  # the cluster keeps the run when this kernel goes away
        _confirm_kept(session.client, key)
    register_job(session.client, prep.run_id, key, prep.label)
    watched = set(prep.plan.binds) | set(prep.plan.deletes) | set(prep.names)
    snapshot = {n: namespace.get(n, _MISSING) for n in watched}
    run = BackgroundRun(prep, shipped, spec, future, stream, snapshot)
    session.background[prep.label] = run
    return run


def _submit_to_coordinator(session: Session, namespace: dict[str, Any], prep: Prepared, store: Any,
                           hashes: dict[str, str]) -> BackgroundRun:
    """A background cell on a volunteer network: the coordinator keeps it when this kernel's connection
    goes (a detached run) and holds its result; the kernel binds it, and stores it, when it is bound (a
    volunteer never gets the store's credentials)."""
    from depin_jupyter.kernel.replication import gateway_replication
    from depin_jupyter.kernel.submit import inert_event, submit_detached

    shipped = ship_inputs(session.client, namespace, prep.names, session.inputs, prep.bundle, hashes, inline=True,
                          via_coordinator=True, keep_inline=frozenset(prep.private))
    spec = make_spec(prep, shipped)
    detached = submit_detached(session, spec, shipped.args, prep.placement, gateway_replication(session, prep))
    watched = set(prep.plan.binds) | set(prep.plan.deletes) | set(prep.names)
    snapshot = {n: namespace.get(n, _MISSING) for n in watched}
    run = BackgroundRun(prep, shipped, spec, detached, detached.queue, snapshot, clean=inert_event, store=store,
                        hashes=hashes)
    session.background[prep.label] = run
    return run


def _kept(key: str, dask_scheduler: Any = None) -> bool:
    ts = dask_scheduler.tasks.get(key)
    return ts is not None and any(cs.client_key == "fire-and-forget" for cs in ts.who_wants or ())


def _confirm_kept(client: Any, key: str, timeout: float = 10.0) -> None:
    """Wait until the scheduler holds the run for no client in particular, so a kernel killed right after
    `%%depin --background` returns cannot take the run with it."""
    deadline = time.monotonic() + timeout
    while not client.run_on_scheduler(_kept, key):
        if time.monotonic() > deadline:
            print("depin: could not confirm that the scheduler keeps this run if the kernel dies",
                  file=sys.stderr)
            return
        time.sleep(0.01)


def _bind(session: Session, run: BackgroundRun, namespace: dict[str, Any]) -> None:
    """Show the run's output and bind its results, keeping names the user rebound meanwhile."""
    run.bound = True
    try:
        result = run.future.result()
    except BaseException as e:  # noqa: BLE001 - a lost worker or cancellation: keep it on the handle
        run.error = e
        session.streams.close(run.run_id)
        print(f"depin: background run {run.name!r} did not complete: {type(e).__name__}: {e}", file=sys.stderr)
        return
    finally:
        run.future.release()
    deadline = time.monotonic() + 2.0  # output events travel apart from the result: let the last ones land
    run._pump()
    while run._seen < result.get("stream_count", 0) and time.monotonic() < deadline:
        time.sleep(0.01)
        run._pump()
    session.streams.close(run.run_id)
    print(f"depin: background run {run.name!r} ({run.run_id}) finished"  # information: stdout, not stderr
          + (f" on {run.worker}" if run.worker else "") + ":")
    for msg in run._printed:
        emit(msg)
    run._printed.clear()
    run.outputs = {**result.get("outputs", {}), **result.get("mutated", {})}

    def keep(name: str) -> bool:
        return namespace.get(name, _MISSING) is run.snapshot.get(name, _MISSING)

    if result.get("record_warning"):
        print(f"depin: {result['record_warning']}", file=sys.stderr)
    if run.store is not None and result.get("status") == "ok":
        key = persist.cache_key(run.prep.code, run.hashes, run.prep.bundle.key if run.prep.bundle else None,
                                run.prep.options, persist.deps_digests(run.prep.options.deps))
        record_run(run.store, run.prep, run.hashes, key, result, session,
                   {"ship_s": 0.0, "remote_s": time.time() - run.submitted,
                    "run_s": result.get("timings", {}).get("run", 0.0)}, view_values(namespace, result))
    try:
        run.outcome = finish(session, namespace, run.prep, run.shipped, run.spec, result, keep=keep)
    except BaseException as e:  # noqa: BLE001 - the cell's exception: shown now, kept on the handle
        run.error = e
        print(f"depin: background run {run.name!r} raised {type(e).__name__}: {e}", file=sys.stderr)
        for note in getattr(e, "__notes__", []):
            print(note, file=sys.stderr)


def bind_finished(session: Session, namespace: dict[str, Any]) -> list[BackgroundRun]:
    """Bind every finished, unbound background run (called before each cell runs)."""
    bound = []
    for run in list(session.background.values()):
        if not run.bound and run.done():
            _bind(session, run, namespace)
            bound.append(run)
    return bound


def wait(session: Session, namespace: dict[str, Any], name: str | None = None,
         timeout: float | None = None) -> list[BackgroundRun]:
    """Block until the named run (or every pending one) finishes, then bind it."""
    pending = [r for r in session.background.values() if not r.bound and (name is None or r.name == name)]
    if name is not None and not pending and session.untrusted and name not in session.background:
        _reattach(session, namespace, name, timeout)
        return []
    if name is not None and not pending:
        from depin_jupyter.errors import DepinUsageError

        known = ", ".join(session.background) or "none"
        raise DepinUsageError(f"no pending background run named {name!r} (background runs: {known})")
    deadline = None if timeout is None else time.monotonic() + timeout
    for run in pending:
        while not run.done():
            run._pump()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"background run {run.name!r} is still running")
            time.sleep(0.05)
        _bind(session, run, namespace)
    return pending


def _reattach(session: Session, namespace: dict[str, Any], name: str, timeout: float | None) -> None:
    """Bind a background run an earlier kernel of this identity left on a volunteer network's coordinator.

    Its output went to that kernel and is gone; its outputs are bound (decoded without pickle, as any
    volunteer's result), except names this kernel already has."""
    from depin_jupyter.errors import DepinUsageError
    from depin_jupyter.kernel.binding import apply_results
    from depin_jupyter.protocol.payloads import from_payload
    from depin_jupyter.protocol.rpc import Coordinator

    coordinator = Coordinator.of_client(session.client)
    mine = [j for j in coordinator.jobs() if j.get("name") == name and j.get("detached") and not j.get("replica")]
    if not mine:
        raise DepinUsageError(f"no background run named {name!r}, here or left on the coordinator by an earlier "
                              f"kernel of this identity (it may have been fetched, or expired after "
                              f"depin.coordinator.result-ttl)")
    job = max(mine, key=lambda j: float(j.get("submitted") or 0))
    deadline = None if timeout is None else time.monotonic() + timeout
    answer = coordinator.wait_ended(str(job["key"]), deadline, f"background run {name!r}")
    payload = coordinator.payload(str(job["key"]), answer) if answer.get("state") == "finished" else None
    if payload is None:
        raise DepinUsageError(f"background run {name!r} ended {answer.get('state')}: {answer.get('error') or ''}")
    result = from_payload(payload)
    kept = apply_results(namespace, result, keep=lambda n: n not in namespace, trusted=False)
    print(f"depin: background run {name!r} ({job.get('run_id')}), left by an earlier kernel, finished; bound "
          f"{', '.join(sorted(result.get('outputs', {}))) or 'nothing'}")
    for warning in kept:
        print(f"depin: {warning}", file=sys.stderr)
    if result.get("status") != "ok":
        err = result.get("error") or {}
        print(f"depin: it raised {err.get('type')}: {err.get('message')}", file=sys.stderr)
