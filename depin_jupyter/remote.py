"""What runs on the worker: execute a cell, stream its output live, capture results and errors.

Runs inside a Dask worker thread. stdout/stderr, `display()` and matplotlib figures of the thread
running a cell are routed to the notebook through Dask's event stream (`Worker.log_event`, topic
``STREAM_TOPIC``); other threads' output is left alone. A cell can be stopped from outside
(timeout, cancel) by raising an exception in its thread between two Python bytecodes.
"""

from __future__ import annotations

import ast
import base64
import builtins
import ctypes
import importlib
import io
import linecache
import os
import pickle
import sys
import threading
import time
import traceback
import types
from typing import Any


__all__ = ["STREAM_TOPIC", "CellCancelled", "CellTimedOut", "run_cell", "cancel_run", "content_hash", "box", "unbox",
           "rebind_globals"]

STREAM_TOPIC = "depin-stream"
ANNOUNCE_AFTER_S = 0.1  # a run still going after this long tells the notebook where it runs
_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), frozenset, range, types.ModuleType,
              types.FunctionType, type)


class CellCancelled(BaseException):
    """Raised inside a cell's thread when its run is cancelled (BaseException: `except Exception` can't swallow it)."""


class CellTimedOut(CellCancelled):
    """Raised inside a cell's thread when it runs past its timeout."""


class CellMaxRuntime(CellTimedOut):
    """Raised inside a cell's thread when the run passes its --max-runtime (kernel present or not)."""


# ---------------------------------------------------------------- values that need care on the wire

class Boxed:
    """Carries a value by pickle, bypassing Dask's array serializer, which drops ndarray subclasses."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        return (Boxed, (self.value,))


def box(value: Any) -> Any:
    """Box ndarray subclasses (recarray, matrix, masked arrays) so they keep their type in transit."""
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.ndarray) and type(value) is not np.ndarray:
        return Boxed(value)
    return value


def unbox(value: Any) -> Any:
    return value.value if isinstance(value, Boxed) else value


# ---------------------------------------------------------------- content hashes

def content_hash(obj: Any) -> str:
    """A content hash for shipping and change detection: xxh3 over array bytes, dask's tokenize otherwise.

    Non-deterministic objects (no stable token) get a fresh random hash, so they are always re-sent.
    """
    import numpy as np

    if type(obj) is np.ndarray or isinstance(obj, np.ndarray):
        import xxhash

        arr = obj if obj.flags.c_contiguous else np.ascontiguousarray(obj)
        h = xxhash.xxh3_128()
        h.update(repr((type(obj).__name__, obj.dtype.str, obj.dtype.descr, obj.shape)).encode())
        if arr.dtype.hasobject:
            h.update(pickle.dumps(arr, protocol=5))
        else:
            _hash_buffer(h, memoryview(arr.reshape(-1).view(np.uint8)))
        return "xxh3-" + h.hexdigest()
    from dask.base import tokenize

    return "tok-" + tokenize(obj)


_PARALLEL_HASH_BYTES = 16 * 2**20
_hash_pool = None


def _hash_buffer(h: Any, buf: memoryview) -> None:
    """Feed ``buf`` to ``h``; large buffers are hashed in parallel pieces (xxhash releases the GIL)."""
    global _hash_pool
    import os

    workers = min(8, os.cpu_count() or 1)
    if buf.nbytes < _PARALLEL_HASH_BYTES or workers == 1:
        h.update(buf)
        return
    import xxhash
    from concurrent.futures import ThreadPoolExecutor

    if _hash_pool is None:
        _hash_pool = ThreadPoolExecutor(workers, thread_name_prefix="depin-hash")
    step = -(-buf.nbytes // workers)
    pieces = [buf[i:i + step] for i in range(0, buf.nbytes, step)]
    for digest in _hash_pool.map(xxhash.xxh3_128_digest, pieces):
        h.update(digest)


def _fingerprint(obj: Any) -> Any:
    """A cheap before/after marker of an object's content, or None for objects that cannot change."""
    if isinstance(obj, _IMMUTABLE):
        return None
    mod = type(obj).__module__
    if mod.startswith("cupy"):
        return ("device-copy", obj.copy())  # compared on the device; never copied to host
    try:
        if mod.startswith("numpy"):
            return content_hash(obj)
        return pickle.dumps(obj, protocol=5)
    except Exception:
        return ("unknown", object())  # never equal: treat as changed


