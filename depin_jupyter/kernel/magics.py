"""`%%depin` and `%depin`: parse arguments (IPython `magic_arguments`), then call plain functions."""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from depin_jupyter import config
from depin_jupyter.errors import DepinUsageError, RemoteExecutionError
from depin_jupyter.protocol.rpc import Coordinator

__all__ = ["DepinMagics"]

_SUBCOMMANDS = ("connect", "status", "config", "close", "jobs", "cancel", "wait", "runs", "load", "reproduce",
                "private")

# Variables marked with `%depin private`: a cell reading one is sent only to a trusted pool.
_PRIVATE: set[str] = set()


def _names(value: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.replace(" ", ",").split(",") if n.strip())
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise UsageError(f"not a Python name: {', '.join(bad)} (give names separated by commas)")
    return names


def _positive(kind: type, what: str):  # type: ignore[no-untyped-def]
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise UsageError(f"{what} expects a number, got {text!r}") from None
        if value < 0:
            raise UsageError(f"{what} must not be negative, got {text!r}")
        return value
    return parse


def _map_spec(value: str) -> tuple[str, str]:
    if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":  # magic_arguments keeps the quotes
        value = value[1:-1]
    name, sep, expr = value.partition("=")
    if not sep or not name.strip().isidentifier() or not expr.strip():
        raise UsageError(f"--map expects NAME=ITEMS, e.g. --map seed=range(100) (got {value!r}; quote an "
                         f"expression with spaces: --map \"x=[1, 2, 3]\")")
    return name.strip(), expr.strip()


