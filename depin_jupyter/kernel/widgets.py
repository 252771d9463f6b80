"""Progress of a `%%depin` run in the cell's output: a live ipywidgets line, or plain text.

`make_progress(label)` picks the display:

- **widget** (in a Jupyter kernel with ipywidgets): one line in the cell's output — stage, detail
  (what was shipped, which worker runs it), elapsed time ticking twice a second — updated live. The
  same display carries a ``text/plain`` version, rewritten at every stage, so a frontend without
  widgets (nbclient, nbconvert, a notebook viewer) keeps the last state, e.g. ``depin: done on
  worker-0 in 1.3 s``.
- **text** (plain IPython in a terminal, scripts): nothing for a run that ends within
  `QUIET_S` (a quick cell looks exactly like a local one); past that, one short line per stage on
  stderr, starting with the stage the run is in at that moment.
"""

from __future__ import annotations

import heapq
import html
import itertools
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from depin_jupyter.kernel.records import Progress

__all__ = ["QUIET_S", "STAGES", "TextProgress", "WidgetProgress", "make_progress"]

# Text mode says nothing about a run that finishes within this many seconds.
QUIET_S = 1.0
# The widget's elapsed time is refreshed this often while the run is not finished.
TICK_S = 0.5

STAGES = {
    "shipping": "shipping inputs",
    "queued": "queued",
    "running": "running",
    "retrying": "retrying",
    "storing": "storing results",
    "done": "done",
    "cached": "cached",
    "failed": "failed",
}
TERMINAL = frozenset({"done", "cached", "failed"})
_COLORS = {"done": "#2e7d32", "cached": "#1565c0", "failed": "#c62828", "retrying": "#ef6c00"}


class _Clock:
    """One daemon thread that runs delayed callbacks for every progress display.

    A thread per run (``threading.Timer``) costs more than a trivial cell's whole round trip on a
    small machine (starting it waits for the new thread to be scheduled): measured 3.6 ms of 13 ms
    on 2 cores. The clock's thread starts once; scheduling is a heap push.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, list[Any]]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def call_later(self, delay: float, fn: Callable[[], None]) -> list[Any]:
        """Run ``fn()`` on the clock's thread ``delay`` seconds from now; cancel with `cancel(handle)`."""
        entry: list[Any] = [fn]
        item = (time.monotonic() + max(0.0, delay), next(self._seq), entry)
        with self._cond:
            heapq.heappush(self._heap, item)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="depin-progress-clock", daemon=True)
                self._thread.start()
            if self._heap[0] is item:  # only an earlier deadline needs the sleeping thread woken
                self._cond.notify()
        return entry

    @staticmethod
    def cancel(handle: list[Any] | None) -> None:
        if handle is not None:
            handle[0] = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, _, entry = heapq.heappop(self._heap)
            fn = entry[0]
            if fn is not None:
                try:
                    fn()
                except Exception:  # noqa: BLE001, S110 - a display that fails must not stop the clock
                    pass


_clock = _Clock()


def _stage_text(stage: str, detail: str) -> str:
    words = STAGES.get(stage, stage)
    return f"{words} {detail}".strip() if detail else words