def _changed(before: Any, after_obj: Any) -> bool:
    if before is None:
        return False
    if isinstance(before, tuple) and before and before[0] == "device-copy":
        import cupy

        old = before[1]
        return old.shape != after_obj.shape or not bool(cupy.array_equal(old, after_obj, equal_nan=True))
    return _fingerprint(after_obj) != before


# ---------------------------------------------------------------- live output

class _RunContext:
    """Buffers one run's output and publishes it, in order, as numbered stream events."""

    def __init__(self, run_id: str, worker: Any, flush_interval: float) -> None:
        self.run_id = run_id
        self.worker = worker
        self.flush_interval = flush_interval
        self.seq = 0
        self._buf: list[tuple[str, str]] = []
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()

    def _publish(self, msg: dict[str, Any]) -> None:
        msg["run"] = self.run_id
        msg["seq"] = self.seq
        self.seq += 1
        if self.worker is not None:
            self.worker.log_event(STREAM_TOPIC, msg)

    def start(self, address: str | None, name: Any) -> None:
        """Note where the cell runs; the notebook hears of it only if the run lasts (see `announce`)."""
        self._start = {"kind": "start", "worker": address, "name": None if name is None else str(name),
                       "pid": os.getpid()}
        self._started_at = time.monotonic()

    def announce(self, after: float = ANNOUNCE_AFTER_S) -> None:
        """Tell the notebook the cell is running, and where, once it has run ``after`` seconds: quick
        cells send no event at all (every message costs the scheduler and the kernel some time)."""
        with self._lock:
            start = getattr(self, "_start", None)
            if start is not None and time.monotonic() - self._started_at >= after:
                self._start = None
                self._publish(start)

    def write(self, kind: str, text: str) -> None:
        self.announce(after=0.0)  # output shows the cell is running: say where first
        with self._lock:
            if self._buf and self._buf[-1][0] == kind:
                self._buf[-1] = (kind, self._buf[-1][1] + text)
            else:
                self._buf.append((kind, text))
            due = time.monotonic() - self._last_flush >= self.flush_interval
            if due and "\n" in text:
                self._flush_locked()

    def _flush_locked(self) -> None:
        for kind, text in self._buf:
            self._publish({"kind": kind, "text": text})
        self._buf.clear()
        self._last_flush = time.monotonic()

    def flush(self, stale_only: bool = False) -> None:
        with self._lock:
            if self._buf and (not stale_only or time.monotonic() - self._last_flush >= self.flush_interval):
                self._flush_locked()

    def display(self, data: dict[str, Any], metadata: dict[str, Any]) -> None:
        self.announce(after=0.0)
        with self._lock:
            self._flush_locked()
            self._publish({"kind": "display", "data": data, "metadata": metadata})


_local = threading.local()
_active: dict[str, tuple[_RunContext, int]] = {}
_active_lock = threading.Lock()
_installed = False


def _current() -> _RunContext | None:
    return getattr(_local, "run", None)


class _Router(io.TextIOBase):
    """Replaces sys.stdout/err: a cell thread's writes go to its run, others to the original stream."""

    def __init__(self, kind: str, original: Any) -> None:
        self.kind = kind
        self.original = original

    def write(self, s: str) -> int:
        ctx = _current()
        if ctx is None:
            return self.original.write(s)
        ctx.write(self.kind, s)
        return len(s)

    def flush(self) -> None:
        ctx = _current()
        if ctx is None:
            self.original.flush()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def fileno(self) -> int:
        return self.original.fileno()


def _display_hook(original: Any) -> Any:
    def display(*objs: Any, **kwargs: Any) -> Any:
        ctx = _current()
        if ctx is None:
            return original(*objs, **kwargs)
        for obj in objs:
            if kwargs.get("raw"):
                ctx.display(dict(obj), {})
            else:
                data, md = _format(obj)
                if data:
                    ctx.display(data, md)
        return None

    display.__doc__ = original.__doc__
    # It stands in for IPython's own: stored (by reference) and shown as that one.
    display.__module__, display.__qualname__ = original.__module__, original.__qualname__
    return display


_formatter = None