@magics_class
class DepinMagics(Magics):
    """Run cells on a Dask(-CUDA) cluster as if they ran locally."""

    @property
    def _shell(self) -> Any:
        """The shell these magics are registered with (always set once `%load_ext` ran)."""
        assert self.shell is not None
        return self.shell

    @magic_arguments()
    @argument("--gpu", nargs="?", const=1, default=None, type=_positive(int, "--gpu"), metavar="N",
              help="GPUs the cell needs (default 1 when given without N; config depin.gpus otherwise)")
    @argument("--cpu", action="store_true", help="the cell needs no GPU: run it on any worker")
    @argument("--timeout", type=_positive(float, "--timeout"), metavar="SEC",
              help="cancel the cell on the worker after SEC seconds (config depin.timeout)")
    @argument("--retries", type=_positive(int, "--retries"), metavar="N",
              help="re-run on another worker up to N times if the worker dies (config depin.retries)")
    @argument("--max-runtime", type=_positive(float, "--max-runtime"), metavar="SEC",
              help="cap the run's lifetime; enforced by the worker even if this kernel is gone "
                   "(config depin.max-runtime)")
    @argument("--gpu-mem", type=_positive(float, "--gpu-mem"), metavar="GiB",
              help="run only on workers whose GPU has at least this much memory (implies --gpu)")
    @argument("--gpu-arch", type=_positive(float, "--gpu-arch"), metavar="MIN",
              help="run only on GPUs of at least this compute capability, e.g. 8.0 (implies --gpu)")
    @argument("--name", metavar="LABEL", help="a label for this run (shown in errors and run ids)")
    @argument("--worker", metavar="NAME", help="run on this worker only (name or address; for debugging)")
    @argument("--store", metavar="URL", help="result store for this run (a path or fsspec URL; "
                                             "config depin.store.url, default ./depin-results.zarr)")
    @argument("--replicas", type=_positive(int, "--replicas"), metavar="K",
              help="run on K distinct volunteers; a majority that agrees (floats within --rtol/--atol) wins "
                   "(default: config depin.replicas: 1 trusted, 2 adaptive on a volunteer network)")
    @argument("--rtol", type=float, metavar="R", help="relative tolerance between replicas (default 1e-7)")
    @argument("--atol", type=float, metavar="A", help="absolute tolerance between replicas (default 0)")
    @argument("--no-store", action="store_true", help="do not store this run's results")
    @argument("--no-cache", action="store_true", help="run even if an identical run is stored")
    @argument("--deps", nargs="+", metavar="PATH",
              help="files (globs, directories) the cell reads: their content is part of the cache key")
    @argument("--background", action="store_true",
              help="return at once with a handle; outputs are bound before the next cell after the run "
                   "finishes, or by %%depin wait [NAME]")
    @argument("--map", type=_map_spec, metavar="NAME=ITEMS",
              help="run the cell once per item of ITEMS (a Python expression) with NAME bound to it, spread "
                   "over the pool in batches; each name the cell binds comes back as a list in item order")
    @argument("--inputs", type=_names, metavar="A,B", help="send exactly these names (overrides inference)")
    @argument("--outputs", type=_names, metavar="A,B",
              help="bring back exactly these names (overrides inference)")
    @argument("--pool", metavar="NAME",
              help="run only on workers of this pool, e.g. lab (config depin.pool; default: any worker)")
    @argument("--private", type=_names, metavar="A,B",
              help="these variables are private for this cell (like %%depin private): they are sent only to "
                   "a trusted pool (config depin.trusted-pools)")
    @cell_magic
    def depin(self, line: str, cell: str) -> Any:
        """Run this cell on the cluster: its inputs travel, its outputs, output and errors come back.

        Inputs are the names the cell reads before it binds them; outputs are the names it binds or
        changes in place. The first %%depin with no connection starts the embedded default cluster
        (LocalCUDACluster with GPUs, a CPU LocalCluster otherwise).
        """
        __tracebackhide__ = True
        args = parse_argstring(self.depin, line)
        if args.cpu and (args.gpu or args.gpu_mem or args.gpu_arch):
            raise UsageError("--cpu contradicts --gpu/--gpu-mem/--gpu-arch: give one of them")
        from depin_jupyter.kernel.cluster import current_session, get_session
        from depin_jupyter.kernel.runner import RunOptions, run_cell

        options = RunOptions(gpu=args.gpu, cpu=args.cpu, timeout=args.timeout, retries=args.retries,
                             name=args.name, worker=args.worker, inputs=args.inputs, outputs=args.outputs,
                             gpu_mem=args.gpu_mem, gpu_arch=args.gpu_arch, max_runtime=args.max_runtime,
                             store=args.store, no_store=args.no_store, no_cache=args.no_cache,
                             deps=tuple(args.deps) if args.deps else None, replicas=args.replicas,
                             rtol=args.rtol, atol=args.atol, pool=args.pool,
                             private=tuple(sorted(_PRIVATE | set(args.private or ()))))
        fresh = current_session() is None
        session = _usage(get_session)
        started = f"started {session.description}" if fresh else None
        if args.map is not None:
            return self._map_cell(args, cell, options, session, started)
        if args.background:
            from depin_jupyter.kernel import background

            if started:
                print(f"depin: {started}")
            return _usage(background.submit, session, cell, self._shell.user_ns, options, self._shell.user_ns_hidden)
        from depin_jupyter.kernel.widgets import make_progress

        progress = make_progress(options.name or "cell")
        if started:
            progress.note(started)  # information, not an error: stdout or the progress line, never stderr
        try:
            outcome = _usage(run_cell, session, cell, self._shell.user_ns, options, self._shell.user_ns_hidden,
                             progress)
        finally:
            progress.close()
        return outcome.value if outcome.has_value else None

    def _map_cell(self, args: Any, cell: str, options: Any, session: Any, started: str | None) -> None:
        """`%%depin --map NAME=ITEMS`: the body per item on the pool; each bound name comes back as a list."""
        from depin_jupyter.kernel.mapping import map_cell
        from depin_jupyter.kernel.widgets import make_progress

        var, expr = args.map
        if args.background or args.outputs is not None:
            raise UsageError("--map runs in the foreground and collects every name the cell binds: drop "
                             "--background/--outputs (depin_jupyter.map(..., wait=False) runs in the background)")
        try:
            items = list(self._shell.ev(expr))
        except Exception as e:  # noqa: BLE001 - the user's expression: say what it raised
            raise UsageError(f"--map {var}={expr}: could not evaluate {expr!r} to a list of items "
                             f"({type(e).__name__}: {e})") from None
        label = options.name or f"map {var}"
        progress = make_progress(label)
        if started:
            progress.note(started)
        try:
            handle, outs = _usage(map_cell, session, cell, var, items, self._shell.user_ns, name=label,
                                  retries=2 if args.retries is None else args.retries, options=options,
                                  progress=progress)
        finally:
            progress.close()
        got = [r if isinstance(r, dict) else {} for r in handle.results]
        outs = tuple(o for o in outs if any(o in r for r in got))  # not modules the body imported
        for out in outs:  # bound even when some items failed: the others are usable
            self._shell.user_ns[out] = [r.get(out) for r in got]
        stored = f"; stored as run {handle.run_id}" if handle.run_id else ""
        print(f"depin: {label}: {len(items)} item(s) in {handle.elapsed or 0:.1f} s on {len(handle.workers)} "
              f"worker(s); bound {', '.join(outs)} (lists, item order){stored}")
        if handle.errors:
            first = min(handle.errors)
            raise RemoteExecutionError(
                f"{label}: {len(handle.errors)} of {len(items)} item(s) failed after their retries, e.g. item "
                f"{first} ({items[first]!r}): {handle.errors[first]}. "
                + (f"Their entries in {', '.join(outs)} are None; the others are usable." if outs else
                   "No item succeeded, so nothing was bound."))

    @magic_arguments()
    @argument("command", choices=_SUBCOMMANDS, help="what to do")
    @argument("target", nargs="?", default=None,
              help="for connect: nothing or 'local' (embedded cluster), a scheduler address, or a "
                   "volunteer network's client token (or a file holding it); "
                   "for cancel and wait: a run id or --name label; for runs: a store URL; "
                   "for load: a run id")
    @argument("names", nargs="*", help="for load: the outputs to bind (default: all)")
    @argument("--store", metavar="URL", help="for load: the store (default: config depin.store.url)")
    @argument("--all", action="store_true", help="for cancel: every run in flight on the cluster")
    @argument("--mine", action="store_true", help="for cancel: every run this user started")
    @argument("--clear", action="store_true", help="for private: unmark every private variable")
    @line_magic("depin")  # type: ignore[arg-type]  # magic_arguments' decorators are untyped
    def depin_line(self, line: str) -> Any:
        """%depin connect [TARGET] | status | config | close | jobs | cancel RUN|--mine|--all | wait [NAME]
        | runs [STORE] | load RUN [NAME...] [--store URL] | reproduce NOTEBOOK --store STORE
        | private [NAME...] | private --clear."""
        __tracebackhide__ = True
        if not line.strip():
            raise UsageError(f"%depin needs a command: one of {', '.join(_SUBCOMMANDS)} (see %depin?)")
        args = parse_argstring(self.depin_line, line)
        from depin_jupyter.kernel import cluster

        if args.command == "connect":
            session = _usage(cluster.connect, args.target)
            print(f"depin: connected to {session.description} ({session.address})")
            return None
        if args.command == "cancel":
            return _cancel(args)
        if args.command == "wait":
            session = cluster.current_session()
            if session is None:
                raise UsageError("not connected: there is nothing to wait for")
            _usage(_wait, session, self._shell.user_ns, args.target)
            return None
        if args.command == "runs":
            from depin_jupyter.store import open_store

            store = _usage(open_store, args.target, create=False)
            print(f"depin: runs in {store.url}\n{format_runs(store.runs())}")
            return None
        if args.command == "load":
            return _load(self._shell.user_ns, args)
        if args.command == "private":
            return _private(args)
        if args.command == "reproduce":
            if not args.target or not args.store:
                raise UsageError("%depin reproduce NOTEBOOK --store STORE")
            from depin_jupyter.reproduce.rerun import reproduce

            return _usage(reproduce, args.target, args.store)  # shown as an HTML table
        if args.target is not None:
            raise UsageError(f"%depin {args.command} takes no argument (got {args.target!r})")
        if args.command == "jobs":
            from depin_jupyter.kernel.jobs import format_jobs, list_jobs

            session = cluster.current_session()
            print(format_jobs(list_jobs(session.client, session.untrusted)) if session else "depin: not connected")
            return None
        if args.command == "status":
            session = cluster.current_session()
            if session is None:
                failed = cluster.failed_connect()
                print(f"depin: not connected: `%depin connect {failed[0]}` failed ({failed[1].rstrip('.')}); "
                      f"connect again, or `%depin connect local` for the embedded cluster" if failed else
                      "depin: not connected (the next %%depin starts the embedded cluster, or use %depin connect)")
                return None
            print(format_status(session))
            return None
        if args.command == "config":
            print(config.as_yaml(), end="")
            return None
        if args.command == "close":
            print("depin: closed" if cluster.close_session() else "depin: nothing to close")
        return None


