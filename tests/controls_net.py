"""Helpers for tests/test_controls.py; also a worker preload: a volunteer whose cells sleep to look busy.

As a preload (``DASK_DISTRIBUTED__WORKER__PRELOAD``) it makes every cell sleep ``DEPIN_TEST_SLEEP`` seconds
after doing its real work: wall-clock time grows, the work done does not.
"""

from __future__ import annotations

import os
import time
from typing import Any


def dask_setup(worker: Any) -> None:
    from depin_jupyter.worker import execute as remote
    from depin_jupyter.worker import sandbox

    real_run, real_sandboxed = remote.run_cell, sandbox.run_sandboxed
    pause = float(os.environ.get("DEPIN_TEST_SLEEP", "1"))

    def run_cell(spec, inputs):  # type: ignore[no-untyped-def]
        out = real_run(spec, inputs)
        time.sleep(pause)
        return out

    def run_sandboxed(spec, inputs, **kwargs):  # type: ignore[no-untyped-def]  (the volunteer default)
        out = real_sandboxed(spec, inputs, **kwargs)
        time.sleep(pause)
        return out

    remote.run_cell = run_cell
    sandbox.run_sandboxed = run_sandboxed


def worker_info(session: Any, name: str) -> tuple[str, dict[str, Any]]:
    """(address, scheduler-side info) of the worker called ``name``."""
    for address, info in session.client.scheduler_info(n_workers=-1)["workers"].items():
        if info.get("name") == name:
            return address, info
    raise AssertionError(f"no worker {name!r}")


def wait_status(session: Any, name: str, status: str, timeout: float = 30) -> float:
    """Wait until the scheduler shows worker ``name`` with ``status``; returns when (time.time())."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = worker_info(session, name)[1].get("status")
        except AssertionError:
            last = None
        if last == status:
            return time.time()
        time.sleep(0.05)
    raise AssertionError(f"worker {name!r} is {last!r}, not {status!r}, after {timeout}s")


def cli(*args: str, control_dir: Any = None) -> Any:
    """Run the depin CLI in-process (with depin.volunteer.control-dir set); the click result."""
    import dask
    from click.testing import CliRunner

    from depin_jupyter.cli import main

    with dask.config.set({"depin.volunteer.control-dir": str(control_dir) if control_dir else None}):
        return CliRunner().invoke(main, list(args))
