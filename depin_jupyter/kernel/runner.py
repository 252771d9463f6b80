"""Run one cell on the cluster: plan, ship inputs, submit, retry, store and bind the results.

This is the plain API under `%%depin`; the magic only parses arguments and calls `run_cell`. The steps
live beside it: `privacy` (private data stays home), `placement` (where it may run, environments checked),
`submit` (one submission and its wait), `replication` (several volunteers and a majority), `shipping`
(inputs out, results in).
"""

from __future__ import annotations

import hashlib
import sys
import time
from typing import Any

from dask.utils import format_bytes

from depin_jupyter import config
from depin_jupyter.cell import analyze
from depin_jupyter.errors import RemoteExecutionError, WorkerLostError
from depin_jupyter.kernel import replication
from depin_jupyter.kernel.binding import adopt_classes, apply_results, view_values
from depin_jupyter.kernel.cluster import Session
from depin_jupyter.kernel.modules import bundle_local_modules
from depin_jupyter.kernel.placement import check_environment, module_candidates, route
from depin_jupyter.kernel.privacy import check_private, effective_pool
from depin_jupyter.kernel.records import (
    CellOutcome,
    InputsLost,
    Prepared,
    Progress,
    RemoteCellError,
    RunOptions,
    WorkerDied,
)
from depin_jupyter.kernel.shipping import fingerprints, ship_inputs
from depin_jupyter.kernel.stream import emit
from depin_jupyter.kernel.submit import raise_remote
from depin_jupyter.protocol.records import RunResult, RunSpec, new_run_id
from depin_jupyter.protocol.values import RichValue
from depin_jupyter.store import persist

_DEFAULTS = RunOptions()

__all__ = ["CellOutcome", "RemoteCellError", "RunOptions", "check_private", "finish", "make_spec", "prepare",
           "record_run", "run_cell"]


def prepare(session: Session, code: str, namespace: dict[str, Any], options: RunOptions = _DEFAULTS,
            hidden: dict[str, Any] | None = None) -> Prepared:
    """Analyze the cell, find its inputs (NameError before anything is sent), route it, check environments.

    ``hidden`` holds names the shell itself put in the namespace (IPython's `user_ns_hidden`);
    they are not sent unless the user rebound them.
    """
    __tracebackhide__ = True
    started = time.perf_counter()  # the cell's time counts its routing and environment check too
    config.check()  # a misspelt or mistyped setting is an error naming it, not silently ignored
    label = options.name or "cell"
    run_id = new_run_id()
    filename = f"<depin {label} {hashlib.sha256(code.encode()).hexdigest()[:8]}>"
    plan = analyze(code, filename=filename)
    if options.inputs is not None:
        names = list(options.inputs)
        missing = [n for n in names if n not in namespace]
    else:
        hidden = hidden or {}
        names = [n for n in plan.inputs(namespace) if n not in hidden or namespace[n] is not hidden[n]]
        missing = plan.undefined(namespace)
    if missing:
        raise NameError(f"name {missing[0]!r} is not defined: the %%depin cell reads it"
                        + (f" (also undefined: {', '.join(missing[1:])})" if len(missing) > 1 else "")
                        + ". Define it in the notebook before running the cell; nothing was sent.")
    private = check_private(session, names, namespace, options)  # refused here: nothing sent yet
    needed = module_candidates(plan.imports, names, namespace)
    bundle = bundle_local_modules(needed)
    placement, candidates = route(session, options)
    placement = check_environment(session, needed, bundle, placement, candidates)
    if placement.get("workers"):
        candidates = [w for w in candidates if w in placement["workers"]]
    return Prepared(run_id, label, code, filename, plan, names, bundle, placement, options, candidates,
                    started=started, pool=effective_pool(options), private=private)


def make_spec(prep: Prepared, shipped: Any) -> RunSpec:
    """What the worker's `remote.run_cell` needs besides the input values."""
    options, bundle = prep.options, prep.bundle
    return {
        "run_id": prep.run_id,
        "name": prep.label,
        "code": prep.code,
        "filename": prep.filename,
        "modules": shipped.modules,
        "maybe_mutated": [n for n in prep.plan.maybe_mutated if n in shipped.args],
        "outputs": list(options.outputs) if options.outputs is not None else None,
        "last_expr": prep.plan.last_expr,
        "timeout": config.seconds("timeout", options.timeout),
        "max_runtime": config.seconds("max-runtime", options.max_runtime),
        "flush_interval": config.seconds("stream.flush-interval"),
        "local_modules": {"key": bundle.key, "names": list(bundle.names)} if bundle else None,
        "private": bool(prep.private),
    }


