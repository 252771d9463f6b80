"""Submit one run and wait for it: live output, time limits, a pinned worker that left, why a worker died.

On a volunteer network the result comes from the coordinator's relay, decoded without unpickling; a cell's
exception is rebuilt in the notebook (its own class where it travelled, a built-in by name, else
`RemoteCellError`) with the remote traceback attached."""

from __future__ import annotations

import queue
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Mapping
from typing import Any

from depin_jupyter import config
from depin_jupyter.errors import CellTimeoutError, RemoteExecutionError, WorkerLostError
from depin_jupyter.kernel.cluster import Session
from depin_jupyter.kernel.failures import Death, explain_death, explain_exception
from depin_jupyter.kernel.jobs import register as register_job
from depin_jupyter.kernel.records import InputsLost, Progress, RemoteCellError, WorkerDied
from depin_jupyter.kernel.stream import emit
from depin_jupyter.kernel.watch import EndWatcher
from depin_jupyter.protocol.constants import ENDED_STATES, run_key
from depin_jupyter.protocol.records import RunResult, RunSpec
from depin_jupyter.protocol.rpc import Coordinator
from depin_jupyter.protocol.values import RichValue
from depin_jupyter.worker.entry import run_cell as remote_run_cell

__all__ = ["DetachedRun", "cancel", "inert_event", "raise_remote", "submit_and_wait", "submit_detached"]


_DONE: Any = object()  # queue sentinel: the run's future finished
_REGISTER_AFTER_S = 0.2  # runs still going after this long are listed on the scheduler
# Cancelling a run waits this long for the worker's thread to notice before the error is raised anyway.
_CANCEL_GRACE_S = 5.0
_TERMINAL = ENDED_STATES


class _Submission:
    """One submitted run seen from the notebook: its future, its stream queue, what it showed so far."""

    def __init__(self, session: Session, spec: RunSpec, placement: dict[str, Any], progress: Progress,
                 echo: bool, pinned: str | None) -> None:
        self.session, self.client, self.spec = session, session.client, spec
        self.run_id = spec["run_id"]
        self.progress, self.echo, self.pinned = progress, echo, pinned
        self.queue = session.streams.open(self.run_id)
        self.key = run_key(self.run_id, uuid.uuid4().hex[:6])
        self.future: Any = None
        limits = [x for x in (spec.get("timeout"), spec.get("max_runtime")) if x]
        self.timeout = min(limits) if limits else None
        self.seen = 0
        self.started: dict[str, Any] = {}
        self.shown: list[dict[str, Any]] = []  # what the cell printed and displayed, for a cache hit's replay
        self._gone_since: float | None = None

    def submit(self, args: dict[str, Any], placement: dict[str, Any]) -> None:
        with warnings.catch_warnings():  # a large inline input is the user's choice (--inputs)
            warnings.filterwarnings("ignore", message=".*Large object.*")
            warnings.filterwarnings("ignore", message=".*Sending large graph.*")
            self.future = self.client.submit(remote_run_cell, self.spec, args, key=self.key, pure=False, **placement)
        self.future.add_done_callback(lambda _: self.queue.put(_DONE))  # wakes `wait` the moment it finishes

    def cancel(self, timed_out: bool = False) -> None:
        """Cancel the run's task; the worker's CancelOnRelease plugin then stops the cell's thread."""
        cancel(self.client, self.future, self.run_id, timed_out=timed_out)

    def release(self) -> None:
        if self.future is not None:
            self.future.release()

    def register(self) -> None:
        """List the run on the scheduler (`depin jobs`)."""
        register_job(self.client, self.run_id, self.key, self.spec.get("name", "cell"))

    def _on_message(self, msg: dict[str, Any]) -> None:
        self.seen += 1
        if msg.get("kind") == "start":
            self.started = msg
            self.progress.update("running", f"on {msg.get('name') or msg.get('worker')} ({msg.get('worker')})")
            return
        if self.echo:
            emit(msg)
        self.shown.append(msg)

    def _check_pinned(self) -> None:
        """Dask would wait forever for a pinned worker that left: this replica has no vote. (Asked twice,
        2 s apart and uncached: a busy scheduler's answer can lag.)"""
        if not self.pinned or self.pinned in {w.address for w in self.session.workers(max_age=1.0)}:
            self._gone_since = None
            return
        self._gone_since = self._gone_since or time.monotonic()
        if time.monotonic() - self._gone_since >= 2.0 and \
                self.pinned not in {w.address for w in self.session.workers(max_age=0)}:
            self.cancel()
            raise WorkerLostError(f"worker {self.pinned} left before its replica finished")

    def wait(self) -> None:
        """Echo the run's output until its future is done; enforce the pinned worker and the time limit."""
        # The worker stops the cell at the limit, or restarts itself cancel-grace later if the cell is stuck:
        # the notebook waits for either, and gives up on its own only well after that.
        grace = (config.seconds("cancel-grace") or 0.0) + _CANCEL_GRACE_S
        deadline = None if self.timeout is None else time.monotonic() + self.timeout + grace
        submitted, registered = time.monotonic(), False  # listed on the scheduler (`depin jobs`) once it lasts
        while True:
            # Short waits keep Ctrl-C responsive; the done-callback ends the wait without delay.
            wait = 0.5 if registered else _REGISTER_AFTER_S
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            try:
                msg = self.queue.get(timeout=wait)
            except queue.Empty:
                msg = None
            if not registered and time.monotonic() - submitted >= _REGISTER_AFTER_S:
                self.register()
                registered = True
            if msg is _DONE:
                return
            if msg is not None:
                self._on_message(msg)
                continue
            self._check_pinned()
            if deadline is not None and time.monotonic() >= deadline:
                self.cancel(timed_out=True)
                raise CellTimeoutError(
                    f"the cell ran past its time limit ({self.timeout:g}s) and was cancelled, but its worker did "
                    f"not confirm that it stopped (a worker without a nanny cannot be restarted, and a C call "
                    f"there may finish in the background). Raise --timeout or split the work.") from None

    def result(self) -> RunResult:
        """The finished run's result, or the error that says why there is none."""
        from distributed import KilledWorker
        from distributed.client import FutureCancelledError

        try:
            return self.future.result()  # type: ignore[no-any-return]
        except KilledWorker as e:
            last = getattr(e, "last_worker", None)  # the scheduler's record: address and pid
            where = getattr(last, "address", None) or self.started.get("worker")
            pid = getattr(last, "pid", None) or self.started.get("pid")
            death = _why_worker_died(self.client, where, pid, logs=not self.session.untrusted)
            if death.cause == "stuck" and self.timeout is not None:
                raise CellTimeoutError(f"the cell ran past its time limit ({self.timeout:g}s): {death.message}") \
                    from None
            raise WorkerDied(death) from None
        except FutureCancelledError as e:
            if "lost dependencies" in str(e):
                raise InputsLost() from None
            raise RemoteExecutionError(f"the cell was cancelled on the cluster ({e}).") from None
        except InputsLost:
            raise
        except Exception as e:  # noqa: BLE001 - transport failures surface with their cause
            raise RemoteExecutionError(
                f"the cell could not complete on the cluster: {type(e).__name__}: {e}") from None

    def drain(self, expected: int) -> None:
        """Output events travel apart from the result: wait for every one the worker sent."""
        drain_until = time.monotonic() + (config.seconds("stream.drain-timeout") or 0.0)
        while self.seen < expected and time.monotonic() < drain_until:
            try:
                msg = self.queue.get(timeout=max(0.0, drain_until - time.monotonic()))
            except queue.Empty:
                break
            if msg is not _DONE:
                self._on_message(msg)
        if self.seen < expected:
            print(f"depin: {expected - self.seen} output message(s) of the cell did not arrive.", file=sys.stderr)