def bind_finished_runs(*_: Any) -> None:
    """IPython pre_run_cell hook: bind background runs that finished since the last cell."""
    from depin_jupyter.kernel import cluster

    session = cluster.current_session()
    if session is None or not session.background:
        return
    from IPython import get_ipython

    from depin_jupyter.kernel.background import bind_finished

    shell = get_ipython()
    if shell is not None:
        bind_finished(session, shell.user_ns)


def _load(namespace: dict[str, Any], args: Any) -> None:
    """`%depin load RUN [NAME...]`: bind a stored run's outputs, arrays lazily."""
    if not args.target:
        raise UsageError("%depin load needs a run id (see %depin runs)")
    from depin_jupyter.store import open_store

    store = _usage(open_store, args.store, create=False)
    run_id = args.target
    named = [r for r in store.runs() if r.name == run_id and r.complete]
    if named:  # a --name label: its newest complete run
        run_id = named[-1].run_id
    values = _usage(store.load, run_id, args.names or None)
    from depin_jupyter.store.persist import VALUE_NAME

    values.pop(VALUE_NAME, None)
    namespace.update(values)
    print(f"depin: bound {', '.join(values) or 'nothing'} from run {run_id} ({store.url})")


def _private(args: Any) -> None:
    """`%depin private NAME...` marks variables private; `--clear` unmarks all; alone it lists them."""
    names = [x for n in ([args.target] if args.target else []) + list(args.names) for x in _names(n)]
    if args.clear:
        if names:
            raise UsageError("%depin private --clear takes no names (it unmarks every variable)")
        _PRIVATE.clear()
        print("depin: no variable is private now")
        return
    _PRIVATE.update(names)
    trusted = ", ".join(str(p) for p in config.get("trusted-pools") or ()) or "none"
    print(f"depin: private: {', '.join(sorted(_PRIVATE)) or 'none'}; cells that read them run only with "
          f"--pool in a trusted pool (depin.trusted-pools: {trusted})")