def run_cell(session: Session, code: str, namespace: dict[str, Any], options: RunOptions = _DEFAULTS,
             hidden: dict[str, Any] | None = None, progress: Progress | None = None) -> CellOutcome:
    """Run ``code`` on the session's cluster with inputs from ``namespace``; bind its results there.

    Raises the cell's own exception (with the remote traceback as a note), or a DepinError subclass
    naming what went wrong outside the cell (undefined input, worker lost, timeout...).
    """
    __tracebackhide__ = True
    prep = prepare(session, code, namespace, options, hidden)
    progress = progress or Progress()
    store = persist.open_for(options)  # an unwritable store fails here, before any compute
    hashes = fingerprints(namespace, prep.names)
    key = None
    if store is not None:
        key = persist.cache_key(code, hashes, prep.bundle.key if prep.bundle else None, options,
                                persist.deps_digests(options.deps))
        if config.get("store.cache") and not options.no_cache:
            hit = persist.serve_cached(store, key, namespace)
            if hit is not None:
                return _cached(session, namespace, prep, hit, progress)
    retries = int(config.get("retries", options.retries))
    attempt = lost_inputs = 0
    # On a volunteer network large array inputs go through the coordinator's input cache, unless private
    # or the coordinator dropped one during the run (then they ride inside the task, which cannot fail so).
    via_coordinator = session.untrusted
    while True:
        attempt += 1
        # Cheap when the inputs are on the cluster already; re-sends any a dead worker took with it.
        progress.update("shipping", f"{len(prep.names)} input(s)")
        shipped = ship_inputs(session.client, namespace, prep.names, session.inputs, prep.bundle, hashes,
                              inline=session.untrusted, via_coordinator=via_coordinator,
                              keep_inline=frozenset(prep.private))
        t_shipped = time.perf_counter()
        progress.update("queued", f"sent {format_bytes(shipped.sent_bytes)}, reused {len(shipped.reused)} input(s) "
                                  f"already on the cluster")
        spec = make_spec(prep, shipped)
        try:
            result = replication.execute(session, spec, shipped.args, prep, progress)
            break
        except InputsLost:
            lost_inputs += 1
            attempt -= 1
            via_coordinator = False
            if lost_inputs > 3:
                raise RemoteExecutionError("the cell's inputs keep getting lost with their workers; "
                                           "check the cluster's health (%depin status).") from None
        except WorkerDied as died:
            death = died.death
            if not death.retryable:
                raise WorkerLostError(f"{death.message}") from None
            if attempt > retries:
                raise WorkerLostError(
                    f"{death.message} Tried {attempt} time(s) (--retries {retries}); raise --retries to "
                    f"try more workers."
                ) from None
            print(f"depin: {death.message} Retrying on another worker (attempt {attempt + 1} of "
                  f"{retries + 1}).", file=sys.stderr)
            progress.update("retrying", f"attempt {attempt + 1} of {retries + 1}")
        except BaseException as e:
            progress.update("failed", type(e).__name__)
            raise
    t_done = time.perf_counter()
    timings = {"ship_s": t_shipped - prep.started, "remote_s": t_done - t_shipped,
               "run_s": result.get("timings", {}).get("run", 0.0)}
    if store is not None:
        progress.update("storing", store.url)
        record_run(store, prep, hashes, key, result, session, timings, view_values(namespace, result))
        _ask_for_deps(session, result.get("opened", []), options.deps)
    outcome = finish(session, namespace, prep, shipped, spec, result, progress)
    outcome.attempts = attempt
    outcome.timings.update(ship=timings["ship_s"], remote=timings["remote_s"])
    return outcome


