"""What runs on the worker: execute a cell with its inputs, capture what it bound, changed and raised.

Runs inside a Dask worker thread, or in a sandboxed child process (`worker.sandbox`). Output is routed
live by `worker.output`; a cell can be stopped from outside by `worker.cancel` (timeout, cancel).
"""

from __future__ import annotations

import ast
import builtins
import importlib
import linecache
import logging
import os
import threading
import time
import traceback
import types
from dataclasses import dataclass, field
from typing import Any

from depin_jupyter.protocol.constants import MODULES_ARG
from depin_jupyter.protocol.records import RunResult, RunSpec
from depin_jupyter.protocol.values import RichValue, box, rebind_globals, unbox
from depin_jupyter.protocol.views import InputView, rebuild
from depin_jupyter.worker import sharing
from depin_jupyter.worker.cancel import CellCancelled, CellMaxRuntime, CellTimedOut, cancel_run
from depin_jupyter.worker.modules import use_local_modules
from depin_jupyter.worker.mutation import changed, fingerprint
from depin_jupyter.worker.output import RunOutput, fallback_display, format_mime, install, show_figures
from depin_jupyter.worker.runs import ActiveRun, active, set_current
from depin_jupyter.worker.sharing import Parts

__all__ = ["cell_builtins", "hardware", "run_cell"]


@dataclass
class _Namespace:
    """A cell's namespace as it starts: what it was seeded with, and what to compare with afterwards."""

    ns: dict[str, Any]
    seeded: dict[str, Any]               # every name the cell starts with (anything still bound to it is no output)
    before: dict[str, Any]               # fingerprints of the inputs the cell may change in place
    input_objects: dict[int, str]        # id of an input object -> its name (aliases made in the cell)
    opened: list[str] = field(default_factory=list)  # files the cell reads with open()
    parts: Parts | None = None           # what aliases may hold inside the inputs (trusted clusters only)


def _current_worker(worker: Any) -> tuple[Any, str | None]:
    """(worker, address): the stand-in given, else the Dask worker this runs on, else (None, None)."""
    if worker is not None:
        return worker, worker.address
    try:
        from distributed import get_worker

        w = get_worker()
        return w, w.address
    except ValueError:  # not on a worker (direct call in tests)
        return None, None


def _namespace(spec: RunSpec, inputs: dict[str, Any], sandboxed: bool = False) -> _Namespace:
    """The namespace the cell runs in: its modules, its inputs, the globals its notebook functions use."""
    opened: list[str] = []
    ns: dict[str, Any] = {"__name__": "__main__", "__builtins__": cell_builtins(opened)}
    local = spec.get("local_modules")
    if local:
        use_local_modules(local["key"], local["names"], inputs.pop(MODULES_ARG))
    for name, modname in spec["modules"].items():
        ns[name] = importlib.import_module(modname)
    for value in inputs.values():
        # A notebook function brings the globals it uses (as cloudpickle captured them) along.
        if isinstance(value, types.FunctionType) and value.__module__ == "__main__":
            for gname, gvalue in value.__globals__.items():
                if not (gname.startswith("__") and gname.endswith("__")):
                    ns.setdefault(gname, gvalue)
    inputs = {name: unbox(value) for name, value in inputs.items()}
    for name, value in inputs.items():  # views of other inputs, as in the notebook: rebuilt on this copy
        if isinstance(value, InputView):
            inputs[name] = rebuild(inputs.get(value.record["of"]), value.record)
            if inputs[name] is None:
                raise ValueError(f"input {name!r} could not be rebuilt as a view of {value.record['of']!r}")
    for name, value in inputs.items():
        ns[name] = rebind_globals(value, ns)
    seeded = {n: v for n, v in ns.items() if n not in ("__name__", "__builtins__")}
    before = {n: fingerprint(seeded[n]) for n in spec["maybe_mutated"] if n in inputs}
    input_objects = {id(v): n for n, v in seeded.items()
                     if n in inputs and not isinstance(v, (int, float, str, bool, type(None)))}
    # On a volunteer the results go back as plain data only: views and shared sub-objects are not described.
    parts = None if sandboxed else Parts({n: ns[n] for n in inputs})
    return _Namespace(ns, seeded, before, input_objects, opened, parts)


