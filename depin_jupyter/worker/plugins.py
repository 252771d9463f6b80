"""Dask worker plugins that `%%depin` installs: cancelling a cell whose task Dask released, and keeping the
embedded cluster's workers alive through Jupyter's interrupt. Separate from `remote` so that a sandboxed
cell's process, which imports `remote`, does not import distributed."""

from __future__ import annotations

import threading
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

__all__ = ["CancelOnRelease", "IgnoreInterrupt"]


class CancelOnRelease(WorkerPlugin):
    """Worker plugin: when Dask cancels an executing `%%depin` task (future cancelled or released, its
    client gone), stop the cell's thread too — Dask alone would let it run on, holding memory and a slot.
    """

    name = "depin-cancel-on-release"
    idempotent = True

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if start == "executing" and finish in ("cancelled", "released", "forgotten"):
            from depin_jupyter.worker.cancel import cancel_run
            from depin_jupyter.worker.runs import active

            run_id = active.run_of_key(key)
            if run_id is not None:
                cancel_run(run_id)


class IgnoreInterrupt(WorkerPlugin):
    """Worker plugin for the embedded cluster only: its worker processes share the kernel's process group,
    so Jupyter's interrupt (SIGINT to the group) would kill them; the kernel cancels the cell instead.
    """

    name = "depin-ignore-interrupt"
    idempotent = True

    def setup(self, worker: Any) -> None:
        import signal

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
