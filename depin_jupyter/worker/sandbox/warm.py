"""Warm sandboxes: one child process started ahead, so a cell does not wait for Python and numpy to start."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from depin_jupyter.worker.sandbox.limits import Limits

__all__ = ["WarmSlot", "warm_key", "warm_wanted"]


def warm_key(limits: Limits) -> Limits:
    """What a warm child must share with a cell to serve it: everything but the wall time (the parent's)."""
    return dataclasses.replace(limits, wall_time=None, wall_source="")


def warm_wanted(warm: bool | None, worker: Any) -> bool:
    if warm is not None:
        return warm
    import dask.config

    setting = dask.config.get("depin.sandbox.warm", default=True)
    return bool(setting) and worker is not None  # in a worker process: cells keep coming


class WarmSlot:
    """One child started ahead for the next cell: imports done, confined, nothing of any cell in it.

    A child serves exactly one cell and is never reused, so no run meets another's state, whoever sent it.
    Children are started on one long-lived thread: PR_SET_PDEATHSIG (and bwrap's --die-with-parent) fire
    when the *thread* that started the child ends, so a short-lived thread would kill them at once."""

    def __init__(self, start: Callable[[Limits], Any]) -> None:
        self._start = start  # limits -> a started child (`parent._Child`): key, alive(), close()
        self._lock = threading.Lock()
        self._child: Any = None
        self._wanted: Limits | None = None
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self, limits: Limits) -> Any:
        """The warm child if it was started for these limits and is alive, else None (it is discarded)."""
        with self._lock:
            child, self._child = self._child, None
        if child is None:
            return None
        if child.key != warm_key(limits) or not child.alive():
            child.close()
            return None
        return child

    def refill(self, limits: Limits) -> None:
        with self._lock:
            self._wanted = limits
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="depin-warm-sandbox", daemon=True)
                self._thread.start()
        self._wake.set()

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                limits, self._wanted = self._wanted, None
                current = self._child
            if limits is None or (current is not None and current.key == warm_key(limits) and current.alive()):
                continue
            try:
                child = self._start(limits)
            except Exception:  # noqa: BLE001 - no warm child: the next cell starts its own, and says why
                continue
            with self._lock:
                old, self._child = self._child, child
            if old is not None:
                old.close()

    def clear(self) -> None:
        """Stop the warm child (tests; a worker that closes lets it die with the process)."""
        with self._lock:
            child, self._child, self._wanted = self._child, None, None
        if child is not None:
            child.close()