def _start_timers(spec: RunSpec, run_id: str) -> list[threading.Timer]:
    """--timeout and --max-runtime: each cancels the run when it expires."""
    timers = []
    for limit, exc_type in ((spec.get("timeout"), CellTimedOut), (spec.get("max_runtime"), CellMaxRuntime)):
        if limit:
            timer = threading.Timer(limit, cancel_run, args=(run_id,), kwargs={"exc_type": exc_type})
            timer.daemon = True
            timer.start()
            timers.append(timer)
    return timers


def _execute(spec: RunSpec, cell: _Namespace, out: RunOutput, result: RunResult, sandboxed: bool) -> None:
    """Run the cell's code (its last expression evaluated apart) and show its open figures."""
    code, filename = spec["code"], spec["filename"]
    tree = ast.parse(code, filename=filename)
    body = tree.body
    value_node = body.pop() if spec.get("last_expr") else None
    exec(compile(ast.Module(body=body, type_ignores=[]), filename, "exec"), cell.ns)  # noqa: S102 - the cell
    if value_node is not None:
        assert isinstance(value_node, ast.Expr)
        value = eval(compile(ast.Expression(value_node.value), filename, "eval"), cell.ns)  # noqa: S307
        if value is not None:
            result["value"] = _shippable_value(value, sandboxed)
    show_figures(out)


def _error(exc: BaseException, filename: str, sandboxed: bool) -> dict[str, Any]:
    """The cell's exception as the result carries it: text always, the object itself where it can travel."""
    return {
        "type": type(exc).__name__,
        "module": type(exc).__module__,
        "message": str(exc),
        "traceback": _clean_traceback(exc, filename),
        "exception": None if isinstance(exc, CellCancelled) else _portable_exception(exc, sandboxed),
        "timed_out": isinstance(exc, CellTimedOut),
        "limit": "max-runtime" if isinstance(exc, CellMaxRuntime) else "timeout",
    }


def run_cell(spec: RunSpec, inputs: dict[str, Any], *, worker: Any = None, sandboxed: bool = False) -> RunResult:
    """Execute a cell's code with ``inputs`` and return what it bound, changed and printed.

    ``worker``: stands in for the Dask worker (``log_event``, ``address``, ``name``, ``get_current_task``),
    e.g. in a sandboxed child process; by default the worker this runs on, if any. ``sandboxed``: results
    travel by `safe_codec` only (which names what it cannot encode), so Dask's serializers are not asked
    and the cell's exception travels as text.
    """
    t0 = time.time()
    worker, worker_addr = _current_worker(worker)
    install(cluster_scheduler=not sandboxed)
    run_id, filename, code = spec["run_id"], spec["filename"], spec["code"]
    out = RunOutput(run_id, worker, spec.get("flush_interval") or 0.05)
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    cell = _namespace(spec, inputs, sandboxed)
    result: RunResult = {"status": "ok", "worker": worker_addr, "run_id": run_id,
                         "worker_name": None if worker is None else str(worker.name), "hardware": hardware()}
    key = worker.get_current_task() if worker is not None else None
    set_current(out)
    active.add(run_id, ActiveRun(out, threading.get_ident(), worker), key)
    timers = _start_timers(spec, run_id)
    meter, used = _energy_meter(result, worker)
    t1 = time.time()
    out.start(worker_addr, getattr(worker, "name", None))
    try:
        try:
            _execute(spec, cell, out, result, sandboxed)
        finally:
            for timer in timers:
                timer.cancel()
            active.remove(run_id, key)
    except BaseException as exc:  # noqa: BLE001 - the cell's own exception travels back
        result["status"] = "cancelled" if isinstance(exc, CellCancelled) else "error"
        result["error"] = _error(exc, filename, sandboxed)  # type: ignore[typeddict-item]
    finally:
        set_current(None)
        out.flush()
        _stop_meter(meter, used, result)
    t2 = time.time()
    _collect(result, cell, spec, sandboxed)
    result["timings"] = {"setup": t1 - t0, "run": t2 - t1, "collect": time.time() - t2}
    result["opened"] = cell.opened[:100]  # files read with open(): the notebook asks for --deps on them
    if spec.get("record"):
        _record_here(spec, result, {n: cell.ns[n] for n in result.get("views", {})})
    result["stream_count"] = out.seq
    return result