def _cancel(args: Any) -> None:
    from depin_jupyter.kernel import cluster
    from depin_jupyter.kernel.jobs import cancel_jobs, list_jobs, owner

    if not (args.target or args.all or args.mine):
        raise UsageError("%depin cancel needs a run id or name, --mine or --all")
    session = cluster.current_session()
    if session is None:
        raise UsageError("not connected: nothing to cancel (%depin connect first)")
    live = list_jobs(session.client, session.untrusted)
    me = session.identity or owner()
    chosen = [j for j in live if args.all or (args.mine and j.owner == me) or j.matches(args.target)]
    if args.target and not chosen:
        raise UsageError(f"no run in flight is called {args.target!r} (see %depin jobs)")
    for j in cancel_jobs(session.client, chosen, session.untrusted):
        print(f"depin: cancelled {j.run_id} ({j.name}, {j.owner}, {j.age:.0f}s old)")
    if not chosen:
        print("depin: nothing to cancel")


def _wait(session: Any, namespace: dict[str, Any], target: str | None) -> None:
    """`%depin wait [NAME]`: bind a background run; on a volunteer network NAME may also be a map an earlier
    kernel of this identity left there (bound to NAME as its handle: ``NAME.results``, ``NAME.errors``)."""
    from depin_jupyter.kernel import background, mapping

    try:
        background.wait(session, namespace, target)
    except DepinUsageError as no_run:
        if not (target and target.isidentifier() and session.untrusted):
            raise
        try:
            handle = mapping.attach(session, target)
        except DepinUsageError:
            raise DepinUsageError(f"{no_run}; nor is there a map of that name") from None
        namespace[target] = handle
        print(f"depin: map {target!r} attached ({handle.status()}); bound {target} ({target}.results, "
              f"{target}.errors)")