def _format(obj: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The MIME bundle IPython would show for ``obj`` (figures rendered to PNG)."""
    global _formatter
    if type(obj).__name__ == "Figure" and type(obj).__module__.startswith("matplotlib"):
        return _figure_bundle(obj), {}
    if _formatter is None:
        from IPython.core.formatters import DisplayFormatter

        _formatter = DisplayFormatter()
    data, md = _formatter.format(obj)
    return _jsonable(data), _jsonable(md)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out[k] = base64.b64encode(v).decode() if isinstance(v, bytes) else v
    return out


def _figure_bundle(fig: Any) -> dict[str, Any]:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return {"image/png": base64.b64encode(buf.getvalue()).decode(), "text/plain": repr(fig)}


def _install(cluster_scheduler: bool = True) -> None:
    """Once per worker process: route stdio, display() and plt.show() per thread; start the flusher.

    ``cluster_scheduler``: Dask collections computed in a cell run on the cluster (not in a sandboxed
    cell's process, which has no cluster and does not import Dask for nothing).
    """
    global _installed
    if _installed:
        return
    _installed = True
    sys.stdout = _Router("stdout", sys.stdout)
    sys.stderr = _Router("stderr", sys.stderr)
    try:
        import IPython.core.display_functions as df
        import IPython.display as ipd

        hook = _display_hook(df.display)
        df.display = hook
        ipd.display = hook
    except ImportError:  # IPython missing on the worker: display() falls back to print
        pass
    threading.Thread(target=_flusher, name="depin-stream-flusher", daemon=True).start()
    if not cluster_scheduler:
        return
    import dask

    # Dask collections computed inside a cell run on the whole cluster through the worker's client;
    # while the cell waits for them it gives up its worker slot, so cells waiting on cells never deadlock.
    dask.config.set(scheduler=_cluster_get)


def _cluster_get(dsk: Any, keys: Any, **kwargs: Any) -> Any:
    from distributed import get_client, rejoin, secede

    if _current() is None:
        # Not inside a cell: what Dask would do without this setting. (A worker that lives in another
        # program's process, `LocalCluster(processes=False)`, shares its dask config with that program.)
        try:
            client = get_client()
        except ValueError:  # no worker and no default client here: the local threaded scheduler
            import dask.threaded

            return dask.threaded.get(dsk, keys, **kwargs)
        return client.get(dsk, keys, **kwargs)
    client = get_client()
    secede()
    try:
        return client.get(dsk, keys, **kwargs)
    finally:
        rejoin()


def _flusher() -> None:
    while True:
        time.sleep(0.02)
        with _active_lock:
            contexts = [c for c, _ in _active.values()]
        for ctx in contexts:
            try:
                ctx.announce()
                ctx.flush(stale_only=True)
            except Exception:
                pass


def _fallback_display(*objs: Any, **kwargs: Any) -> None:
    ctx = _current()
    for obj in objs:
        if ctx is None:
            print(repr(obj))
        else:
            data, md = _format(obj)
            ctx.display(data, md)


def _show_figures(ctx: _RunContext, close: bool = True) -> None:
    """Send the cell's open matplotlib figures as PNG, as the inline backend does at cell end."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return
    for num in plt.get_fignums():
        fig = plt.figure(num)
        ctx.display(_figure_bundle(fig), {})
        if close:
            plt.close(fig)


# ---------------------------------------------------------------- cancellation

def _inject(ident: int, exc: type[BaseException]) -> bool:
    res = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exc))
    return res == 1


_run_of_key: dict[Any, str] = {}


def cancel_run(run_id: str, timed_out: bool = False, exc_type: type[BaseException] | None = None) -> bool:
    """Stop a run executing in this process; True if it was running.

    The cell's thread gets an exception between two bytecodes. A cell stuck in one long C call never
    reaches one: if it is still running after `depin.cancel-grace`, the worker process exits and its
    nanny starts a fresh one, which frees the cell's memory and GPU (other work there is re-run).
    """
    with _active_lock:
        entry = _active.get(run_id)
        if entry is None:
            return False
        stopped = _inject(entry[1], exc_type or (CellTimedOut if timed_out else CellCancelled))
    threading.Thread(target=_escalate, args=(run_id,), name="depin-cancel-escalation", daemon=True).start()
    return stopped


def _escalate(run_id: str) -> None:
    if _SAFE_CODEC_RESULTS:
        return  # a sandboxed cell's process: its worker kills it at the limit
    import dask

    grace = float(dask.utils.parse_timedelta(dask.config.get("depin.cancel-grace", "3s"), default="s"))
    time.sleep(grace)
    with _active_lock:
        entry = _active.get(run_id)
    if entry is None:
        return
    worker = entry[0].worker
    if worker is not None and getattr(worker, "nanny", None):
        sys.__stderr__.write(f"depin: run {run_id} did not stop within {grace:g}s of being cancelled (a long C "
                             f"call); restarting this worker process to free it\n")
        from .failures import STUCK_EXIT_STATUS

        os._exit(STUCK_EXIT_STATUS)  # the nanny notices and starts a new worker process


