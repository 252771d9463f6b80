"""Run one cell on the cluster: plan, ship inputs, submit, stream output, retry/time out, bind results.

This is the plain API under `%%depin`; the magic only parses arguments and calls `run_cell`.
"""

from __future__ import annotations

import datetime
import hashlib
import queue
import sys
import time
import types
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

from depin_jupyter import config
from depin_jupyter.store import persist
from depin_jupyter.cell import analyze
from depin_jupyter.kernel.cluster import Session
from depin_jupyter.kernel.jobs import register as register_job
from depin_jupyter.kernel.modules import bundle_local_modules
from depin_jupyter.kernel.failures import Death, explain_death, explain_exception
from depin_jupyter.kernel.envcheck import ALWAYS_CHECKED, compare, local_version
from depin_jupyter.errors import DepinError, EnvironmentMismatchError, CellTimeoutError, NoSuitableWorkerError, RemoteExecutionError, WorkerLostError
from depin_jupyter.worker.entry import run_cell as remote_run_cell
from depin_jupyter.worker.entry import run_cell_relayed
from depin_jupyter.kernel.shipping import apply_results, fingerprints, ship_inputs
from depin_jupyter.kernel.stream import emit
from depin_jupyter.protocol.rpc import Coordinator

__all__ = ["RunOptions", "CellOutcome", "RemoteCellError", "run_cell"]

_DONE: Any = object()  # queue sentinel: the run's future finished
_REGISTER_AFTER_S = 0.2  # runs still going after this long are listed on the scheduler
# Cancelling a run waits this long for the worker's thread to notice before the error is raised anyway.
_CANCEL_GRACE_S = 5.0


@dataclass(frozen=True)
class RunOptions:
    """Options of one `%%depin` run (None: take the configured default)."""

    gpu: int | None = None
    cpu: bool = False
    timeout: float | None = None
    retries: int | None = None
    name: str | None = None
    worker: str | None = None
    inputs: tuple[str, ...] | None = None
    outputs: tuple[str, ...] | None = None
    gpu_mem: float | None = None        # GiB a GPU must have
    gpu_arch: float | None = None       # minimum compute capability, e.g. 8.0
    max_runtime: float | None = None    # seconds; enforced on the worker even if the kernel is gone
    store: str | None = None            # result store URL (default: config depin.store.url)
    no_store: bool = False
    no_cache: bool = False
    deps: tuple[str, ...] | None = None  # files the cell reads (globs): their content is part of the cache key
    replicas: int | None = None         # run on this many distinct volunteers; a tolerant majority decides
    rtol: float | None = None           # replica agreement for floats (default: config depin.rtol)
    atol: float | None = None
    pool: str | None = None             # run only on workers of this pool (default: config depin.pool)
    private: tuple[str, ...] = ()       # private variables: sent only to a trusted pool (depin.trusted-pools)


class Progress:
    """Receives a run's stages; the default shows nothing. `widgets.make_progress` gives a visible one.

    Stages: "shipping" (detail: what is sent), "queued", "running" (detail: worker), "retrying",
    "storing", "done", "cached", "failed".
    """

    def update(self, stage: str, detail: str = "") -> None:
        pass

    def close(self) -> None:
        """Stop any timers; called once the run is over, whatever happened."""


@dataclass
class CellOutcome:
    """What a run produced besides the names it bound."""

    run_id: str
    worker: str | None
    value: Any = None
    has_value: bool = False
    sent_bytes: int = 0
    reused_inputs: list[str] = field(default_factory=list)
    attempts: int = 1
    timings: dict[str, float] = field(default_factory=dict)
    cached: bool = False
    energy: dict[str, Any] | None = None   # what the worker measured (`energy.py`); None when cached


class _WorkerDied(Exception):
    """The worker running the cell died; carries the explanation."""

    def __init__(self, death: Death) -> None:
        super().__init__(death.message)
        self.death = death


class _InputsLost(Exception):
    """Inputs kept on the cluster were lost with a worker: ship them again and resubmit."""


class RemoteCellError(RemoteExecutionError):
    """A cell's exception whose class could not travel back; keeps the remote type name and message."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.remote_message = message


def new_run_id() -> str:
    """A time-sortable unique run id, ``YYYYmmddTHHMMSS.ffffffZ-<8 hex>`` (UTC): the store's format."""
    t = datetime.datetime.now(datetime.UTC)
    return f"{t:%Y%m%dT%H%M%S.%fZ}-{uuid.uuid4().hex[:8]}"