def _usage(func: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``func``, turning DepinUsageError into IPython's UsageError (shown without a traceback)."""
    __tracebackhide__ = True
    try:
        return func(*args, **kwargs)
    except DepinUsageError as e:
        raise UsageError(str(e)) from None


def format_status(session: Any) -> str:
    """`%depin status`: one line per worker with GPU model and memory."""
    rows: list[tuple[Any, ...]] = [("worker", "address", "threads", "memory", "GPU", "GPU memory", "executing")]
    volunteers = bool(getattr(session, "untrusted", False))
    trust = _trust(session) if volunteers else {}  # a volunteer network: who is behind each worker, how trusted
    if volunteers:
        rows[0] += ("volunteer", "trust", "GPU-s", "energy")
    workers = session.workers(max_age=0, live=True)  # executing now: every worker's whole record
    pools = any(w.pools for w in workers)
    if pools:
        rows[0] += ("pool",)
    for w in workers:
        row: tuple[Any, ...] = (w.name, w.address, str(w.nthreads), _gib(w.memory_limit),
               f"{w.gpus}x {w.gpu_model}" if w.gpus else "-",
               _gib(w.gpu_memory) if w.gpu_memory else "-", str(w.executing))
        if volunteers:
            row += trust.get(w.address) or (w.name, "?", "-", "-")
        if pools:
            row += (",".join(w.pools) or "-",)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"depin: {session.description} at {session.address}"]
    lines += ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)) for r in rows]
    if _PRIVATE:
        lines.append(f"private variables: {', '.join(sorted(_PRIVATE))} (sent only with --pool in "
                     f"{', '.join(str(p) for p in config.get('trusted-pools') or ()) or 'no trusted pool'})")
    last = session.last_energy
    if last:
        from depin_jupyter.reports import energy_summary as summary

        lines.append(f"last run {last[0]}: energy {summary(last[1])}")
    if volunteers:  # an educator's token also sees the lab: every student's use and quota
        try:
            from depin_jupyter.reports import format_lab_status

            lab = Coordinator.of_client(session.client).lab_status()
            if "students" in lab:
                lines += ["", format_lab_status(lab)]
        except Exception:  # noqa: BLE001, S110 - not an educator, or not a depin coordinator
            pass
    return "\n".join(lines)


def _trust(session: Any) -> dict[str, Any]:
    """Worker address -> (volunteer, trust, GPU-seconds, energy) from the coordinator's identities and ledgers."""
    from depin_jupyter import config
    from depin_jupyter.reports import energy_ledger_text as ledger_text

    try:
        names = Coordinator.of_client(session.client).identities()
        reps = Coordinator.of_client(session.client).reputation()
    except Exception:  # noqa: BLE001 - not a depin coordinator
        return {}
    try:
        credits = Coordinator.of_client(session.client).credits()
    except Exception:  # noqa: BLE001 - an older coordinator: trust without the ledger
        credits = {}
    streak_needed = int(config.get("trust-streak"))
    out: dict[str, Any] = {}
    for address, name in names.items():
        r = reps.get(name) or {}
        if not r.get("checked"):
            state = "new (always replicated)"
        else:
            mode = "trusted (spot-checked)" if r.get("streak", 0) >= streak_needed else "replicated"
            state = f"{mode}, streak {r.get('streak', 0)}, {r.get('valid', 0)}/{r.get('checked', 0)} valid"
        c = credits.get(name) or {}
        gpu_s = f"{float(c['gpu_seconds']):.1f}" if c.get("gpu_seconds") else "-"
        out[address] = (name, state, gpu_s, ledger_text(c) if c else "-")
    return out


def format_runs(summaries: Any) -> str:
    """`%depin runs`: one line per stored run."""
    rows = [("run", "name", "status", "complete", "outputs")]
    rows += [(r.run_id, r.name or "-", r.status, "yes" if r.complete else "no", ",".join(r.outputs) or "-")
             for r in summaries]
    if len(rows) == 1:
        return "(no runs)"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows)


def _gib(n: int | None) -> str:
    return f"{n / 2**30:.1f} GiB" if n else "-"
