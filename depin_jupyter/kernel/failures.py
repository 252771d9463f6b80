"""Pure: turn what the cluster saw (nanny logs, memory events, exception types) into plain explanations.

Dask reports a dead worker as `KilledWorker`; users need to know *why* it died and what to try. The
runner gathers the evidence (I/O); these functions only read it.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from typing import Any, Iterable

__all__ = ["Death", "explain_death", "explain_exception", "STUCK_EXIT_STATUS"]

# The exit status of a worker process that ended itself because a cancelled cell would not stop.
STUCK_EXIT_STATUS = 70


@dataclass(frozen=True)
class Death:
    """Why a worker process died while running a cell, and whether running it elsewhere can help."""

    cause: str          # "memory", "signal", "exit", "lost"
    message: str
    retryable: bool


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def explain_death(worker: str | None, pid: int | None, nanny_logs: Iterable[str],
                  memory_events: Iterable[dict[str, Any]], memory_limit: int | None = None) -> Death:
    """Explain the death of worker ``worker`` (process ``pid``) from its nanny's log and memory events."""
    where = worker or "the worker"
    for ev in memory_events:
        if (pid is not None and ev.get("pid") == pid) or (pid is None and ev.get("worker") == worker):
            rss = ev.get("rss")
            used = f" ({rss / 2**30:.2f} GiB" + (f" of its {memory_limit / 2**30:.2f} GiB limit)" if memory_limit else ")") if rss else ""
            return Death("memory", (
                f"the worker {where} ran out of memory{used} and was restarted by its nanny. "
                f"Use smaller inputs or chunks, `del` large intermediates in the cell, or run on workers "
                f"with more memory; retrying on a worker of the same size would fail the same way."
            ), retryable=False)
    if pid is not None:
        pattern = re.compile(rf"Worker process {pid} (was killed by signal (\d+)|was killed by unknown signal|"
                             rf"exited with status (-?\d+))")
        for line in nanny_logs:
            m = pattern.search(line)
            if not m:
                continue
            if m.group(2):
                num = int(m.group(2))
                name = _signal_name(num)
                if num in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT):
                    return Death("signal", (
                        f"the worker {where} crashed in native code ({name}): a C extension, ctypes call "
                        f"or driver failed inside the cell. Python cannot catch this; find the call that "
                        f"crashes (run the cell locally with faulthandler enabled). Not retried: it would "
                        f"crash again."
                    ), retryable=False)
                return Death("signal", (
                    f"the worker {where} was killed by {name} from outside (the operating system's "
                    f"out-of-memory killer, a scheduler or a person)."
                ), retryable=True)
            if m.group(3) is not None and int(m.group(3)) == STUCK_EXIT_STATUS:
                return Death("stuck", (
                    f"the cell on {where} did not stop when it was cancelled or ran out of time (it was inside "
                    f"a long C call), so its worker process was restarted to free its memory and GPU."
                ), retryable=False)
            if m.group(3) is not None:
                return Death("exit", (
                    f"the worker process {where} exited with status {m.group(3)} while running the cell "
                    f"(the cell or a library it calls ended the process, e.g. sys.exit/os._exit)."
                ), retryable=True)
            return Death("signal", f"the worker {where} was killed by an unknown signal.", retryable=True)
    return Death("lost", (
        f"the worker {where} left the cluster or lost its connection while running the cell (a volunteer "
        f"that disconnected, a network failure, or a machine that went to sleep)."
    ), retryable=True)


_GPU_OOM = ("OutOfMemoryError", "CUDARuntimeError", "CUDADriverError")


def explain_exception(type_name: str, module: str, message: str, worker: str | None,
                      gpu: dict[str, Any] | None = None) -> str | None:
    """A note for exceptions that are about the machine rather than the code (out of GPU/host memory)."""
    where = worker or "the worker"
    text = message.lower()
    if module.startswith(("cupy", "cupy_backends", "torch", "numba")) and (
        type_name in _GPU_OOM and ("memory" in text or "out of memory" in text or type_name == "OutOfMemoryError")
    ):
        total = gpu.get("memory") or gpu.get("memory-total") or 0 if gpu else 0
        what = f" ({gpu.get('name')}, {total / 2**30:.0f} GiB)" if gpu else ""
        return (f"depin: the GPU of {where}{what} ran out of memory. Free arrays you no longer need "
                f"(del, cupy.get_default_memory_pool().free_all_blocks()), process the data in smaller "
                f"chunks, or ask for a larger GPU with --gpu-mem GiB.")
    if type_name in ("MemoryError", "_ArrayMemoryError"):
        return (f"depin: {where} could not allocate host memory for the cell. Use smaller arrays or chunks, "
                f"or run on a worker with more memory (%depin status shows each worker's limit).")
    return None