class _GatewaySubmission(_Submission):
    """A cell on a volunteer network: submitted pickle-free to the coordinator's gateway, which builds the
    task; the notebook holds no Dask future. A watcher thread long-polls the coordinator for the end."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.gateway = Coordinator.of_client(self.client)
        self.detached = False  # a background run: the coordinator keeps it when this client leaves
        self.keep = False  # a map's batch: the coordinator keeps it after handing its result over, until released
        self.final: dict[str, Any] = {}
        self.replication: dict[str, Any] | None = None  # how many volunteers, how close (the coordinator judges)
        self._parts: threading.Thread | None = None  # reads a big result's parts while they arrive
        self._prefetched: bytes | None = None

    def submit(self, args: dict[str, Any], placement: dict[str, Any]) -> None:
        from depin_jupyter.protocol.cells import encode_inputs, encode_spec

        inputs, blob, _ = encode_inputs(args)
        watcher = watcher_of(self.session)  # one long poll for all of this kernel's cells
        watcher.add(self)
        try:
            answer = self.gateway.submit_cell(self.key, encode_spec(self.spec), inputs, blob, placement,
                                              client_id=getattr(self.client, "id", None), detached=self.detached,
                                              replication=self.replication, wait=config.seconds("submit-wait") or 0.0)
        except BaseException as e:
            watcher.remove(self.key)
            if isinstance(e, KeyboardInterrupt):  # interrupted while the coordinator held the reply: it has the cell
                self.cancel()
            raise
        if answer is not None:  # it ended within submit-wait: the answer came with the submission
            watcher.remove(self.key)
            self.ended(answer)
            return
        watcher.submitted(self.key)

    def ended(self, answer: dict[str, Any]) -> None:
        """The coordinator's answer once the cell ended (`kernel.watch`)."""
        self.final = answer
        self.queue.put(_DONE)

    def cancel(self, timed_out: bool = False) -> None:
        watcher_of(self.session).remove(self.key)
        try:
            self.gateway.cancel_cell(self.key)
        except Exception:  # noqa: BLE001, S110 - the coordinator may be gone too; nothing more to do here
            pass

    def release(self) -> None:
        watcher_of(self.session).remove(self.key)

    def register(self) -> None:
        pass  # the coordinator lists gateway runs itself (`depin jobs` with a client token)

    def _on_message(self, msg: dict[str, Any]) -> None:
        if msg.get("kind") == "result-parts":  # the coordinator's word: the result is arriving in parts
            if msg.get("key") == self.key and self._parts is None:
                self._parts = threading.Thread(target=self._prefetch, daemon=True, name="depin-result-parts")
                self._parts.start()
            return
        clean = inert_event(msg)
        if clean is not None:
            super()._on_message(clean)

    def _prefetch(self) -> None:
        """Read the result's parts while the volunteer still sends them (one hop, not store and forward)."""
        try:
            self._prefetched = self.gateway.relay_fetch(self.key)
        except Exception:  # noqa: BLE001 - `result` reads the parts again once the cell has ended
            self._prefetched = None

    def _payload(self) -> bytes | None:
        """The finished run's result: in the answer, read while it arrived, or read in parts now."""
        if self.final.get("payload") is not None or not self.final.get("parts"):
            return self.final.get("payload")
        if self._parts is not None:
            self._parts.join()
            if self._prefetched is not None:
                return self._prefetched
        return self.gateway.payload(self.key, self.final)

    def result(self) -> RunResult:
        from depin_jupyter.protocol import safe_codec
        from depin_jupyter.protocol.payloads import from_payload

        state, text = self.final.get("state"), str(self.final.get("error") or "")
        if state == "cancelled":
            raise RemoteExecutionError("the cell was cancelled on the volunteer network.")
        if state == "lost":
            raise WorkerDied(Death("lost", f"the cell was lost on the volunteer network: {text}.", True))
        if state == "error" and text.startswith("ReplicationError: "):
            from depin_jupyter.protocol.quorum import ReplicationError

            raise ReplicationError(text[len("ReplicationError: "):])
        payload = self._payload() if state == "finished" else None
        if payload is None:
            raise RemoteExecutionError(f"the cell could not run on the volunteer network: {text or state}.")
        try:
            result = from_payload(payload, max_bytes=config.nbytes("coordinator.relay-max-bytes"))
        except safe_codec.DecodeError as e:
            raise RemoteExecutionError(f"the volunteer's result was refused: {e}. Nothing from it was unpickled; "
                                       f"run the cell again (--worker to pick another volunteer).") from None
        err = result.get("error") or {}
        if result.get("status") == "error" and err.get("type") == "InputMissingError":
            raise InputsLost(err.get("message"))  # the run loop sends the inputs again, inline
        if self.final.get("replication"):
            result["replication"] = self.final["replication"]
        value = result.get("value")
        if isinstance(value, RichValue):  # an Out value a volunteer formatted: inert too
            from depin_jupyter.kernel.inert import inert_bundle

            result["value"] = RichValue(*inert_bundle(value.data, value.metadata))
        return result