@dataclass
class Prepared:
    """A run checked and routed, ready to ship: everything decided before any byte is sent."""

    run_id: str
    label: str
    code: str
    filename: str
    plan: Any
    names: list[str]
    bundle: Any
    placement: dict[str, Any]
    options: RunOptions
    candidates: list[str] = field(default_factory=list)   # workers that may run it (for replicas)
    started: float = field(default_factory=time.perf_counter)
    pool: str | None = None                                # the pool it runs in (None: any worker)
    private: list[str] = field(default_factory=list)       # inputs that carry private data


def prepare(session: Session, code: str, namespace: dict[str, Any], options: RunOptions = RunOptions(),
            hidden: dict[str, Any] | None = None) -> Prepared:
    """Analyze the cell, find its inputs (NameError before anything is sent), route it, check environments.

    ``hidden`` holds names the shell itself put in the namespace (IPython's `user_ns_hidden`);
    they are not sent unless the user rebound them.
    """
    __tracebackhide__ = True
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
    needed = _module_candidates(plan.imports, names, namespace)
    bundle = bundle_local_modules(needed)
    placement, candidates = _placement(session, options)
    placement = _check_environment(session, needed, bundle, placement, candidates)
    if placement.get("workers"):
        candidates = [w for w in candidates if w in placement["workers"]]
    return Prepared(run_id, label, code, filename, plan, names, bundle, placement, options, candidates,
                    pool=effective_pool(options), private=private)


def effective_pool(options: RunOptions) -> str | None:
    """The pool a run is restricted to: --pool, else config depin.pool (None: any worker)."""
    pool = options.pool if options.pool is not None else config.get("pool")
    return str(pool) if pool else None


def _private_inputs(names: list[str], namespace: dict[str, Any], private: set[str]) -> list[str]:
    """The inputs that are private or carry private data: a private name, another name for the same
    object, or a notebook function that reads a private global (cloudpickle would take it along)."""
    marked = [namespace[p] for p in private if p in namespace]

    def same_object(v: Any) -> bool:
        if v is None or isinstance(v, bool) or (type(v) is int and -5 <= v <= 256):
            return False  # shared singletons are not the private data itself
        return any(v is m for m in marked)

    def code_names(code: types.CodeType) -> set[str]:
        out = set(code.co_names)
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                out |= code_names(c)
        return out

    out = []
    for n in names:
        v = namespace.get(n)
        if n in private or same_object(v) or (isinstance(v, types.FunctionType) and v.__module__ == "__main__"
                                               and code_names(v.__code__) & private):
            out.append(n)
    return out


def check_private(session: Session, names: list[str], namespace: dict[str, Any], options: RunOptions) -> list[str]:
    """Refuse (DepinUsageError) a cell that would send private data anywhere but a trusted pool; returns the
    private inputs it sends. The embedded cluster runs on this machine: nothing leaves it."""
    private = set(options.private or ())
    sent = _private_inputs(names, namespace, private) if private else []
    if not sent or session.cluster is not None:
        return sent
    pool = effective_pool(options)
    trusted = [str(p) for p in config.get("trusted-pools") or ()]
    if pool is None or pool not in trusted:
        from depin_jupyter.errors import DepinUsageError

        where = "any worker of the cluster (no --pool)" if pool is None else f"pool {pool!r}"
        hint = f"run it with --pool {trusted[0]}" if trusted else "list a pool you trust in depin.trusted-pools"
        raise DepinUsageError(
            f"the cell reads private data ({', '.join(repr(n) for n in sent)}; %depin private / --private) and "
            f"would send it to {where}; private data goes only to a trusted pool (depin.trusted-pools: "
            f"{', '.join(trusted) or 'none'}). Nothing was sent: {hint}, or unmark it (%depin private --clear).")
    return sent


def make_spec(prep: Prepared, shipped: Any) -> dict[str, Any]:
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
    }


