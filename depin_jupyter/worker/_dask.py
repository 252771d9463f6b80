"""The volunteer's Dask worker: every Dask internal the worker side relies on lives in this module.

`VolunteerWorker` extends Dask's `Worker` where no public hook exists: its status stays "paused" while a
volunteer's control says so, it hands queued tasks back to the coordinator, it grants itself the pool its
certificate names, and it lets only the coordinator command it. tests/test_dask_contract.py names each
private attribute, op and message field used here.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
import time
from typing import Any

from distributed import Worker
from distributed.core import Status
from distributed.utils import NoOpAwaitable

from depin_jupyter import config
from depin_jupyter.protocol.constants import POOL_CAPACITY, pool_resource
from depin_jupyter.protocol.identity import peer_identity
from depin_jupyter.worker import controls

__all__ = ["CELL_RUNNER", "QuietWhileLeaving", "VolunteerWorker", "guard_nanny", "start_worker_when"]

logger = logging.getLogger("depin.volunteer")

_COMM_LOGGERS = ("distributed.worker", "distributed.core", "distributed.batched", "distributed.comm")
_LEAVING = frozenset({Status.closing, Status.closed, Status.closing_gracefully, Status.failed})


class QuietWhileLeaving(logging.Filter):
    """Drops the connection-closed tracebacks of a worker that is leaving: a heartbeat in flight when the
    coordinator retires it fails, expectedly, and the volunteer's terminal should say "left gracefully",
    not print a CommClosedError. Everything else, and everything before the leave, is kept."""

    def __init__(self, worker: Any) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(self.worker, "status", None) not in _LEAVING:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        names = {type(exc).__name__} if exc is not None else set()
        text = record.getMessage()
        closed = ("CommClosedError", "StreamClosedError")
        return not (names & set(closed) or any(c in text for c in closed))

# Dask internals used below (named by tests/test_dask_contract.py):
#   Worker.status (property: fget/fset), .state.total_resources / .available_resources / .running /
#   .executing_count / .tasks (TaskState.state, .run_spec, .key), .handle_stimulus + PauseEvent,
#   .batched_send with the op "reschedule", .periodic_callbacks, .handle_comm, .execute(key, stimulus_id),
#   ExecuteFailureEvent.from_exception, TaskState.run_spec.func / .run_id; Nanny.handle_comm (an instance
#   attribute set before the nanny listens); comm.extra_info["peercert"].


# The only function a volunteer's worker runs: depin's sandboxed cell runner, as the coordinator's gateway
# builds the task (`worker.entry.run_cell_gateway`). Anything else is refused before it runs.
CELL_RUNNER = ("depin_jupyter.worker.entry", "run_cell_gateway")


def _only_the_coordinator(owner: str, own_name: str, handle: Any) -> Any:
    """A ``handle_comm`` that drops every connection not made with the coordinator's certificate (or this
    volunteer's own: its worker reports to its nanny), before anything it sends is read (so nothing of a
    peer is ever decoded, let alone unpickled)."""
    def handle_comm(comm: Any) -> Any:
        name, roles, _ = peer_identity(comm.extra_info.get("peercert"))
        if roles != {"scheduler"} and not (roles == {"worker"} and own_name and name == own_name):
            logger.warning("%s refused a connection from %s (%s): only the coordinator may dial a volunteer",
                           owner, comm.peer_address, ", ".join(sorted(roles)) or "no depin role")
            comm.abort()
            return NoOpAwaitable()
        return handle(comm)

    return handle_comm


def guard_nanny(nanny: Any) -> Any:
    """Make a volunteer's nanny (ours, or one dask-cuda's CUDAWorker built) accept only the coordinator.

    Set before the nanny starts listening (its listener takes ``self.handle_comm`` then)."""
    nanny.handle_comm = _only_the_coordinator("nanny", _own_cert(nanny.security, "name"), nanny.handle_comm)
    return nanny


def hand_connection(nanny: Any, comm: Any) -> None:
    """Give ``nanny`` an open connection to its scheduler (the one `depin worker`'s first contact made) for
    its registration: `Nanny.start_unsafe` registers over ``self.rpc.connect(self.scheduler.addr)``, which
    takes an idle connection from the pool (`ConnectionPool.available`) before it opens a new one (TLS and
    Dask's handshake: three round trips). A connection closed meanwhile is skipped by the pool."""
    if comm is not None:
        nanny.rpc.available[nanny.scheduler.addr].add(comm)


def forkserver_preloaded() -> None:
    """Tell Dask the fork server's preload is set (`early.warm_process_start` set it, without importing
    `distributed`): otherwise its first `get_mp_context` imports every package it knows of here, on the way
    to starting a worker (`distributed.utils._forkserver_preload_set`)."""
    import multiprocessing

    import dask.config
    import distributed.utils

    if dask.config.get("distributed.worker.multiprocessing-method") == "forkserver":
        multiprocessing.get_context("forkserver")  # the context Dask would return
        distributed.utils._forkserver_preload_set = True


def start_worker_when(nanny: Any, ready: Any) -> Any:
    """Let ``nanny`` register with the coordinator at once but start its worker process only when the
    future ``ready`` gives the config that process needs (the sandbox probe's verdict, what it advertises),
    so the registration's round trips overlap the probe. ``ready`` giving None (the probe refused) fails the
    start. Wraps `Nanny.instantiate`, adds to `Nanny.config` (what the worker process is given)."""
    import dask.config

    instantiate = nanny.instantiate

    async def when_ready() -> Any:
        extra = await ready
        if extra is None:
            raise RuntimeError("the sandbox probe refused this machine")
        nanny.config = dask.config.merge(nanny.config, extra)
        return await instantiate()

    nanny.instantiate = when_ready
    return nanny


def _is_cell_runner(run_spec: Any) -> bool:
    func = getattr(run_spec, "func", None)
    return (getattr(func, "__module__", None), getattr(func, "__qualname__", None)) == CELL_RUNNER


class VolunteerWorker(Worker):
    """A Dask worker that only lets the coordinator dial it and runs only depin's sandboxed cell runner.

    It installs the depin worker plugins itself: on a volunteer network nobody dials in to add them.

    The volunteer stays in charge: every ``depin.volunteer.poll-interval`` it asks `controls.Controls` for
    reasons to take no work (``depin pause``, ``--hours``, ``--when-idle``, ``--max-gpu-util``). While there
    is one, the worker is in Dask's own ``Status.paused``: the scheduler sends it nothing new, running tasks
    finish, and tasks queued here but not started are handed back (``reschedule``) to run elsewhere.
    Changes are printed ("paused: outside hours 22:00-07:00"), logged as the event topic
    ``depin-volunteer``, and written to the control directory for ``depin pause`` to report.
    """

    def __init__(self, *args: Any, plugins: Any = None, **kwargs: Any) -> None:
        from tornado.ioloop import PeriodicCallback

        from depin_jupyter.worker.plugins import CancelOnRelease

        super().__init__(*args, plugins=(*(plugins or ()), CancelOnRelease()), **kwargs)
        self.depin_pool = _own_cert(self.security, "pool")
        if self.depin_pool:  # the coordinator grants it (from the certificate) only if asked for
            self.state.total_resources[pool_resource(self.depin_pool)] = POOL_CAPACITY
            self.state.available_resources[pool_resource(self.depin_pool)] = POOL_CAPACITY
        gpu = bool(self.state.total_resources.get("GPU"))
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        devices = [visible.split(",")[0].strip()] if gpu and visible.strip() else (["0"] if gpu else [])
        self.depin_controls = controls.Controls.from_config(devices)
        self._depin_quiet = QuietWhileLeaving(self)
        for name in _COMM_LOGGERS:
            logging.getLogger(name).addFilter(self._depin_quiet)
        self.depin_benchmark = controls.cached_benchmark(gpu)
        self._depin_handed_back: dict[Any, float] = {}
        self._depin_paused_by_us = False
        self._depin_reasons: list[str] = []
        self._depin_reasons = self._depin_evaluate()  # before registering: never take work it should not
        interval = (config.seconds("volunteer.poll-interval") or 0.5) * 1000
        self.periodic_callbacks["depin-controls"] = PeriodicCallback(self._depin_poll, interval)

    # --- the volunteer's controls ---
    @property  # type: ignore[override]
    def status(self) -> Status:
        return Worker.status.fget(self)  # type: ignore[attr-defined]

    @status.setter
    def status(self, value: Status) -> None:
        # Dask sets "running" after registering and when memory drops again: stay paused while a
        # volunteer's reason holds.
        if value == Status.running and getattr(self, "_depin_reasons", None):
            self._depin_paused_by_us = True
            if Worker.status.fget(self) == Status.paused:  # type: ignore[attr-defined]
                return
            Worker.status.fset(self, Status.paused)  # type: ignore[attr-defined]
            if self.state.running:  # e.g. starting -> paused: Dask only pauses the state on running -> paused
                from distributed.worker_state_machine import PauseEvent

                self.handle_stimulus(PauseEvent(stimulus_id=f"depin-pause-{time.time()}"))
            return
        Worker.status.fset(self, value)  # type: ignore[attr-defined]

    def _depin_evaluate(self) -> list[str]:
        try:
            return self.depin_controls.reasons(own_busy=bool(self.state.executing_count))
        except Exception as e:  # noqa: BLE001 - a broken signal must not kill the worker: stay paused
            return [f"a volunteer control failed ({type(e).__name__}: {e})"]

    def _depin_poll(self) -> None:
        reasons = self._depin_evaluate()
        changed = reasons != self._depin_reasons
        self._depin_reasons = reasons
        if reasons and self.status == Status.running:
            self._depin_paused_by_us = True
            self.status = Status.paused
        elif not reasons and self.status == Status.paused and self._depin_paused_by_us:
            self._depin_paused_by_us = False
            self.status = Status.running
        if self.status == Status.paused and self._depin_paused_by_us:
            self._depin_hand_back()
        if changed or not getattr(self, "_depin_announced", False):
            self._depin_announced = True
            self._depin_announce()

    def _depin_hand_back(self) -> None:
        """Give the scheduler back tasks queued here that have not started: a paused worker holds nothing."""
        now = time.time()
        for ts in list(self.state.tasks.values()):
            if (ts.state in ("ready", "constrained", "waiting") and ts.run_spec is not None
                    and now - self._depin_handed_back.get(ts.key, 0.0) > 5.0):
                self._depin_handed_back[ts.key] = now
                self.batched_send({"op": "reschedule", "key": ts.key, "stimulus_id": f"depin-pause-{now}"})
        for key in [k for k, t in self._depin_handed_back.items() if now - t > 60]:
            del self._depin_handed_back[key]

    def _depin_announce(self) -> None:

        state = "paused" if self._depin_reasons else "running"
        text = f"paused: {'; '.join(self._depin_reasons)}" if self._depin_reasons else "taking work"
        print(f"depin worker {self.name}: {text}", file=sys.stderr, flush=True)
        msg = {"name": str(self.name), "status": state, "reasons": list(self._depin_reasons)}
        try:
            self.log_event("depin-volunteer", msg)
        except Exception:  # noqa: BLE001, S110 - not connected yet: the state file still says it
            pass
        try:
            controls.write_worker_state({**msg, "address": self.contact_address or self.address},
                                        self.depin_controls.directory)
        except OSError as e:
            logger.warning("could not write the worker state to the control directory: %s", e)

    async def close(self, *args: Any, **kwargs: Any) -> Any:
        controls.remove_worker_state(self.depin_controls.directory)
        try:
            return await super().close(*args, **kwargs)
        finally:
            for name in _COMM_LOGGERS:
                logging.getLogger(name).removeFilter(self._depin_quiet)

    def handle_comm(self, comm: Any) -> Any:
        return _only_the_coordinator("worker", _own_cert(self.security, "name"), super().handle_comm)(comm)

    async def execute(self, key: Any, *, stimulus_id: str) -> Any:
        """Run a task only if it is depin's cell runner; anything else fails with a message, unrun."""
        ts = self.state.tasks.get(key)
        if ts is not None and not _is_cell_runner(ts.run_spec):
            from distributed.worker_state_machine import ExecuteFailureEvent

            func = getattr(ts.run_spec, "func", None)
            logger.warning("refused to run task %r (%r): a volunteer runs only depin's cell runner", key, func)
            return ExecuteFailureEvent.from_exception(
                PermissionError(f"volunteer {self.name} runs only depin's sandboxed cell runner, not "
                                f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', func)!s}"),
                key=key, run_id=ts.run_id, stimulus_id=f"depin-refused-{stimulus_id}")
        return await super().execute(key, stimulus_id=stimulus_id)


def _own_cert(security: Any, field: str) -> str:
    """The ``name`` or ``pool`` in this worker's own certificate ("" when it cannot be read)."""
    from depin_jupyter.protocol.identity import cert_info, cert_pool

    cert = getattr(security, "tls_worker_cert", None) or ""
    try:
        if not str(cert).lstrip().startswith("-----BEGIN"):
            cert = pathlib.Path(str(cert)).read_text()
        return cert_pool(str(cert)) if field == "pool" else cert_info(str(cert)).name
    except Exception:  # noqa: BLE001 - no certificate (tests without TLS): no name, in no pool
        return ""