def record_run(store: Any, prep: Prepared, hashes: dict[str, str], key: str | None, result: RunResult,
            session: Session, timings: dict[str, float], views: dict[str, Any]) -> None:
    """Store the run; a failure to store is reported, never allowed to lose the results just computed."""
    try:
        warning = persist.record(store, run_id=prep.run_id, label=prep.label, code=prep.code, hashes=hashes,
                                 key=key or "", options=prep.options, result=result, client=session.client,
                                 timings=timings, pool=prep.pool, private=prep.private, views=views)
    except Exception as e:  # noqa: BLE001 - the namespace still gets the results
        warning = (f"the run's results are bound here but could not be stored in {store.url}: "
                   f"{type(e).__name__}: {e}")
    if warning:
        print(f"depin: {warning}", file=sys.stderr)
    # Dask-array outputs were computed by the workers straight into the store: bind the stored, lazy
    # view rather than the graph, so using them reads the result instead of computing it again.
    lazy = [n for n, v in result.get("outputs", {}).items() if type(v).__name__ == "Array"
            and type(v).__module__.startswith("dask")]
    if lazy and result.get("status") == "ok":
        try:
            result["outputs"].update(store.load(prep.run_id, lazy))
        except Exception:  # noqa: BLE001, S110 - not stored (reported above): keep the graph
            pass


def _ask_for_deps(session: Session, opened: list[str], deps: tuple[str, ...] | None) -> None:
    """Say once per file: the cell read it with open() but did not declare it, so a cache hit could be stale."""
    import glob
    import os

    declared = {os.path.abspath(p) for pattern in deps or () for p in glob.glob(pattern, recursive=True)}
    said = session.deps_said
    for path in opened:
        inside = any(path == d or path.startswith(d.rstrip(os.sep) + os.sep) for d in declared)
        if inside or path in said or not os.path.isfile(path):
            continue
        said.add(path)
        shown = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else path
        print(f"depin: this cell read {shown}; add --deps {shown} so that a change to it is not served "
              f"from the cache", file=sys.stderr)


def _cached(session: Session, namespace: dict[str, Any], prep: Prepared, hit: tuple[str, dict[str, Any]],
            progress: Progress) -> CellOutcome:
    run_id, result = hit
    for msg in result.get("shown", []):  # what the run printed and displayed, as it first appeared
        emit(msg)
    for warning in apply_results(namespace, result, trusted=not session.untrusted):
        print(f"depin: {warning}", file=sys.stderr)
    progress.update("cached", f"run {run_id}")
    progress.note(persist.cached_note(run_id, prep.options.name, result.get("lazy") or {}))
    outcome = CellOutcome(run_id=run_id, worker=result.get("worker"), cached=True,
                          timings={"total": time.perf_counter() - prep.started})
    if "value" in result:
        outcome.value, outcome.has_value = result["value"], True
    return outcome


def finish(session: Session, namespace: dict[str, Any], prep: Prepared, shipped: Any, spec: RunSpec,
           result: RunResult, progress: Progress | None = None,
           keep: Any = None) -> CellOutcome:
    """Bind a run's results into ``namespace`` and raise the cell's exception if it had one.

    ``keep(name) -> bool``, when given, says which names may be bound (a background run must not
    overwrite names the user rebound since it was submitted).
    """
    __tracebackhide__ = True
    progress = progress or Progress()
    for name in result.get("mutated", {}):
        # The cluster's copy changed in place (for a view: the copy of the array it is a view of).
        session.inputs.discard(shipped.hashes.get(shipped.views.get(name, name), ""))
    for warning in apply_results(namespace, result, keep, trusted=not session.untrusted):
        print(f"depin: {warning}", file=sys.stderr)
    outcome = CellOutcome(
        run_id=prep.run_id,
        worker=result.get("worker"),
        sent_bytes=shipped.sent_bytes,
        reused_inputs=shipped.reused,
        timings={"total": time.perf_counter() - prep.started, **result.get("timings", {})},
    )
    if "value" in result:
        outcome.value, outcome.has_value = _shown_value(result["value"], namespace)
    outcome.energy = result.get("energy")
    session.last_energy = (prep.run_id, outcome.energy) if outcome.energy else None  # for %depin status
    if result["status"] != "ok":
        progress.update("failed", result["error"]["type"])
        raise_remote(result, spec)
    progress.update("done", f"on {outcome.worker} in {outcome.timings['total']:.2f}s")
    return outcome




def _shown_value(value: Any, namespace: dict[str, Any]) -> tuple[Any, bool]:
    """(value, whether to show it) for the cell's last expression, as IPython would show it here.

    A value that travelled is formatted by this kernel, with the notebook's names (`adopt_classes`); one
    formatted on the worker brings the tracebacks of its failed formatters, which are shown on stderr."""
    if not isinstance(value, RichValue):
        return adopt_classes(value, namespace), True
    for text in getattr(value, "errors", None) or ():
        sys.stderr.write(text if text.endswith("\n") else text + "\n")
    return value, bool(value.data)