def run_cell(session: Session, code: str, namespace: dict[str, Any], options: RunOptions = RunOptions(),
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
    via_coordinator = session.untrusted and not config.get("volunteer.allow-pickle")
    while True:
        attempt += 1
        # Cheap when the inputs are on the cluster already; re-sends any a dead worker took with it.
        progress.update("shipping", f"{len(prep.names)} input(s)")
        shipped = ship_inputs(session.client, namespace, prep.names, session.inputs, prep.bundle, hashes,
                              inline=session.untrusted, via_coordinator=via_coordinator,
                              keep_inline=frozenset(prep.private))
        t_shipped = time.perf_counter()
        progress.update("queued", f"sent {_human(shipped.sent_bytes)}, reused {len(shipped.reused)} input(s) "
                                  f"already on the cluster")
        spec = make_spec(prep, shipped)
        try:
            result = _execute(session, spec, shipped.args, prep, progress)
            break
        except _InputsLost:
            lost_inputs += 1
            attempt -= 1
            via_coordinator = False
            if lost_inputs > 3:
                raise RemoteExecutionError("the cell's inputs keep getting lost with their workers; "
                                           "check the cluster's health (%depin status).") from None
        except _WorkerDied as died:
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
        _record(store, prep, hashes, key, result, session, timings)
        _ask_for_deps(session, result.get("opened", []), options.deps)
    outcome = finish(session, namespace, prep, shipped, spec, result, progress)
    outcome.attempts = attempt
    outcome.timings.update(ship=timings["ship_s"], remote=timings["remote_s"])
    return outcome


def _record(store: Any, prep: Prepared, hashes: dict[str, str], key: str | None, result: dict[str, Any],
            session: Session, timings: dict[str, float]) -> None:
    """Store the run; a failure to store is reported, never allowed to lose the results just computed."""
    try:
        warning = persist.record(store, run_id=prep.run_id, label=prep.label, code=prep.code, hashes=hashes,
                                 key=key or "", options=prep.options, result=result, client=session.client,
                                 timings=timings, pool=prep.pool, private=prep.private)
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
        except Exception:  # noqa: BLE001 - not stored (reported above): keep the graph
            pass


def _ask_for_deps(session: Session, opened: list[str], deps: tuple[str, ...] | None) -> None:
    """Say once per file: the cell read it with open() but did not declare it, so a cache hit could be stale."""
    import glob
    import os

    declared = {os.path.abspath(p) for pattern in deps or () for p in glob.glob(pattern, recursive=True)}
    said = session.__dict__.setdefault("deps_said", set())
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
    for warning in apply_results(namespace, result):
        print(f"depin: {warning}", file=sys.stderr)
    persist.say_cached(run_id, prep.options.name)
    progress.update("cached", f"run {run_id}")
    outcome = CellOutcome(run_id=run_id, worker=result.get("worker"), cached=True,
                          timings={"total": time.perf_counter() - prep.started})
    if "value" in result:
        outcome.value, outcome.has_value = result["value"], True
    return outcome


def finish(session: Session, namespace: dict[str, Any], prep: Prepared, shipped: Any, spec: dict[str, Any],
           result: dict[str, Any], progress: Progress | None = None,
           keep: Any = None) -> CellOutcome:
    """Bind a run's results into ``namespace`` and raise the cell's exception if it had one.

    ``keep(name) -> bool``, when given, says which names may be bound (a background run must not
    overwrite names the user rebound since it was submitted).
    """
    __tracebackhide__ = True
    progress = progress or Progress()
    for name in result.get("mutated", {}):
        session.inputs.discard(shipped.hashes.get(name, ""))  # the cluster's copy changed in place
    for warning in apply_results(namespace, result, keep):
        print(f"depin: {warning}", file=sys.stderr)
    outcome = CellOutcome(
        run_id=prep.run_id,
        worker=result.get("worker"),
        sent_bytes=shipped.sent_bytes,
        reused_inputs=shipped.reused,
        timings={"total": time.perf_counter() - prep.started, **result.get("timings", {})},
    )
    if "value" in result:
        outcome.value, outcome.has_value = result["value"], True
    outcome.energy = result.get("energy")
    session.last_energy = (prep.run_id, outcome.energy) if outcome.energy else None  # for %depin status
    if result["status"] != "ok":
        progress.update("failed", result["error"]["type"])
        _raise_remote(result, spec)
    progress.update("done", f"on {outcome.worker} in {outcome.timings['total']:.2f}s")
    return outcome


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _module_candidates(imports: tuple[str, ...], names: list[str], namespace: dict[str, Any]) -> list[str]:
    """Top-level modules a run may need: what the cell imports, and where its inputs come from."""
    out = list(imports)
    for name in names:
        value = namespace[name]
        if isinstance(value, types.ModuleType):
            mod = value.__name__
        elif isinstance(value, (type, types.FunctionType)):
            mod = getattr(value, "__module__", None) or ""
        else:
            mod = type(value).__module__
        out.append(mod.split(".")[0])
    return out


def _check_environment(session: Session, needed: list[str], bundle: Any, placement: dict[str, Any],
                       candidates: list[str]) -> dict[str, Any]:
    """Refuse (or route around) workers whose versions of the cell's packages differ from the kernel's."""
    mode = config.get("env-check")
    if mode == "ignore" or not candidates:
        return placement
    shipped = set(bundle.names) if bundle else set()
    packages = [p for p in dict.fromkeys([*ALWAYS_CHECKED, *needed])
                if p and p not in shipped and p not in ("__main__", "builtins")]
    local = {p: local_version(p) for p in packages}
    session.env.forget(w.address for w in session.last_workers)
    mismatches = compare(local, session.worker_versions(candidates, packages))
    if not mismatches:
        return placement
    listing = "; ".join(str(m) for m in mismatches)
    if mode == "warn":
        print(f"depin: environment differs: {listing}. Running anyway (depin.env-check: warn).", file=sys.stderr)
        return placement
    bad = {m.worker for m in mismatches}
    good = [w for w in candidates if w not in bad]
    if good:
        print(f"depin: not using {len(bad)} worker(s) whose environment differs: {listing}.", file=sys.stderr)
        return {**placement, "workers": good, "allow_other_workers": False}
    first = mismatches[0]
    raise EnvironmentMismatchError(
        f"the cell needs {first.package} but {listing}. Install the same major.minor versions on both sides "
        f"(pip install '{first.package}=={first.local}' on the worker, or match the notebook to the "
        f"cluster), or set depin.env-check: warn to run anyway."
    )


def _gpu_fits(gpu: dict[str, Any] | None, options: RunOptions) -> bool:
    if gpu is None:
        return False
    if options.gpu_mem and gpu["memory"] < options.gpu_mem * 2**30:
        return False
    return not (options.gpu_arch and gpu["arch"] < options.gpu_arch)


def _gpu_text(gpu: dict[str, Any] | None) -> str:
    if gpu is None:
        return "no GPU"
    return f"{gpu['name']}, {gpu['memory'] / 2**30:.1f} GiB, compute capability {gpu['arch']}"


def _wanted(options: RunOptions) -> str:
    parts = []
    if options.gpu_mem:
        parts.append(f"at least {options.gpu_mem:g} GiB (--gpu-mem)")
    if options.gpu_arch:
        parts.append(f"compute capability {options.gpu_arch:g} or newer (--gpu-arch)")
    return " and ".join(parts)


def _placement(session: Session, options: RunOptions) -> tuple[dict[str, Any], list[str]]:
    """Dask submit keywords that route the cell to suitable workers, and those workers' addresses."""
    try:
        return _place(session, options, session.workers())
    except NoSuitableWorkerError:  # maybe a worker joined since the cached list: ask again
        return _place(session, options, session.workers(max_age=0))


def _place(session: Session, options: RunOptions, workers: list[Any]) -> tuple[dict[str, Any], list[str]]:
    gpus = options.gpu if options.gpu is not None else (None if options.cpu else config.get("gpus"))
    placement: dict[str, Any] = {}
    if options.worker:
        match = [w.address for w in workers if options.worker in (w.name, w.address)]
        if not match:
            known = ", ".join(f"{w.name} ({w.address})" for w in workers) or "none"
            raise NoSuitableWorkerError(f"--worker {options.worker}: no such worker is connected. "
                                        f"Connected: {known}.")
        placement.update(workers=match, allow_other_workers=False)
        workers = [w for w in workers if w.address in match]
    pool = effective_pool(options)
    if pool:
        in_pool = [w for w in workers if pool in w.pools]
        if not in_pool:
            raise NoSuitableWorkerError(_no_pool(session, pool, workers))
        workers = in_pool
        placement["resources"] = {f"pool:{pool}": 1}
    if options.gpu_mem or options.gpu_arch:
        gpus = gpus or 1
    if gpus:
        capable = [w for w in workers if w.gpus >= gpus]
        if capable and (options.gpu_mem or options.gpu_arch):
            hardware = session.gpu_hardware([w.address for w in capable])
            capable = [w for w in capable if _gpu_fits(hardware.get(w.address), options)]
            if not capable:
                offered = "; ".join(f"{w.name} ({w.address}): {_gpu_text(hardware.get(w.address))}"
                                    for w in workers) or "no workers"
                raise NoSuitableWorkerError(
                    f"no connected worker has a GPU with {_wanted(options)}. Available: {offered}. Lower "
                    f"--gpu-mem/--gpu-arch, or connect to a cluster with such GPUs."
                )
        if capable:
            placement["resources"] = {**placement.get("resources", {}), "GPU": gpus}
            workers = capable
        elif config.get("gpu-fallback") == "cpu" and not (options.gpu_mem or options.gpu_arch):
            if not session.cpu_fallback_said:
                print(f"depin: no worker offers {gpus} GPU(s); running on CPU with numpy "
                      f"(depin.gpu-fallback: cpu).", file=sys.stderr)
                session.cpu_fallback_said = True
        else:
            have = ", ".join(f"{w.name}: {w.gpus} GPU" for w in workers) or "no workers"
            want = f"{gpus} GPU(s)" + (f" with {_wanted(options)}" if options.gpu_mem or options.gpu_arch else "")
            raise NoSuitableWorkerError(
                f"the cell asks for {want} but no connected worker has that ({have}). Connect to a "
                f"cluster with GPU workers, run with --cpu, or set depin.gpu-fallback: cpu to run such "
                f"cells on CPU with numpy."
            )
    return placement, [w.address for w in workers]


def _no_pool(session: Session, pool: str, workers: list[Any]) -> str:
    """Why no worker can run a --pool cell: the pools connected, and how a worker joins one."""
    counts: dict[str, int] = {}
    for w in workers:
        for p in w.pools or ("(no pool)",):
            counts[p] = counts.get(p, 0) + 1
    have = ", ".join(f"{p} ({n} worker{'s' if n > 1 else ''})" for p, n in sorted(counts.items())) or "no workers"
    if session.untrusted:
        how = (f"a worker joins pool {pool!r} with a token from the coordinator: `depin token issue --role worker "
               f"--name NAME --pool {pool}`")
    else:
        how = (f"on a cluster of your own, a worker is in pool {pool!r} when it has the Dask resource "
               f"pool:{pool} (`dask worker ... --resources pool:{pool}=1000000`); volunteer networks get pools "
               f"from the coordinator's certificates")
    return (f"no connected worker is in pool {pool!r} (--pool / depin.pool). Pools connected: {have}. Wait for "
            f"one to join, pick another pool, or drop --pool; {how}.")


def _replicas(session: Session, options: RunOptions) -> tuple[int, bool]:
    """(replicas to run, whether adaptive replication applies): --replicas K is exact; the configured
    default (1 on a trusted cluster, 2 on a volunteer network) adapts to each volunteer's reputation."""
    if options.replicas is not None:
        return options.replicas, False
    k = config.get("replicas")
    if k is None:
        k = 2 if session.untrusted else 1
    return int(k), session.untrusted


def _execute(session: Session, spec: dict[str, Any], args: dict[str, Any], prep: Prepared,
             progress: Progress) -> dict[str, Any]:
    """Run the cell once, or replicated on distinct volunteers until a tolerant majority agrees."""
    __tracebackhide__ = True
    import random

    from depin_jupyter.kernel import replication

    k, adaptive = _replicas(session, prep.options)
    if k <= 1:
        return _submit_and_wait(session, spec, args, prep.placement, progress)
    rtol = float(config.get("rtol", prep.options.rtol))
    atol = float(config.get("atol", prep.options.atol))
    candidates = prep.candidates or [w.address for w in session.workers()]
    names = replication.identities(session, candidates)
    reputations: dict[str, Any] = {}
    if adaptive:
        try:
            reputations = Coordinator.of_client(session.client).reputation()
        except Exception:  # noqa: BLE001 - no reputation service: replicate every run
            adaptive = False
    distinct = len(set(names.values()))
    if adaptive and distinct < k:  # the default on a volunteer network degrades; an explicit --replicas does not
        if not getattr(session, "few_volunteers_said", False):
            print(f"depin: only {distinct} volunteer(s) can run this cell: results are not replicated "
                  f"(depin.replicas wants {k}).", file=sys.stderr)
            session.few_volunteers_said = True
        k = distinct
    if k <= 1:
        return _submit_and_wait(session, spec, args, prep.placement, progress)
    plan = replication.plan(candidates, names, k, adaptive, reputations, int(config.get("trust-streak")),
                            random.Random())
    if not plan.replicated:  # a trusted volunteer, not spot-checked this time: Dask places and re-runs it
        return _submit_and_wait(session, spec, args, prep.placement, progress)
    futures: list[Any] = []
    base = {k2: v for k2, v in prep.placement.items() if k2 not in ("workers", "allow_other_workers")}

    inputs_lost: list[str] = []

    def run_one(worker: str, primary: bool) -> dict[str, Any]:
        rspec = spec if primary else {**spec, "run_id": f"{spec['run_id']}-{names[worker]}"}
        try:
            return _submit_and_wait(session, rspec, args, {**base, "workers": [worker], "allow_other_workers": False},
                                    progress if primary else Progress(), echo=primary, on_submit=futures.append)
        except _InputsLost as e:
            inputs_lost.append(str(e))
            raise

    record: dict[str, Any] | None = None
    try:
        result, record = replication.run(run_one, plan, candidates, names, k, int(config.get("replicas-max")),
                                         rtol, atol)
    except DepinError:
        if inputs_lost:  # not the volunteers' fault: run the whole replicated cell again, inputs inline
            raise _InputsLost(inputs_lost[0]) from None
        raise
    except KeyboardInterrupt:
        for f in futures:
            _cancel(session.client, f, spec["run_id"], timed_out=False)
        raise
    finally:
        _report_verdicts(session, record, futures)
    result["replication"] = record
    return result


def _report_verdicts(session: Session, record: dict[str, Any] | None, futures: list[Any]) -> None:
    """Tell the coordinator which replicas were valid: it keeps reputations and withholds invalid credit."""
    if not record or not record.get("replicated") or not session.untrusted:
        return
    keys = {}
    for f in futures:
        w = getattr(f, "depin_worker", None)
        if w is not None:
            keys[w] = f.key
    verdicts = [{"address": r["worker"], "key": keys.get(r["worker"]), "valid": r["verdict"] == "valid"}
                for r in record["replicas"] if r["verdict"] is not None]
    try:
        Coordinator.of_client(session.client).report_verdicts(verdicts)
    except Exception as e:  # noqa: BLE001 - the run itself is fine; reputation is best effort
        print(f"depin: could not report replica verdicts to the coordinator ({e})", file=sys.stderr)


def _submit_and_wait(session: Session, spec: dict[str, Any], args: dict[str, Any],
                     placement: dict[str, Any], progress: Progress, echo: bool = True,
                     on_submit: Any = None) -> dict[str, Any]:
    """Submit the run, echo its live output, and return its result dict (or raise a DepinError).

    ``echo=False`` (extra replicas) drains the run's output without showing it; ``on_submit(future)``
    sees the task's future (to cancel replicas together).
    """
    __tracebackhide__ = True
    from distributed import KilledWorker
    from distributed.client import FutureCancelledError

    client = session.client
    run_id = spec["run_id"]
    q = session.streams.open(run_id)
    key = f"depin-run-{run_id}-{uuid.uuid4().hex[:6]}"
    relayed = session.untrusted and not config.get("volunteer.allow-pickle")
    func = run_cell_relayed if relayed else remote_run_cell
    with warnings.catch_warnings():  # inputs ride inside the task on volunteer networks, by design
        warnings.filterwarnings("ignore", message=".*Large object.*")
        warnings.filterwarnings("ignore", message=".*Sending large graph.*")
        future = client.submit(func, spec, args, key=key, pure=False, **placement)
    if on_submit is not None:
        future.depin_worker = (placement.get("workers") or [None])[0]
        on_submit(future)
    pinned = placement["workers"][0] if placement.get("workers") and not placement.get("allow_other_workers", True) \
        and len(placement["workers"]) == 1 and on_submit is not None else None
    gone_since: float | None = None
    registered = False  # a run is listed on the scheduler (`depin jobs`) only once it lasts a while
    submitted = time.monotonic()
    future.add_done_callback(lambda _: q.put(_DONE))  # wakes the loop below the moment it finishes
    limits = [x for x in (spec["timeout"], spec.get("max_runtime")) if x]
    timeout = min(limits) if limits else None
    # The worker stops the cell at the limit, or restarts itself cancel-grace later if the cell is stuck:
    # the notebook waits for either, and gives up on its own only well after that.
    grace = config.seconds("cancel-grace") + _CANCEL_GRACE_S
    deadline = None if timeout is None else time.monotonic() + timeout + grace
    seen = 0
    started: dict[str, Any] = {}
    shown: list[dict[str, Any]] = []  # what the cell printed and displayed, kept for a cache hit's replay
    try:
        while True:
            # Short waits keep Ctrl-C responsive; the done-callback ends the wait without delay.
            wait = 0.5 if registered else _REGISTER_AFTER_S
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            try:
                msg = q.get(timeout=wait)
            except queue.Empty:
                msg = None
            if not registered and time.monotonic() - submitted >= _REGISTER_AFTER_S:
                register_job(client, run_id, key, spec["name"])
                registered = True
            if msg is None:
                if pinned and pinned not in {w.address for w in session.workers(max_age=1.0)}:
                    # Dask would wait forever for a pinned worker that left: this replica has no vote.
                    # (Asked twice, 2 s apart and uncached: a busy scheduler's answer can lag.)
                    gone_since = gone_since or time.monotonic()
                    if time.monotonic() - gone_since >= 2.0 and \
                            pinned not in {w.address for w in session.workers(max_age=0)}:
                        _cancel(client, future, run_id, timed_out=False)
                        raise WorkerLostError(f"worker {pinned} left before its replica finished")
                else:
                    gone_since = None
                if deadline is None or time.monotonic() < deadline:
                    continue
                _cancel(client, future, run_id, timed_out=True)
                raise CellTimeoutError(
                    f"the cell ran past its time limit ({timeout:g}s) and was cancelled, but its worker did not "
                    f"confirm that it stopped (a worker without a nanny cannot be restarted, and a C call "
                    f"there may finish in the background). Raise --timeout or split the work."
                ) from None
            if msg is _DONE:
                break
            seen += 1
            if msg.get("kind") == "start":
                started = msg
                progress.update("running", f"on {msg.get('name') or msg.get('worker')} ({msg.get('worker')})")
            else:
                if echo:
                    emit(msg)
                shown.append(msg)
        try:
            if relayed and future.status == "finished":
                result = _relayed_result(client, key)
                err = result.get("error") or {}
                if result.get("status") == "error" and err.get("type") == "InputMissingError":
                    raise _InputsLost(err.get("message"))  # the run loop sends the inputs again, inline
            else:
                result = future.result()
        except KilledWorker as e:
            last = getattr(e, "last_worker", None)  # the scheduler's record: address and pid
            where = getattr(last, "address", None) or started.get("worker")
            pid = getattr(last, "pid", None) or started.get("pid")
            death = _why_worker_died(client, where, pid, logs=not session.untrusted)
            if death.cause == "stuck" and timeout is not None:
                raise CellTimeoutError(f"the cell ran past its time limit ({timeout:g}s): {death.message}") from None
            raise _WorkerDied(death) from None
        except FutureCancelledError as e:
            if "lost dependencies" in str(e):
                raise _InputsLost() from None
            raise RemoteExecutionError(f"the cell was cancelled on the cluster ({e}).") from None
        except _InputsLost:
            raise
        except Exception as e:  # noqa: BLE001 - transport failures surface with their cause
            raise RemoteExecutionError(
                f"the cell could not complete on the cluster: {type(e).__name__}: {e}") from None
        # Output events travel separately from the result: wait for every one the worker sent.
        drain_until = time.monotonic() + config.seconds("stream.drain-timeout")
        while seen < result.get("stream_count", 0) and time.monotonic() < drain_until:
            try:
                msg = q.get(timeout=max(0.0, drain_until - time.monotonic()))
                seen += 1
                if msg.get("kind") != "start":
                    if echo:
                        emit(msg)
                    shown.append(msg)
            except queue.Empty:
                break
        if seen < result.get("stream_count", 0):
            print(f"depin: {result['stream_count'] - seen} output message(s) of the cell did not arrive.",
                  file=sys.stderr)
        result["shown"] = shown
        return result
    except KeyboardInterrupt:
        _cancel(client, future, run_id, timed_out=False)
        raise
    finally:
        session.streams.close(run_id)
        future.release()


def _relayed_result(client: Any, key: str) -> dict[str, Any]:
    """A volunteer cell's result, from the coordinator's relay, decoded without unpickling."""
    from depin_jupyter.protocol import safe_codec
    from depin_jupyter.protocol.payloads import from_payload
    from depin_jupyter.protocol.rpc import Coordinator

    payload = Coordinator.of_client(client).relay_get(key)
    if payload is None:
        raise RemoteExecutionError("the cell finished on a volunteer but the coordinator holds no result for "
                                   "it (the coordinator may have restarted); run the cell again.")
    try:
        return from_payload(payload, max_bytes=config.nbytes("coordinator.relay-max-bytes"))
    except safe_codec.DecodeError as e:
        raise RemoteExecutionError(f"the volunteer's result was refused: {e}. Nothing from it was unpickled; "
                                   f"run the cell again (--worker to pick another volunteer).") from None


def _why_worker_died(client: Any, worker: str | None, pid: int | None, logs: bool = True) -> Death:
    """Ask the cluster why a worker died: memory events on the scheduler, the nanny's exit log line.

    ``logs=False`` on volunteer networks: asking nannies for their logs would dial the volunteers.
    """
    deadline = time.monotonic() + 5.0  # the nanny logs the exit once it notices it; its new worker re-registers
    death = explain_death(worker, pid, [], [])
    while True:
        try:
            events = [e for _, e in client.get_events("worker-restart-memory")]
            got = client.get_worker_logs(nanny=True) if logs else {}
            lines = [msg for entries in got.values() for _, msg in entries]
        except Exception:  # noqa: BLE001 - evidence is best effort
            events, lines = [], []
        death = explain_death(worker, pid, lines, events)
        if death.cause != "lost" or pid is None or time.monotonic() > deadline:
            return death
        time.sleep(0.2)


def _cancel(client: Any, future: Any, run_id: str, timed_out: bool) -> None:
    """Cancel the run's task; the worker's CancelOnRelease plugin then stops the cell's thread."""
    try:
        future.cancel(reason="timed out" if timed_out else "interrupted")
    except Exception:  # noqa: BLE001 - the scheduler may be gone too; nothing more to do here
        pass


def _builtin_exception(err: dict[str, Any]) -> BaseException | None:
    """A built-in exception rebuilt from its name and message (no unpickling), so `except` clauses work."""
    import builtins

    cls = getattr(builtins, str(err.get("type")), None) if err.get("module") == "builtins" else None
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(err.get("message", ""))
        except Exception:  # noqa: BLE001 - some take other arguments: fall back to the text error
            return None
    return None


def _raise_remote(result: dict[str, Any], spec: dict[str, Any]) -> None:
    __tracebackhide__ = True
    err = result["error"]
    where = result.get("worker") or "the worker"
    if result["status"] == "cancelled":
        if err.get("timed_out"):
            flag = err.get("limit", "timeout")
            limit = spec["max_runtime"] if flag == "max-runtime" else spec["timeout"]
            raise CellTimeoutError(f"the cell ran past --{flag} {limit:g}s on {where} and was "
                                   f"cancelled there. Raise --{flag} or make the cell faster.")
        raise RemoteExecutionError(f"the cell was cancelled on {where}.")
    exc = err.get("exception")
    if not isinstance(exc, BaseException):  # it came as text (a volunteer, or it would not pickle)
        exc = _builtin_exception(err) or RemoteCellError(err["type"], err["message"])
    exc.add_note(f"--- remote traceback (%%depin, worker {where}) ---\n{err['traceback'].rstrip()}")
    gpu = (result.get("hardware") or {}).get("gpu")
    hint = explain_exception(err["type"], err["module"], err["message"], result.get("worker"), gpu)
    if hint:
        exc.add_note(hint)
    raise exc

