"""What is handed to Dask to run on workers: the cell tasks and the worker plugins, by reference.

The one module of the worker side the kernel and the coordinator's gateway import (import-linter allows
exactly this crossing): Dask pickles these functions and classes by name, and each worker imports them
there. Importing this module is cheap; the worker's machinery loads only when a task runs.
"""

from __future__ import annotations

from typing import Any

from depin_jupyter.protocol.records import RunResult, RunSpec

__all__ = ["cancel_on_release", "ignore_interrupt", "run_cell", "run_cell_gateway"]


def run_cell(spec: RunSpec, inputs: dict[str, Any]) -> RunResult:
    """The `%%depin` task on a trusted cluster: run the cell in this worker thread, return its result."""
    from depin_jupyter.worker.execute import run_cell as run

    return run(spec, inputs)


def run_cell_gateway(spec: bytes, inputs: bytes, blob: bytes | None, owner: str = "") -> str:
    """The `%%depin` task on a volunteer, as the coordinator's gateway builds it for a cell of ``owner``:
    pickle-free bytes in, the result pushed to the coordinator's relay (`worker.relayed`); the blob is
    opened only in the sandbox."""
    from depin_jupyter.worker.relayed import run_cell_gateway as run

    return run(spec, inputs, blob, owner)


def cancel_on_release() -> Any:
    """The worker plugin that stops a cell whose task Dask released (`worker.plugins.CancelOnRelease`)."""
    from depin_jupyter.worker.plugins import CancelOnRelease

    return CancelOnRelease()


def ignore_interrupt() -> Any:
    """The embedded cluster's worker plugin: its processes ignore the kernel's SIGINT, which they share."""
    from depin_jupyter.worker.plugins import IgnoreInterrupt

    return IgnoreInterrupt()