# ---------------------------------------------------------------- the notebook's own modules

MODULES_ARG = "__depin_modules__"
_modules_lock = threading.Lock()


def _use_local_modules(key: str, names: list[str], files: dict[str, bytes]) -> None:
    """Make this bundle of notebook modules the one `import` finds, replacing older versions."""
    import shutil
    import tempfile

    root = os.path.join(tempfile.gettempdir(), "depin-modules")
    target = os.path.join(root, key)
    with _modules_lock:
        if not os.path.isdir(target):
            tmp = tempfile.mkdtemp(prefix=key + ".", dir=_mkdir(root))
            for rel, data in files.items():
                path = os.path.join(tmp, *rel.split("/"))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
            try:
                os.rename(tmp, target)  # atomic: another process may have won the race; both are equal
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
        sys.path[:] = [p for p in sys.path if not p.startswith(root + os.sep)]
        sys.path.insert(0, target)
        for name in list(sys.modules):
            top = name.split(".")[0]
            mod_file = getattr(sys.modules[name], "__file__", None) or ""
            if top in names and not mod_file.startswith(target + os.sep):
                del sys.modules[name]  # an older version: the cell imports the shipped one
        importlib.invalidate_caches()


def _mkdir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


# ---------------------------------------------------------------- execution

def rebind_globals(obj: Any, ns: dict[str, Any]) -> Any:
    """A copy of a notebook-defined function whose globals are ``ns``, so it sees the cell's names.

    Classes keep the globals cloudpickle gave their methods (the names they used when shipped).
    """
    if isinstance(obj, types.FunctionType) and obj.__module__ == "__main__" and obj.__globals__ is not ns:
        new = types.FunctionType(obj.__code__, ns, obj.__name__, obj.__defaults__, obj.__closure__)
        new.__kwdefaults__ = obj.__kwdefaults__
        new.__qualname__ = obj.__qualname__
        new.__dict__.update(obj.__dict__)
        new.__annotations__ = getattr(obj, "__annotations__", {})
        new.__doc__ = obj.__doc__
        return new
    return obj