def _clean_traceback(exc: BaseException, filename: str) -> str:
    """The traceback from the cell's first frame on, with the cell's own line numbers and source."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb if tb is not None else exc.__traceback__))


def _portable_exception(exc: BaseException, sandboxed: bool) -> BaseException | None:
    """The exception itself, if it survives a pickle round trip (classes from the cell travel by value)."""
    if sandboxed:
        return None  # a sandboxed cell's errors travel as text only (`protocol.payloads.to_payload`)
    from distributed.protocol import pickle as dpickle

    try:
        clone = dpickle.loads(dpickle.dumps(exc))
        clone.__traceback__ = None
        return clone
    except Exception:  # noqa: BLE001 - it travels as text then
        return None


def _serializable(value: Any, sandboxed: bool) -> str | None:
    """None if ``value`` can travel back to the notebook, else the reason it cannot."""
    if sandboxed:
        return None  # safe_codec decides, and names what it cannot encode
    from distributed.protocol import serialize

    quiet = _ThisThread()
    logger = logging.getLogger("distributed.protocol.pickle")  # it logs every failure, with a traceback
    logger.addFilter(quiet)
    try:
        serialize(value, serializers=("cuda", "dask", "pickle"), on_error="raise")
        return None
    except Exception as e:  # noqa: BLE001 - any failure means it cannot travel
        return f"{type(e).__name__}: {e}"
    finally:
        logger.removeFilter(quiet)


class _ThisThread(logging.Filter):
    """Drops the records of the thread that made it (a check whose failure is an answer, not an error)."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread


def _energy_meter(result: RunResult, worker: Any) -> tuple[Any, dict[str, Any]]:
    """Start `energy.measure` for a cell (GPU power when this worker has a GPU); (None, {}) if it fails."""
    from depin_jupyter.worker import energy

    try:
        meter = energy.measure(gpu=bool((result.get("hardware") or {}).get("gpu")),
                               whole_process=bool(getattr(worker, "one_cell_process", False)))
        return meter, meter.__enter__()
    except Exception as e:  # noqa: BLE001 - a measurement never fails the cell
        result["energy"] = {"energy_j": "not measured", "reason": f"measurement failed: {e}"}
        return None, {}


def _stop_meter(meter: Any, used: dict[str, Any], result: RunResult) -> None:
    if meter is None:
        return
    try:
        meter.__exit__(None, None, None)
        result["energy"] = used
    except Exception as e:  # noqa: BLE001 - a measurement never fails the cell
        result["energy"] = {"energy_j": "not measured", "reason": f"measurement failed: {e}"}


def _record_here(spec: RunSpec, result: RunResult, views: dict[str, Any]) -> None:
    """Store the run from the worker (background runs: the results must not depend on the kernel)."""
    from distributed import rejoin, secede

    from depin_jupyter.store import open_store, persist

    rec = spec["record"]
    secede()  # dask-array outputs are computed by the cluster while this thread waits
    try:
        store = open_store(rec["url"], storage_options=rec["storage_options"])
        warning = persist.record(store, run_id=spec["run_id"], label=rec["label"], code=spec["code"],
                                 hashes=rec["hashes"], key=rec["key"], options=rec["options"], result=result,
                                 timings={"run_s": result["timings"]["run"]}, pool=rec.get("pool"),
                                 private=rec.get("private") or (), views=views)
    except Exception as e:  # noqa: BLE001 - reported to the notebook; the outputs still travel back
        warning = f"the worker could not store the run in {rec['url']}: {type(e).__name__}: {e}"
    finally:
        rejoin()
    if warning:
        result["record_warning"] = warning


_hardware_cache: dict[str, Any] | None = None