def _elapsed(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def widgets_available() -> bool:
    """True in a Jupyter kernel (IPython with a kernel attached) where ipywidgets imports."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or getattr(shell, "kernel", None) is None:
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def make_progress(label: str, *, mode: str = "auto") -> Progress:
    """A Progress for one run labelled ``label``; ``mode``: "auto", "widget", "text" or "off"."""
    if mode == "auto":
        mode = "widget" if widgets_available() else "text"
    if mode == "widget":
        return WidgetProgress(label)
    if mode == "text":
        return TextProgress(label)
    if mode == "off":
        return Progress()
    raise ValueError(f"progress mode must be 'auto', 'widget', 'text' or 'off', not {mode!r}")


class WidgetProgress(Progress):
    """A live line in the cell's output (ipywidgets.HTML) with a text/plain fallback."""

    def __init__(self, label: str, *, tick_s: float = TICK_S) -> None:
        self.label = label
        self.stage = ""
        self.detail = ""
        self.t0 = time.monotonic()
        self.t_end: float | None = None
        self._tick_s = tick_s
        self._lock = threading.Lock()
        self._widget: Any = None
        self._handle: Any = None
        self._ticker: list[Any] | None = None  # the clock's handle of the next tick
        self._stop = threading.Event()
        self.notes: list[str] = []  # informational notes, shown under the line (never on stderr)

    @property
    def elapsed(self) -> float:
        return (self.t_end or time.monotonic()) - self.t0

    def text(self) -> str:
        """The plain-text form: ``depin: running on w (addr) · 1.2 s``."""
        head = f"depin [{self.label}]" if self.label else "depin"
        return "\n".join([f"{head}: {_stage_text(self.stage, self.detail)} · {_elapsed(self.elapsed)}",
                          *(f"depin: {n}" for n in self.notes)])

    def html(self) -> str:
        color = _COLORS.get(self.stage, "var(--jp-ui-font-color1, #333)")
        label = f" {html.escape(self.label)}" if self.label else ""
        return (
            f'<div class="depin-progress" data-stage="{html.escape(self.stage)}" '
            f'style="font-family: var(--jp-ui-font-family, sans-serif); font-size: 12px;">'
            f"<b>depin</b>{label} · "
            f'<b class="depin-progress-stage" style="color: {color}">{html.escape(STAGES.get(self.stage, self.stage))}</b>'
            f' <span class="depin-progress-detail">{html.escape(self.detail)}</span>'
            f' · <span class="depin-progress-elapsed">{_elapsed(self.elapsed)}</span>'
            + "".join(f'<div class="depin-progress-note">{html.escape(n)}</div>' for n in self.notes)
            + "</div>"
        )

    def _bundle(self) -> dict[str, Any]:
        return {
            "application/vnd.jupyter.widget-view+json": {
                "model_id": self._widget.model_id, "version_major": 2, "version_minor": 0,
            },
            "text/plain": self.text(),
        }

    def update(self, stage: str, detail: str = "") -> None:
        with self._lock:
            self.stage, self.detail = stage, detail
            if stage in TERMINAL:
                self.t_end = time.monotonic()
                self._stop.set()
            self._render()
            if self._ticker is None and not self._stop.is_set():
                self._ticker = _clock.call_later(self._tick_s, self._tick)

    def note(self, text: str) -> None:
        """Show ``text`` under the progress line (and in its text/plain form), not on stdout or stderr."""
        with self._lock:
            self.notes.append(text)
            self._render()

    def _render(self) -> None:
        from IPython.display import display

        if self._widget is None:
            import ipywidgets

            self._widget = ipywidgets.HTML(value=self.html())
            self._handle = display(self._bundle(), raw=True, display_id=True)
        else:
            self._widget.value = self.html()
            if self._handle is not None:
                self._handle.update(self._bundle(), raw=True)

    def _tick(self) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            self._widget.value = self.html()
            self._ticker = _clock.call_later(self._tick_s, self._tick)

    def close(self) -> None:
        """Stop the elapsed-time ticker (a terminal stage does this too)."""
        with self._lock:
            self._stop.set()
            _clock.cancel(self._ticker)


class TextProgress(Progress):
    """One short stderr line per stage, but only once a run has taken longer than ``quiet_s``."""

    def __init__(self, label: str, *, quiet_s: float = QUIET_S, stream: TextIO | None = None) -> None:
        self.label = label
        self.quiet_s = quiet_s
        self._stream = stream
        self.t0 = time.monotonic()
        self.stage = ""
        self.detail = ""
        self._speaking = quiet_s <= 0
        self._done = False
        self._lock = threading.Lock()
        self._timer: list[Any] | None = None  # the clock's handle of the first line

    def _say(self) -> None:
        head = f"depin [{self.label}]" if self.label else "depin"
        stream = self._stream or sys.stderr
        print(f"{head}: {_stage_text(self.stage, self.detail)} ({_elapsed(time.monotonic() - self.t0)})",
              file=stream, flush=True)

    def update(self, stage: str, detail: str = "") -> None:
        with self._lock:
            if self._done:
                return
            self.stage, self.detail = stage, detail
            if stage in TERMINAL:
                self._done = True
                _clock.cancel(self._timer)
            if self._speaking:
                self._say()
            elif self._timer is None and not self._done:
                self._timer = _clock.call_later(self.quiet_s - (time.monotonic() - self.t0), self._wake)

    def _wake(self) -> None:
        with self._lock:
            if self._done:
                return
            self._speaking = True
            self._say()

    def close(self) -> None:
        """Cancel the pending first line (a terminal stage does this too)."""
        with self._lock:
            self._done = True
            _clock.cancel(self._timer)