def _clean_traceback(exc: BaseException, filename: str) -> str:
    """The traceback from the cell's first frame on, with the cell's own line numbers and source."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb if tb is not None else exc.__traceback__))


# Set in a sandboxed cell's process: its results are encoded by `relay.to_payload` (safe_codec), which
# reports by name what it cannot encode, so Dask's serializers are not consulted (nor imported) there.
_SAFE_CODEC_RESULTS = False


def _portable_exception(exc: BaseException) -> BaseException | None:
    if _SAFE_CODEC_RESULTS:
        return None  # a sandboxed cell's errors travel as text only (`relay.to_payload`)
    from distributed.protocol import pickle as dpickle  # cloudpickle fallback: classes from the cell travel

    try:
        clone = dpickle.loads(dpickle.dumps(exc))
        clone.__traceback__ = None
        return clone
    except Exception:
        return None


def _serializable(value: Any) -> str | None:
    """None if ``value`` can travel back to the notebook, else the reason it cannot."""
    if _SAFE_CODEC_RESULTS:
        return None
    from distributed.protocol import serialize

    try:
        serialize(value, serializers=("cuda", "dask", "pickle"), on_error="raise")
        return None
    except Exception as e:  # noqa: BLE001 - any failure means it cannot travel
        return f"{type(e).__name__}: {e}"


def run_cell(spec: dict[str, Any], inputs: dict[str, Any], *, worker: Any = None) -> dict[str, Any]:
    """Execute a cell's code with ``inputs`` and return what it bound, changed and printed.

    ``spec`` keys: run_id, code, filename, modules ({name: module path}), maybe_mutated,
    outputs (names or None for all), last_expr, timeout, flush_interval.
    ``worker``: stands in for the Dask worker (``log_event``, ``address``, ``name``, ``get_current_task``),
    e.g. in a sandboxed child process; by default the worker this runs on, if any.
    """
    t0 = time.time()
    if worker is not None:
        worker_addr = worker.address
    else:
        try:
            from distributed import get_worker

            worker = get_worker()
            worker_addr = worker.address
        except ValueError:  # not on a worker (direct call in tests)
            worker, worker_addr = None, None
    _install()
    run_id = spec["run_id"]
    filename = spec["filename"]
    code = spec["code"]
    ctx = _RunContext(run_id, worker, spec.get("flush_interval", 0.05))
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)

    opened: list[str] = []
    ns: dict[str, Any] = {"__name__": "__main__", "__builtins__": _cell_builtins(opened)}
    local = spec.get("local_modules")
    if local:
        _use_local_modules(local["key"], local["names"], inputs.pop(MODULES_ARG))
    for name, modname in spec["modules"].items():
        ns[name] = importlib.import_module(modname)
    for value in inputs.values():
        # A notebook function brings the globals it uses (as cloudpickle captured them) along.
        if isinstance(value, types.FunctionType) and value.__module__ == "__main__":
            for gname, gvalue in value.__globals__.items():
                if not (gname.startswith("__") and gname.endswith("__")):
                    ns.setdefault(gname, gvalue)
    inputs = {name: unbox(value) for name, value in inputs.items()}
    for name, value in inputs.items():
        ns[name] = rebind_globals(value, ns)
    # What the cell starts with: anything still bound to the same object afterwards is no output.
    seeded = {n: v for n, v in ns.items() if n not in ("__name__", "__builtins__")}
    before = {n: _fingerprint(seeded[n]) for n in spec["maybe_mutated"] if n in inputs}
    input_objects = {id(v): n for n, v in seeded.items()
                     if n in inputs and not isinstance(v, (int, float, str, bool, type(None)))}

    result: dict[str, Any] = {"status": "ok", "worker": worker_addr, "run_id": run_id,
                              "worker_name": None if worker is None else str(worker.name),
                              "hardware": hardware()}
    ident = threading.get_ident()
    _local.run = ctx
    key = worker.get_current_task() if worker is not None else None
    with _active_lock:
        _active[run_id] = (ctx, ident)
        if key is not None:
            _run_of_key[key] = run_id
    timers = []
    for limit, exc_type in ((spec.get("timeout"), CellTimedOut), (spec.get("max_runtime"), CellMaxRuntime)):
        if limit:
            timers.append(threading.Timer(limit, cancel_run, args=(run_id,), kwargs={"exc_type": exc_type}))
            timers[-1].daemon = True
            timers[-1].start()
    meter, used = _energy_meter(result, worker)
    t1 = time.time()
    ctx.start(worker_addr, getattr(worker, "name", None))
    try:
        try:
            tree = ast.parse(code, filename=filename)
            body = tree.body
            value_node = body.pop() if spec.get("last_expr") else None
            exec(compile(ast.Module(body=body, type_ignores=[]), filename, "exec"), ns)
            if value_node is not None:
                value = eval(compile(ast.Expression(value_node.value), filename, "eval"), ns)  # type: ignore[attr-defined]
                if value is not None:
                    result["value"] = _shippable_value(value)
            _show_figures(ctx)
        finally:
            for timer in timers:
                timer.cancel()
            with _active_lock:
                _active.pop(run_id, None)
                _run_of_key.pop(key, None)
    except BaseException as exc:  # noqa: BLE001 - the cell's own exception travels back
        result["status"] = "cancelled" if isinstance(exc, CellCancelled) else "error"
        result["error"] = {
            "type": type(exc).__name__,
            "module": type(exc).__module__,
            "message": str(exc),
            "traceback": _clean_traceback(exc, filename),
            "exception": None if isinstance(exc, CellCancelled) else _portable_exception(exc),
            "timed_out": isinstance(exc, CellTimedOut),
            "limit": "max-runtime" if isinstance(exc, CellMaxRuntime) else "timeout",
        }
    finally:
        _local.run = None
        ctx.flush()
        if meter is not None:
            try:
                meter.__exit__(None, None, None)
                result["energy"] = used
            except Exception as e:  # noqa: BLE001 - a measurement never fails the cell
                result["energy"] = {"energy_j": "not measured", "reason": f"measurement failed: {e}"}
    t2 = time.time()
    _collect(result, ns, seeded, input_objects, before, spec)
    result["timings"] = {"setup": t1 - t0, "run": t2 - t1, "collect": time.time() - t2}
    result["opened"] = opened[:100]  # files read with open(): the notebook asks for --deps on them
    if spec.get("record"):
        _record_here(spec, result, ctx)
    result["stream_count"] = ctx.seq
    return result


def _energy_meter(result: dict[str, Any], worker: Any) -> tuple[Any, dict[str, Any]]:
    """Start `energy.measure` for a cell (GPU power when this worker has a GPU); (None, {}) if it fails."""
    from . import energy

    try:
        meter = energy.measure(gpu=bool((result.get("hardware") or {}).get("gpu")),
                               whole_process=bool(getattr(worker, "one_cell_process", False)))
        return meter, meter.__enter__()
    except Exception as e:  # noqa: BLE001 - a measurement never fails the cell
        result["energy"] = {"energy_j": "not measured", "reason": f"measurement failed: {e}"}
        return None, {}


def _record_here(spec: dict[str, Any], result: dict[str, Any], ctx: _RunContext) -> None:
    """Store the run from the worker (background runs: the results must not depend on the kernel)."""
    from distributed import rejoin, secede

    from . import persist
    from .store import open_store

    rec = spec["record"]
    secede()  # dask-array outputs are computed by the cluster while this thread waits
    try:
        store = open_store(rec["url"], storage_options=rec["storage_options"])
        warning = persist.record(store, run_id=spec["run_id"], label=rec["label"], code=spec["code"],
                                 hashes=rec["hashes"], key=rec["key"], options=rec["options"], result=result,
                                 timings={"run_s": result["timings"]["run"]}, pool=rec.get("pool"),
                                 private=rec.get("private") or ())
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
        from .gpu import describe

        _hardware_cache = {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(),
                           "memory": memory, "gpu": describe(), "python": platform.python_version()}
    return _hardware_cache


def _auditing_open(opened: list[str]) -> Any:
    """`open` for the cell: records the files it reads, so the notebook can say which to declare."""
    real_open = builtins.open

    def open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:  # noqa: A001 - stands in for it
        if isinstance(file, (str, os.PathLike)) and not any(c in mode for c in "wax+"):
            path = os.path.abspath(os.fspath(file))
            if path not in opened:
                opened.append(path)
        return real_open(file, mode, *args, **kwargs)

    open.__doc__ = real_open.__doc__
    open.__module__, open.__qualname__ = "builtins", "open"
    return open


def _cell_builtins(opened: list[str] | None = None) -> dict[str, Any]:
    b = dict(vars(builtins))
    if opened is not None:
        b["open"] = _auditing_open(opened)
    try:
        import IPython.display as ipd

        b["display"] = ipd.display
    except ImportError:
        b["display"] = _fallback_display
    return b


class RichValue:
    """A last-expression value that cannot travel itself: shown through its MIME bundle."""

    def __init__(self, data: dict[str, Any], metadata: dict[str, Any]) -> None:
        self.data, self.metadata = data, metadata

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        data = dict(self.data)
        if "image/png" in data and isinstance(data["image/png"], str):
            data["image/png"] = base64.b64decode(data["image/png"])
        return data, self.metadata

    def __repr__(self) -> str:
        return str(self.data.get("text/plain", "<remote value>"))


def _shippable_value(value: Any) -> Any:
    if _serializable(value) is None:
        return value
    data, md = _format(value)
    return RichValue(data, md)


def _collect(result: dict[str, Any], ns: dict[str, Any], inputs: dict[str, Any],
             input_objects: dict[int, str], before: dict[str, Any], spec: dict[str, Any]) -> None:
    """Fill ``result`` with the names the cell bound, changed in place, aliased or deleted."""
    wanted = spec.get("outputs")
    outputs: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    modules: dict[str, str] = {}
    mutated: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name, value in ns.items():
        if name.startswith("__") and name.endswith("__"):
            continue
        if wanted is not None and name not in wanted:
            continue
        if name in inputs and value is inputs[name]:
            if name in before and _changed(before[name], value):
                mutated[name] = value
            continue
        if isinstance(value, types.ModuleType):
            if inputs.get(name) is not value:
                modules[name] = value.__name__
            continue
        if id(value) in input_objects and inputs.get(input_objects[id(value)]) is value:
            aliases[name] = input_objects[id(value)]
            continue
        outputs[name] = value
    for group in (outputs, mutated):
        for name in list(group):
            reason = _serializable(group[name])
            if reason is not None:
                skipped[name] = f"{type(group.pop(name)).__name__} ({reason})"
            else:
                group[name] = box(group[name])
    known = set(inputs) | set(spec["modules"])
    result["deleted"] = [n for n in known if n not in ns and (wanted is None or n in wanted)]
    result.update(outputs=outputs, aliases=aliases, modules=modules, mutated=mutated, skipped=skipped)