def hardware() -> dict[str, Any]:
    """What this worker runs on (host, CPU, memory, GPU), for the run's provenance; computed once."""
    global _hardware_cache
    if _hardware_cache is None:
        import platform
        import socket

        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
        except OSError:
            pass
        try:
            import psutil

            memory = int(psutil.virtual_memory().total)
        except Exception:  # noqa: BLE001
            memory = None
        from depin_jupyter.gpu import describe

        _hardware_cache = {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(),
                           "memory": memory, "gpu": describe(), "python": platform.python_version()}
    return _hardware_cache


def _auditing_open(opened: list[str]) -> Any:
    """`open` for the cell: records the files it reads, so the notebook can say which to declare."""
    real_open = builtins.open

    def open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, os.PathLike)) and not any(c in mode for c in "wax+"):
            path = os.path.abspath(os.fspath(file))
            if path not in opened:
                opened.append(path)
        return real_open(file, mode, *args, **kwargs)

    open.__doc__ = real_open.__doc__
    open.__module__, open.__qualname__ = "builtins", "open"
    return open


def cell_builtins(opened: list[str] | None = None) -> dict[str, Any]:
    """The builtins a cell sees: IPython's `display`, and an `open` that notes the files read (``opened``)."""
    b = dict(vars(builtins))
    if opened is not None:
        b["open"] = _auditing_open(opened)
    try:
        import IPython.display as ipd

        b["display"] = ipd.display
    except ImportError:
        b["display"] = fallback_display
    return b


def _shippable_value(value: Any, sandboxed: bool) -> Any:
    """The last expression's value itself when it can travel (the notebook formats it, with its own names),
    else its MIME bundle formatted here, with the traceback of any formatter that failed."""
    if _serializable(value, sandboxed) is None:
        return value
    errors: list[str] = []
    data, md = format_mime(value, errors)
    return RichValue(data, md, errors)


def _classify(name: str, value: Any, cell: _Namespace, into: dict[str, dict[str, Any]]) -> None:
    """Sort one name the cell holds: an input (changed in place or not), a module, an alias, or an output."""
    inputs = cell.seeded
    if name in inputs and value is inputs[name]:
        if name in cell.before and changed(cell.before[name], value):
            into["mutated"][name] = value
        return
    if isinstance(value, types.ModuleType):
        if inputs.get(name) is not value:
            into["modules"][name] = value.__name__
        return
    source = cell.input_objects.get(id(value))
    if source is not None and inputs.get(source) is value:
        into["aliases"][name] = source
        return
    into["outputs"][name] = value


def _shared(result: RunResult, into: dict[str, dict[str, Any]], parts: Parts) -> None:
    """Note what the results share with the inputs; views travel as their layout, not their values."""
    result["views"] = sharing.views(into["outputs"], parts)
    for name in result["views"]:
        del into["outputs"][name]
    result["parts"] = sharing.parts_of(into["outputs"], parts)
    result["kept"] = sharing.kept({**into["mutated"], **into["outputs"]}, parts)


def _collect(result: RunResult, cell: _Namespace, spec: RunSpec, sandboxed: bool) -> None:
    """Fill ``result`` with the names the cell bound, changed in place, aliased or deleted."""
    wanted = spec.get("outputs")
    into: dict[str, dict[str, Any]] = {"outputs": {}, "aliases": {}, "modules": {}, "mutated": {}}
    for name, value in cell.ns.items():
        if (name.startswith("__") and name.endswith("__")) or (wanted is not None and name not in wanted):
            continue
        _classify(name, value, cell, into)
    if cell.parts is not None:
        _shared(result, into, cell.parts)
    skipped: dict[str, str] = {}
    for group in (into["outputs"], into["mutated"]):
        for name in list(group):
            reason = _serializable(group[name], sandboxed)
            if reason is not None:
                skipped[name] = f"{type(group.pop(name)).__name__} ({reason})"
            else:
                group[name] = box(group[name])
    known = set(cell.seeded) | set(spec["modules"])
    result["deleted"] = [n for n in known if n not in cell.ns and (wanted is None or n in wanted)]
    result["outputs"], result["aliases"], result["modules"] = into["outputs"], into["aliases"], into["modules"]
    result["mutated"], result["skipped"] = into["mutated"], skipped