def watcher_of(session: Session) -> EndWatcher:
    """The session's one watcher of cell ends on a volunteer network (started on first use)."""
    with _watcher_lock:
        if session.end_watcher is None:
            session.end_watcher = EndWatcher(Coordinator.of_client(session.client), session.client)
        return session.end_watcher  # type: ignore[no-any-return]


_watcher_lock = threading.Lock()


def inert_event(msg: Any) -> dict[str, Any] | None:
    """A volunteer's output event made inert before anything shows it (`kernel.inert`); None to drop it."""
    if not isinstance(msg, dict):
        return None
    if msg.get("kind") == "display":
        from depin_jupyter.kernel.inert import inert_bundle

        data, md = inert_bundle(msg.get("data"), msg.get("metadata"))
        return {**msg, "data": data, "metadata": md}
    if msg.get("kind") in ("stdout", "stderr") and not isinstance(msg.get("text"), str):
        return None
    return msg


class DetachedRun:
    """A background cell on a volunteer network, held by the coordinator (it outlives this kernel's
    connection); the future-like face `kernel.background` needs: done, status, result, release."""

    def __init__(self, run: _GatewaySubmission) -> None:
        self._run = run
        self.queue = run.queue

    def done(self) -> bool:
        return bool(self._run.final)

    @property
    def status(self) -> str:
        state = self._run.final.get("state")
        return "finished" if state == "finished" else "pending" if state is None else str(state)

    def result(self) -> RunResult:
        return self._run.result()

    def release(self) -> None:
        self._run.release()

    def cancel(self) -> None:
        self._run.cancel()


