"""A cell's live output on the worker: stdout/stderr, `display()` and figures of the cell's thread, as events.

stdout/stderr, `display()` and matplotlib figures of the thread running a cell are routed to the notebook
through Dask's event stream (`Worker.log_event`, topic `STREAM_TOPIC`); other threads' output is left alone."""

from __future__ import annotations

import base64
import io
import os
import sys
import threading
import time
from typing import Any

from depin_jupyter.protocol.constants import STREAM_TOPIC
from depin_jupyter.worker.runs import active, current

__all__ = ["ANNOUNCE_AFTER_S", "RunOutput", "fallback_display", "figure_bundle", "format_mime", "install",
           "show_figures"]

ANNOUNCE_AFTER_S = 0.1  # a run still going after this long tells the notebook where it runs


class RunOutput:
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
        self._start: dict[str, Any] | None = {"kind": "start", "worker": address, "name": None if name is None else str(name),
                       "pid": os.getpid()}
        self._started_at = time.monotonic()

    def announce(self, after: float = ANNOUNCE_AFTER_S) -> None:
        """Tell the notebook the cell is running, and where, once it has run ``after`` seconds: quick
        cells send no event at all (every message costs the scheduler and the kernel some time)."""
        with self._lock:
            start: dict[str, Any] | None = getattr(self, "_start", None)
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


_installed = False


class _Router(io.TextIOBase):
    """Replaces sys.stdout/err: a cell thread's writes go to its run, others to the original stream."""

    def __init__(self, kind: str, original: Any) -> None:
        self.kind = kind
        self.original = original

    def write(self, s: str) -> int:
        held = getattr(_held, "text", None)
        if held is not None and self.kind == "stderr":  # a formatter's traceback, kept for the caller
            held.append(s)
            return len(s)
        ctx = current()
        if ctx is None:
            return self.original.write(s)
        ctx.write(self.kind, s)
        return len(s)

    def flush(self) -> None:
        ctx = current()
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
        ctx = current()
        if ctx is None:
            return original(*objs, **kwargs)
        for obj in objs:
            if kwargs.get("raw"):
                ctx.display(dict(obj), {})
                continue
            errors: list[str] = []
            data, md = format_mime(obj, errors)
            if errors:  # as IPython does: the formatter's traceback, then what could be formatted
                ctx.write("stderr", "".join(errors))
            if data:
                ctx.display(data, md)
        return None

    display.__doc__ = original.__doc__
    # It stands in for IPython's own: stored (by reference) and shown as that one.
    display.__module__, display.__qualname__ = original.__module__, original.__qualname__
    return display


_formatter = None


_held = threading.local()  # stderr text held back while `format_mime` runs (its formatters' tracebacks)


def format_mime(obj: Any, errors: list[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The MIME bundle IPython would show for ``obj`` (figures rendered to PNG).

    A formatter that raises prints its traceback, as IPython's do; with ``errors`` given, that text is
    appended there instead, for the caller to show where it belongs.
    """
    global _formatter
    if type(obj).__name__ == "Figure" and type(obj).__module__.startswith("matplotlib"):
        return figure_bundle(obj), {}
    if _formatter is None:
        from IPython.core.formatters import DisplayFormatter

        _formatter = DisplayFormatter()
    held: list[str] = []
    _held.text = held if errors is not None else None
    try:
        data, md = _formatter.format(obj)
    finally:
        _held.text = None
    if errors is not None and held:
        errors.append("".join(held))
    return _jsonable(data), _jsonable(md)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out[k] = base64.b64encode(v).decode() if isinstance(v, bytes) else v
    return out


def figure_bundle(fig: Any) -> dict[str, Any]:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return {"image/png": base64.b64encode(buf.getvalue()).decode(), "text/plain": repr(fig)}


def install(cluster_scheduler: bool = True) -> None:
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

    from depin_jupyter.worker.in_cell import cluster_get

    # Dask collections computed inside a cell run on the whole cluster through the worker's client;
    # while the cell waits for them it gives up its worker slot, so cells waiting on cells never deadlock.
    dask.config.set(scheduler=cluster_get)


def _flusher() -> None:
    while True:
        time.sleep(0.02)
        for ctx in active.outputs():
            try:
                ctx.announce()
                ctx.flush(stale_only=True)
            except Exception:  # noqa: S110, BLE001 - best effort
                pass


def fallback_display(*objs: Any, **kwargs: Any) -> None:
    ctx = current()
    for obj in objs:
        if ctx is None:
            print(repr(obj))
        else:
            errors: list[str] = []
            data, md = format_mime(obj, errors)
            if errors:
                ctx.write("stderr", "".join(errors))
            if data:
                ctx.display(data, md)


def show_figures(ctx: RunOutput, close: bool = True) -> None:
    """Send the cell's open matplotlib figures as PNG, as the inline backend does at cell end."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return
    for num in plt.get_fignums():
        fig = plt.figure(num)
        ctx.display(figure_bundle(fig), {})
        if close:
            plt.close(fig)
