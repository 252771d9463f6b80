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

import html
import sys
import threading
import time
from typing import Any, TextIO

from .runner import Progress

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
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def elapsed(self) -> float:
        return (self.t_end or time.monotonic()) - self.t0

    def text(self) -> str:
        """The plain-text form: ``depin: running on w (addr) · 1.2 s``."""
        head = f"depin [{self.label}]" if self.label else "depin"
        return f"{head}: {_stage_text(self.stage, self.detail)} · {_elapsed(self.elapsed)}"

    def html(self) -> str:
        color = _COLORS.get(self.stage, "var(--jp-ui-font-color1, #333)")
        label = f" {html.escape(self.label)}" if self.label else ""
        return (
            f'<div class="depin-progress" data-stage="{html.escape(self.stage)}" '
            f'style="font-family: var(--jp-ui-font-family, sans-serif); font-size: 12px;">'
            f"<b>depin</b>{label} · "
            f'<b class="depin-progress-stage" style="color: {color}">{html.escape(STAGES.get(self.stage, self.stage))}</b>'
            f' <span class="depin-progress-detail">{html.escape(self.detail)}</span>'
            f' · <span class="depin-progress-elapsed">{_elapsed(self.elapsed)}</span></div>'
        )

    def _bundle(self) -> dict[str, Any]:
        return {
            "application/vnd.jupyter.widget-view+json": {
                "model_id": self._widget.model_id, "version_major": 2, "version_minor": 0,
            },
            "text/plain": self.text(),
        }

    def update(self, stage: str, detail: str = "") -> None:
        from IPython.display import display

        with self._lock:
            self.stage, self.detail = stage, detail
            if stage in TERMINAL:
                self.t_end = time.monotonic()
                self._stop.set()
            if self._widget is None:
                import ipywidgets

                self._widget = ipywidgets.HTML(value=self.html())
                self._handle = display(self._bundle(), raw=True, display_id=True)
            else:
                self._widget.value = self.html()
                if self._handle is not None:
                    self._handle.update(self._bundle(), raw=True)
            if self._ticker is None and not self._stop.is_set():
                self._ticker = threading.Thread(target=self._tick, name="depin-progress", daemon=True)
                self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(self._tick_s):
            with self._lock:
                if self._stop.is_set():
                    return
                self._widget.value = self.html()

    def close(self) -> None:
        """Stop the elapsed-time ticker (a terminal stage does this too)."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)


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
        self._timer: threading.Timer | None = None

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
                if self._timer is not None:
                    self._timer.cancel()
            if self._speaking:
                self._say()
            elif self._timer is None and not self._done:
                self._timer = threading.Timer(max(0.0, self.quiet_s - (time.monotonic() - self.t0)),
                                              self._wake)
                self._timer.daemon = True
                self._timer.start()

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
            if self._timer is not None:
                self._timer.cancel()
