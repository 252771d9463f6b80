"""Warm sandboxes: child processes started ahead, so a cell does not wait for Python and numpy to start."""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from depin_jupyter.worker.sandbox.limits import Limits

__all__ = ["WarmSlot", "warm_depth", "warm_key", "warm_wanted"]


def warm_key(limits: Limits) -> Limits:
    """What a warm child must share with a cell to serve it: everything but the wall time (the parent's)."""
    return dataclasses.replace(limits, wall_time=None, wall_source="")


def warm_wanted(warm: bool | None, worker: Any) -> bool:
    if warm is not None:
        return warm
    import dask.config

    setting = dask.config.get("depin.sandbox.warm", default=True)
    return bool(setting) and worker is not None  # in a worker process: cells keep coming


def warm_depth() -> int:
    """How many children to keep started ahead (`depin.sandbox.warm-children`, at least 1)."""
    import dask.config

    try:
        return max(1, int(dask.config.get("depin.sandbox.warm-children", default=2)))
    except (TypeError, ValueError):
        return 2


class WarmSlot:
    """Children started ahead for the next cells: imports done, confined, nothing of any cell in them.

    A child serves exactly one cell and is never reused, so no run meets another's state, whoever sent it.
    More than one is kept (``depth``) because a child takes longer to start (Python, numpy: 0.1-0.3 s) than
    a trivial cell takes to run: with one, cells sent back to back each waited for the start of the child
    taken after the previous one. The oldest child (the one most likely ready) is taken first.
    Children are started on one long-lived thread: PR_SET_PDEATHSIG (and bwrap's --die-with-parent) fire
    when the *thread* that started the child ends, so a short-lived thread would kill them at once."""

    def __init__(self, start: Callable[[Limits], Any], depth: Callable[[], int] = warm_depth) -> None:
        self._start = start  # limits -> a started child (`parent._Child`): key, alive(), close()
        self._depth = depth
        self._lock = threading.Lock()
        self._children: collections.deque[Any] = collections.deque()
        self._wanted: Limits | None = None
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def ready(self) -> int:
        """How many children are started and waiting (tests)."""
        with self._lock:
            return len(self._children)

    def take(self, limits: Limits) -> Any:
        """The oldest warm child started for these limits and alive, else None (children started for other
        limits, or dead, are discarded)."""
        key, stale, found = warm_key(limits), [], None
        with self._lock:
            while self._children:
                child = self._children.popleft()
                if child.key == key and child.alive():
                    found = child
                    break
                stale.append(child)
        for child in stale:
            child.close()
        return found

    def refill(self, limits: Limits) -> None:
        """Keep ``depth`` children started for ``limits`` (started on the warm thread, beside the cell)."""
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
            while True:
                with self._lock:
                    limits = self._wanted
                    if limits is None:
                        break
                    key = warm_key(limits)
                    stale = [c for c in self._children if c.key != key or not c.alive()]
                    for c in stale:
                        self._children.remove(c)
                    if len(self._children) >= self._depth():
                        self._wanted = None
                for c in stale:
                    c.close()
                if self._wanted is None:
                    break
                try:
                    child = self._start(limits)
                except Exception:  # noqa: BLE001 - no warm child: the next cell starts its own, and says why
                    with self._lock:
                        self._wanted = None
                    break
                with self._lock:
                    if self._wanted is not None and warm_key(self._wanted) == key:
                        self._children.append(child)
                        child = None
                if child is not None:  # wanted for other limits meanwhile, or cleared
                    child.close()

    def clear(self) -> None:
        """Stop the warm children (tests; a worker that closes lets them die with the process)."""
        with self._lock:
            children, self._wanted = list(self._children), None
            self._children.clear()
        for child in children:
            child.close()
