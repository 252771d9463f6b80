"""The cells running in this worker process, by run id and by Dask key: what cancel and the output flusher reach."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["ActiveRun", "Registry", "RunOutputLike", "active", "current", "set_current"]


class RunOutputLike(Protocol):
    """What the flusher calls on a run's output every few milliseconds."""

    def announce(self, after: float = ...) -> None: ...

    def flush(self, stale_only: bool = ...) -> None: ...


@dataclass(frozen=True)
class ActiveRun:
    """One running cell: its output, the thread executing it (cancel raises there) and its worker."""

    output: RunOutputLike
    thread: int
    worker: Any = None


class Registry:
    """Thread-safe map of run id -> `ActiveRun`, and of Dask task key -> run id."""

    def __init__(self) -> None:
        self._runs: dict[str, ActiveRun] = {}
        self._run_of_key: dict[Any, str] = {}
        self._lock = threading.Lock()

    def add(self, run_id: str, run: ActiveRun, key: Any = None) -> None:
        with self._lock:
            self._runs[run_id] = run
            if key is not None:
                self._run_of_key[key] = run_id

    def remove(self, run_id: str, key: Any = None) -> None:
        with self._lock:
            self._runs.pop(run_id, None)
            if key is not None:
                self._run_of_key.pop(key, None)

    def get(self, run_id: str) -> ActiveRun | None:
        with self._lock:
            return self._runs.get(run_id)

    def run_of_key(self, key: Any) -> str | None:
        with self._lock:
            return self._run_of_key.get(key)

    def outputs(self) -> list[RunOutputLike]:
        with self._lock:
            return [r.output for r in self._runs.values()]


active = Registry()
_local = threading.local()


def current() -> Any:
    """The output (`worker.output.RunOutput`) of the cell running in this thread, if any."""
    return getattr(_local, "run", None)


def set_current(run: Any) -> None:
    """Route this thread's output to ``run`` (None: back to the process's own streams)."""
    _local.run = run