def submit_detached(session: Session, spec: RunSpec, args: dict[str, Any], placement: dict[str, Any],
                    replication: dict[str, Any] | None) -> DetachedRun:
    """Submit a background cell to a volunteer network's coordinator without waiting for it."""
    run = _GatewaySubmission(session, spec, placement, Progress(), False, None)
    run.replication, run.detached = replication, True
    run.submit(args, placement)
    return DetachedRun(run)


def submit_and_wait(session: Session, spec: RunSpec, args: dict[str, Any], placement: dict[str, Any],
                    progress: Progress, echo: bool = True, on_submit: Any = None,
                    replication: dict[str, Any] | None = None, detached: bool = False) -> RunResult:
    """Submit the run, echo its live output, and return its result dict (or raise a DepinError).

    ``echo=False`` (extra replicas) drains the run's output without showing it; ``on_submit(run)`` sees
    the submission (its ``key`` and ``cancel()``: to cancel replicas together). ``detached`` (a volunteer
    network): the coordinator keeps the run, and its result after handing it over, when this kernel goes.
    """
    __tracebackhide__ = True
    workers = placement.get("workers") or []
    pinned = workers[0] if on_submit is not None and len(workers) == 1 and \
        not placement.get("allow_other_workers", True) else None
    kind = _GatewaySubmission if session.untrusted else _Submission
    run = kind(session, spec, placement, progress, echo, pinned)
    if isinstance(run, _GatewaySubmission):
        run.replication = replication
        run.detached = run.keep = detached
    run.submit(args, placement)
    if on_submit is not None:
        on_submit(run)
    try:
        run.wait()
        result = run.result()
        run.drain(result.get("stream_count", 0))
        result["shown"] = run.shown
        return result
    except KeyboardInterrupt:
        run.cancel()
        raise
    finally:
        session.streams.close(run.run_id)
        run.release()


def _why_worker_died(client: Any, worker: str | None, pid: int | None, logs: bool = True) -> Death:
    """Ask the cluster why a worker died: memory events on the scheduler, the nanny's exit log line.

    ``logs=False`` on volunteer networks: asking nannies for their logs would dial the volunteers.
    """
    deadline = time.monotonic() + 5.0  # the nanny logs the exit once it notices it; its new worker re-registers
    death = explain_death(worker, pid, [], [])
    while True:
        try:
            events = [e for _, e in client.get_events("worker-restart-memory")]
            got = client.get_worker_logs(nanny=True) if logs else {}
            lines = [msg for entries in got.values() for _, msg in entries]
        except Exception:  # noqa: BLE001 - evidence is best effort
            events, lines = [], []
        death = explain_death(worker, pid, lines, events)
        if death.cause != "lost" or pid is None or time.monotonic() > deadline:
            return death
        time.sleep(0.2)


def cancel(client: Any, future: Any, run_id: str, timed_out: bool) -> None:
    """Cancel the run's task; the worker's CancelOnRelease plugin then stops the cell's thread."""
    try:
        future.cancel(reason="timed out" if timed_out else "interrupted")
    except Exception:  # noqa: BLE001, S110 - the scheduler may be gone too; nothing more to do here
        pass


def _builtin_exception(err: Mapping[str, Any]) -> BaseException | None:
    """A built-in exception rebuilt from its name and message (no unpickling), so `except` clauses work."""
    import builtins

    cls = getattr(builtins, str(err.get("type")), None) if err.get("module") == "builtins" else None
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(err.get("message", ""))
        except Exception:  # noqa: BLE001 - some take other arguments: fall back to the text error
            return None
    return None


def raise_remote(result: RunResult, spec: RunSpec) -> None:
    __tracebackhide__ = True
    err = result["error"]
    where = result.get("worker") or "the worker"
    if result["status"] == "cancelled":
        if err.get("timed_out"):
            flag = err.get("limit", "timeout")
            limit = spec["max_runtime"] if flag == "max-runtime" else spec["timeout"]
            raise CellTimeoutError(f"the cell ran past --{flag} {limit:g}s on {where} and was "
                                   f"cancelled there. Raise --{flag} or make the cell faster.")
        raise RemoteExecutionError(f"the cell was cancelled on {where}.")
    exc = err.get("exception")
    if not isinstance(exc, BaseException):  # it came as text (a volunteer, or it would not pickle)
        exc = _builtin_exception(err) or RemoteCellError(err["type"], err["message"])
    exc.add_note(f"--- remote traceback (%%depin, worker {where}) ---\n{err['traceback'].rstrip()}")
    gpu = (result.get("hardware") or {}).get("gpu")
    hint = explain_exception(err["type"], err["module"], err["message"], result.get("worker"), gpu)
    if hint:
        exc.add_note(hint)
    raise exc
