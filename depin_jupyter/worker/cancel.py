"""Stopping a cell from outside (interrupt, timeout, cancel): an exception raised in its thread."""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time

from depin_jupyter.protocol.constants import STUCK_EXIT_STATUS
from depin_jupyter.worker.runs import active

__all__ = ["CellCancelled", "CellMaxRuntime", "CellTimedOut", "cancel_run"]


class CellCancelled(BaseException):
    """Raised inside a cell's thread when its run is cancelled (BaseException: `except Exception` can't swallow it)."""


class CellTimedOut(CellCancelled):
    """Raised inside a cell's thread when it runs past its timeout."""


class CellMaxRuntime(CellTimedOut):
    """Raised inside a cell's thread when the run passes its --max-runtime (kernel present or not)."""


def _inject(ident: int, exc: type[BaseException]) -> bool:
    res = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exc))
    return res == 1


def cancel_run(run_id: str, timed_out: bool = False, exc_type: type[BaseException] | None = None) -> bool:
    """Stop a run executing in this process; True if it was running.

    The cell's thread gets an exception between two bytecodes. A cell stuck in one long C call never
    reaches one: if it is still running after `depin.cancel-grace`, the worker process exits and its
    nanny starts a fresh one, which frees the cell's memory and GPU (other work there is re-run).
    """
    entry = active.get(run_id)
    if entry is None:
        return False
    stopped = _inject(entry.thread, exc_type or (CellTimedOut if timed_out else CellCancelled))
    threading.Thread(target=_escalate, args=(run_id,), name="depin-cancel-escalation", daemon=True).start()
    return stopped


def _escalate(run_id: str) -> None:
    entry = active.get(run_id)
    if entry is None or entry.worker is None or not getattr(entry.worker, "nanny", None):
        return  # no nanny to start a fresh worker (a sandboxed cell's process: its worker kills it at the limit)
    from depin_jupyter import config

    grace = config.seconds("cancel-grace") or 0.0
    time.sleep(grace)
    if active.get(run_id) is entry:
        print(f"depin: run {run_id} did not stop within {grace:g}s of being cancelled (a long C "
                             f"call); restarting this worker process to free it", file=sys.__stderr__, flush=True)
        os._exit(STUCK_EXIT_STATUS)  # the nanny notices and starts a new worker process
