"""Notebook side of live output: one subscription per client, events sorted into per-run queues."""

from __future__ import annotations

import base64
import queue
import sys
import threading
from typing import Any

from depin_jupyter.protocol.constants import STREAM_TOPIC

__all__ = ["StreamDispatcher", "emit"]


class StreamDispatcher:
    """Receives the workers' stream events (on the client's event-loop thread) for the main thread."""

    def __init__(self, client: Any) -> None:
        self._queues: dict[str, queue.Queue[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        client.subscribe_topic(STREAM_TOPIC, self._on_event)

    def _on_event(self, event: Any) -> None:
        _, msg = event
        with self._lock:
            q = self._queues.get(msg.get("run"))
        if q is not None:
            q.put(msg)

    def open(self, run_id: str) -> queue.Queue[dict[str, Any]]:
        q: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._lock:
            self._queues[run_id] = q
        return q

    def close(self, run_id: str) -> None:
        with self._lock:
            self._queues.pop(run_id, None)


def emit(msg: dict[str, Any]) -> None:
    """Show one stream event in the current cell as if the cell printed or displayed it here."""
    kind = msg.get("kind")
    if kind == "stdout":
        sys.stdout.write(msg["text"])
        sys.stdout.flush()
    elif kind == "stderr":
        sys.stderr.write(msg["text"])
        sys.stderr.flush()
    elif kind == "display":
        _publish(msg["data"], msg.get("metadata") or {})


def _publish(data: dict[str, Any], metadata: dict[str, Any]) -> None:
    try:
        from IPython import get_ipython
        from IPython.display import publish_display_data
    except ImportError:
        get_ipython = None  # type: ignore[assignment]
    shell = get_ipython() if get_ipython else None
    if shell is not None:  # IPython (kernel or terminal) shows it the way it shows display()
        publish_display_data(data, metadata)
        return
    # Plain Python: show the plain-text form, say what else there was.
    text = data.get("text/plain")
    others = [k for k in data if k != "text/plain"]
    if text:
        print(text)
    if others and "image/png" in others:
        n = len(base64.b64decode(data["image/png"]))
        print(f"[depin: image/png, {n} bytes: view it in Jupyter]")
