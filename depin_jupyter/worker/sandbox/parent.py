"""The worker's side of a sandboxed cell: start the child, feed it, read its frames, enforce its limits."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from depin_jupyter.protocol.payloads import to_payload
from depin_jupyter.protocol.records import RunSpec, error_result
from depin_jupyter.worker.cancel import CellCancelled, CellMaxRuntime, CellTimedOut
from depin_jupyter.worker.runs import ActiveRun, active
from depin_jupyter.worker.sandbox.frames import (
    ENERGY,
    EVENT,
    HEADER,
    MAX_ENERGY_BYTES,
    MAX_EVENT_BYTES,
    PAYLOAD,
    READY,
    STREAM_KINDS,
)
from depin_jupyter.worker.sandbox.isolation import (
    MARKER,
    bwrap_argv,
    child_env,
    kill_marked,
    make_scratch,
    remove_tree,
    target_ids,
    tasks_of,
    unreadable_by_others,
    use_bwrap,
)
from depin_jupyter.worker.sandbox.limits import GiB, Limits, human_bytes
from depin_jupyter.worker.sandbox.reaping import kill, reap, tree_cpu, wait
from depin_jupyter.worker.sandbox.warm import WarmSlot, warm_key, warm_wanted

__all__ = ["run_sandboxed"]


_LOG_FORWARD_BYTES = 64 * 1024  # the child's raw fd 1/2 output copied to the worker's stderr, per cell
_LOG_TAIL_BYTES = 2000
_START_ALLOWANCE_S = 120.0  # the child's own start (imports) before the cell's wall time starts counting
_AFTER_PAYLOAD_S = 2.0  # how long a child may take to exit once it has sent its result


class _NoOutput:
    """The run's entry in the worker's registry of active runs: the child sends its own output, so the
    flusher has nothing to do here; the entry is what lets the worker's cancel reach this thread."""

    def announce(self, after: float = 0.0) -> None:
        pass

    def flush(self, stale_only: bool = False) -> None:
        pass


def _where() -> tuple[Any, Any, Any]:
    """(address, name, worker) of the Dask worker this runs on, or (None, None, None)."""
    try:
        from distributed import get_worker

        w = get_worker()
        return w.address, None if w.name is None else str(w.name), w
    except (ImportError, ValueError):
        return None, None, None


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


class _Child:
    """One cell's child process seen from the worker: how it is confined, what it was sent, what it sent back,
    how it ended. Started (`start`) before or when its cell is known (`assign`); it serves that one cell."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.key = warm_key(limits)
        self.spec: RunSpec = {}  # type: ignore[typeddict-item]  # set by assign
        self.where: tuple[Any, Any] = (None, None)
        self.label = socket.gethostname()
        self.emit: Callable[[dict[str, Any]], None] = lambda msg: None
        self.stats: dict[str, Any] | None = None
        self.run_id: Any = None
        self.bw, _ = use_bwrap(limits)
        self.ids = target_ids(limits)
        self.scratch = make_scratch(limits, self.ids)
        self.marker = os.urandom(8).hex()
        self.proc: subprocess.Popen[bytes] | None = None
        self.pipes: tuple[int, int] | None = None
        self.fds: list[int] = []
        self.forwarded = 0          # stream events passed on to the notebook
        self.log_tail = bytearray()
        self.logged = 0
        self.t0 = time.monotonic()
        self.boot_cpu = 0.0         # what a warm child spent starting before its cell (not the cell's)
        self.tree_cpu = 0.0
        self.ready_at: float | None = None
        self.reason: str | None = None  # why the pump stopped without a payload: wall, start, oversize:...

    def assign(self, spec: RunSpec, limits: Limits, where: tuple[Any, Any], label: str,
               emit: Callable[[dict[str, Any]], None], stats: dict[str, Any] | None) -> None:
        """Give this child its cell (``limits``: the cell's own, which may cap the wall time further)."""
        self.spec, self.limits, self.where, self.label = spec, limits, where, label
        self.emit, self.stats = emit, stats
        self.run_id = spec.get("run_id")
        self.t0 = time.monotonic()
        if self.proc is not None:
            self.boot_cpu = tree_cpu(self.proc.pid)

    def error(self, message: str, **kwargs: Any) -> bytes:
        """A payload reporting a failure outside the cell's code, counting the events already forwarded."""
        kwargs.setdefault("stream_count", self.forwarded)
        return to_payload(error_result(self.spec, self.where, message, module=__name__, **kwargs))

    def control(self) -> dict[str, Any]:
        """How the child is confined (plain JSON), sent when it starts; the cell follows in `cell_head`."""
        ids, limits = self.ids, self.limits
        return {
            "ids": list(ids) if ids else None, "scratch": self.scratch,
            "unreadable": unreadable_by_others() if ids and not self.bw else [],
            "memory": limits.memory, "cpu_time": limits.cpu_time,
        }

    def cell_head(self) -> bytes:
        """The cell's frame: its spec, and where and as whom it runs."""
        limits, uid = self.limits, self.ids[0] if self.ids else os.getuid()
        head = json.dumps({"spec": self.spec, "where": list(self.where), "label": self.label,
                           "max_processes": limits.max_processes,
                           "nproc_base": tasks_of(uid) if limits.max_processes is not None else 0}).encode()
        return struct.pack(">Q", len(head)) + head

    def start(self) -> tuple[int, int]:
        """Start the child (in bubblewrap when used) and send it how it is confined; returns (result pipe,
        log pipe) to read from. Its imports run now: a warm child is ready when its cell comes."""
        if self.pipes is not None:
            return self.pipes
        out_r, out_w = os.pipe()
        log_r, log_w = os.pipe()
        self.fds += [out_r, log_r]
        cmd = [sys.executable, "-s", "-m", "depin_jupyter.worker.sandbox", str(out_w)]
        argv = (bwrap_argv(self.scratch, self.limits, self.ids) if self.bw else []) + cmd
        try:
            env = child_env(self.scratch)
            env[MARKER] = self.marker
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log_w, stderr=log_w,
                                         pass_fds=(out_w,), cwd=self.scratch, env=env, start_new_session=True,
                                         close_fds=True)
        finally:
            os.close(out_w)
            os.close(log_w)
        for fd in (out_r, log_r):
            os.set_blocking(fd, False)
        head = json.dumps(self.control()).encode()
        assert self.proc.stdin is not None
        try:  # small: the pipe takes it at once
            self.proc.stdin.write(struct.pack(">Q", len(head)) + head)
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the child died at once: the pump finds out and says why
        self.pipes = (out_r, log_r)
        return out_r, log_r

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _wall_left(self) -> float | None:
        if self.limits.wall_time is None:
            return None
        begun = self.ready_at if self.ready_at is not None else self.t0 + _START_ALLOWANCE_S
        return begun + self.limits.wall_time - time.monotonic()

    def _on_log(self, chunk: bytes) -> None:
        if self.logged < _LOG_FORWARD_BYTES:
            _to_stderr(chunk[:_LOG_FORWARD_BYTES - self.logged])
        self.logged += len(chunk)
        self.log_tail += chunk
        del self.log_tail[:-_LOG_TAIL_BYTES]

    def _on_frame(self, kind: int, data: bytes) -> bytes | None:
        """Handle one frame from the child; the payload when this frame is it."""
        if kind == READY and self.ready_at is None:
            self.ready_at = time.monotonic()
        elif kind == EVENT:
            msg = _decode_event(data, self.run_id, self.where)
            if msg is not None:
                self.forwarded += 1
                self.emit(msg)
        elif kind == ENERGY and self.stats is not None and len(data) <= MAX_ENERGY_BYTES:
            energy = _decode_energy(data)
            if energy is not None:
                self.stats["energy"] = energy
        elif kind == PAYLOAD:
            return data
        return None

    def _frames(self, buf: bytearray, max_payload: int) -> bytes | None:
        """Consume the complete frames in ``buf``; the payload if one arrived (or None, maybe with a reason)."""
        while len(buf) >= HEADER.size:
            size, kind = HEADER.unpack_from(buf)
            cap = max_payload if kind == PAYLOAD else MAX_EVENT_BYTES
            if size > cap:
                self.reason = f"oversize:{size}:{cap}"
                return None
            if len(buf) < HEADER.size + size:
                return None
            data = bytes(buf[HEADER.size:HEADER.size + size])
            del buf[:HEADER.size + size]
            payload = self._on_frame(kind, data)
            if payload is not None:
                return payload
        return None

    def pump(self, out_r: int, log_r: int, to_child: list[memoryview]) -> bytes | None:
        """Feed the child its input while reading its frames and log, until its payload, its end or a limit."""
        assert self.proc is not None and self.proc.stdin is not None
        stdin_fd = self.proc.stdin.fileno()
        os.set_blocking(stdin_fd, False)
        buf = bytearray()
        open_fds = {out_r, log_r}
        max_payload = _payload_cap()
        while out_r in open_fds:
            wall_left = self._wall_left()
            if wall_left is not None and wall_left <= 0:
                self.reason = "wall" if self.ready_at is not None else "start"
                return None
            r, w, _ = select.select(list(open_fds), [stdin_fd] if to_child else [], [],
                                    0.1 if wall_left is None else min(0.1, wall_left))
            if w:
                _feed(stdin_fd, to_child)
                if not to_child:
                    self.proc.stdin.close()
            if log_r in r:
                chunk = _read(log_r)
                if chunk is None:
                    open_fds.discard(log_r)
                else:
                    self._on_log(chunk)
            if out_r in r:
                chunk = _read(out_r, 64 * 2**20)
                if chunk is None:
                    open_fds.discard(out_r)
                    continue
                buf += chunk
                payload = self._frames(buf, max_payload)
                if payload is not None or self.reason:
                    return payload
        return None

    def no_result(self) -> bytes:
        """The payload for a child that sent no result: it died, or a limit stopped it."""
        assert self.proc is not None
        if self.reason is None:  # the pipe closed: the child is exiting
            wait(self.proc, 5.0)
        kill(self.proc)
        usage = reap(self.proc)
        cpu_used = None if usage is None else usage.ru_utime + usage.ru_stime
        msg, limit, timed_out = _explain(self.reason, self.proc.returncode, self.limits, self.label, self.bw,
                                         bytes(self.log_tail), cpu_used)
        return self.error(msg, limit=limit, timed_out=timed_out)

    def cancelled(self, exc: CellCancelled) -> bytes:
        if self.proc is not None:
            kill(self.proc)
        timed_out = isinstance(exc, CellTimedOut)
        return self.error(f"the cell was {'stopped by its time limit' if timed_out else 'cancelled'} on "
                          f"volunteer {self.label}", type_name=type(exc).__name__, status="cancelled",
                          limit="max-runtime" if isinstance(exc, CellMaxRuntime) else "timeout",
                          timed_out=timed_out)

    def close(self) -> None:
        """Kill what is left of the child, measure it, and remove its scratch directory."""
        proc = self.proc
        if proc is not None:
            kill(proc)
            usage = reap(proc)
            if not self.bw:
                kill_marked(self.marker, self.ids[0] if self.ids else os.getuid())
            if self.stats is not None:
                self._measure(usage)
            if proc.stdin and not proc.stdin.closed:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        remove_tree(self.scratch)

    def _measure(self, usage: Any) -> None:
        assert self.stats is not None
        stats = self.stats
        stats["wall_seconds"] = time.monotonic() - self.t0
        if usage is None:
            return
        # wait4 sees only what bwrap reaped; the tree measured when the result arrived sees the cell's
        # process unless it had already exited (then it is gone from the tree, and bwrap's pid 1 may be
        # killed before reaping it). The child's own figure (its energy frame) covers that race, capped by
        # what its cores could have done in the wall time.
        own = (stats.get("energy") or {}).get("cpu_seconds")
        own = min(float(own), stats["wall_seconds"] * (os.cpu_count() or 1)) \
            if isinstance(own, (int, float)) and own > 0 else 0.0
        stats["cpu_seconds"] = max(usage.ru_utime + usage.ru_stime - self.boot_cpu, self.tree_cpu - self.boot_cpu,
                                   own, 0.0)
        stats["max_rss"] = usage.ru_maxrss * 1024


def _feed(fd: int, pending: list[memoryview]) -> None:
    """Write what the non-blocking pipe takes of ``pending`` (consumed from the front)."""
    try:
        while pending:
            n = os.write(fd, pending[0][:1 << 20])
            pending[0] = pending[0][n:]
            if not len(pending[0]):
                pending.pop(0)
    except BlockingIOError:
        pass
    except BrokenPipeError:
        pending.clear()


def run_sandboxed(spec: RunSpec, inputs: dict[str, Any], *, emit: Callable[[dict[str, Any]], None],
                  limits: Limits | None = None, stats: dict[str, Any] | None = None,
                  blob: bytes | None = None, warm: bool | None = None) -> bytes:
    """Run the cell ``spec`` with ``inputs`` in a sandboxed child; return its `protocol.payloads` bytes.

    ``emit(msg)`` receives the cell's stream events (stdout, stderr, display, start), decoded with
    `safe_codec` only; connect it to ``worker.log_event(STREAM_TOPIC, msg)``. ``limits`` defaults to
    `Limits.from_config()`; the cell's --timeout/--max-runtime cap its wall time either way. ``stats``, if
    given, is filled with what the worker measured: ``cpu_seconds`` (the child's user+system time, e.g. for
    credit; where the child exited before its tree could be read, its own figure, at most its cores x the
    wall time), ``wall_seconds``, ``max_rss`` (bytes); and ``energy``, the child's own `energy.measure`
    figures (numbers and short text only, decoded with `safe_codec`), so the coordinator's ledger can total
    energy per volunteer without decoding the result.

    ``blob``: more inputs as pickle bytes, opened only inside the child (what a client sent that only
    pickle can carry: the worker itself never unpickles it).

    ``warm``: take a child started ahead for these limits (imports done, never used by any cell) and start
    the next one beside this cell, so a child's start leaves the cell's path; None: in a Dask worker when
    ``depin.sandbox.warm`` is on (the default). ``stats["warm"]`` says whether this cell got one.

    Limits that stop the cell, and a sandbox that cannot start, come back as a payload with status
    "error" and a message naming the setting. A cancel of the run (`worker.cancel.cancel_run`, the worker's
    cancel plugin) kills the child and returns status "cancelled". Raises `SandboxError` only for a
    configuration that cannot work (``bubblewrap: true`` without bwrap, an unknown ``user``, an
    unwritable ``scratch-root``).
    """
    base = limits or Limits.from_config()
    limits = base.for_spec(spec)
    address, name, worker = _where()
    use_warm = warm_wanted(warm, worker)
    child = (_WARM.take(base) if use_warm else None) or _Child(base)
    if stats is not None:
        stats["warm"] = child.pipes is not None
    child.assign(spec, limits, (address, name), name or address or socket.gethostname(), emit, stats)
    if use_warm:
        _WARM.refill(base)  # the next cell's child starts now, beside this one
    key = worker.get_current_task() if worker is not None else None
    run_id = str(spec.get("run_id"))
    active.add(run_id, ActiveRun(_NoOutput(), threading.get_ident(), worker), key)
    try:
        try:
            stream = _cloudpickle({"inputs": inputs, "blob": blob})
        except Exception as e:  # noqa: BLE001 - reported to the scientist
            return child.error(f"the cell's inputs could not be passed to the sandbox on volunteer {child.label}: "
                               f"{type(e).__name__}: {e}", type_name="SandboxError")
        try:
            head = child.cell_head()
        except (TypeError, ValueError) as e:
            return child.error(f"the cell's spec is not plain data: {e}", type_name="SandboxError")
        out_r, log_r = child.start()
        to_child = [memoryview(head + struct.pack(">Q", len(stream))), memoryview(stream)]
        del stream
        payload = child.pump(out_r, log_r, to_child)
        if payload is None:
            return child.no_result()
        assert child.proc is not None
        child.tree_cpu = tree_cpu(child.proc.pid)  # the cell's process is still alive: measure it from here
        wait(child.proc, _AFTER_PAYLOAD_S)
        return payload
    except CellCancelled as exc:  # the worker cancelled the run (interrupt, --timeout, client gone)
        return child.cancelled(exc)
    finally:
        active.remove(run_id, key)
        child.close()


def _start_child(limits: Limits) -> _Child:
    child = _Child(limits)
    child.start()
    return child


_WARM = WarmSlot(_start_child)


def _cloudpickle(obj: Any) -> bytes:
    """``obj`` as one pickle stream the child loads with plain `pickle` (cloudpickle: functions and classes
    a trusted caller passes travel by value)."""
    from distributed.protocol import pickle as dpickle

    return bytes(dpickle.dumps(obj, protocol=5))


def _payload_cap() -> int:
    try:
        import dask.config
        import dask.utils

        return int(dask.utils.parse_bytes(dask.config.get("depin.coordinator.relay-max-bytes", "1GiB")))
    except Exception:  # noqa: BLE001
        return GiB


def _read(fd: int, n: int = 65536) -> bytes | None:
    """What is there to read (b"" if nothing yet), or None at end of file."""
    try:
        data = os.read(fd, n)
    except BlockingIOError:
        return b""
    except OSError:
        return None
    return data if data else None


def _to_stderr(chunk: bytes) -> None:
    try:
        stream = sys.__stderr__
        if stream is not None:
            stream.write(chunk.decode(errors="replace"))
            stream.flush()
    except (OSError, ValueError):
        pass


def _decode_event(data: bytes, run_id: Any, where: tuple[Any, Any]) -> dict[str, Any] | None:
    """A stream event from the child, decoded without unpickling; None if it is not one."""
    from depin_jupyter.protocol import safe_codec

    try:
        msg = safe_codec.decode(data, max_bytes=MAX_EVENT_BYTES)
    except safe_codec.DecodeError:
        return None
    if not isinstance(msg, dict) or msg.get("kind") not in STREAM_KINDS or not all(isinstance(k, str) for k in msg):
        return None
    msg["run"] = run_id  # the child speaks for its own run only
    if msg["kind"] == "start":  # where it runs is the worker's to say (the notebook uses the pid to explain a death)
        msg.update(worker=where[0], name=where[1], pid=os.getpid())
    return msg


def _decode_energy(data: bytes) -> dict[str, Any] | None:
    """The child's energy figures: a flat dict of str -> number/short str, else None (and it is dropped)."""
    from depin_jupyter.protocol import safe_codec

    try:
        msg = safe_codec.decode(data, max_bytes=MAX_ENERGY_BYTES)
    except safe_codec.DecodeError:
        return None
    if not isinstance(msg, dict):
        return None
    ok = (int, float, str, type(None))
    return {k: v for k, v in msg.items() if isinstance(k, str) and isinstance(v, ok)
            and not isinstance(v, bool) and (not isinstance(v, str) or len(v) <= 500)}


def _explain(reason: str | None, status: int | None, limits: Limits, label: str, bw: bool,
             log_tail: bytes, cpu_used: float | None) -> tuple[str, str, bool]:
    """(message, limit, timed_out) for a child that sent no result."""
    if reason == "wall":
        msg = (f"the cell ran longer than {limits.wall_time:g}s ({limits.wall_source}; the sandbox limit is "
               f"depin.sandbox.wall-time) on volunteer {label} and was stopped")
        return msg, "wall-time", True
    if reason == "start":
        msg = f"the sandbox on volunteer {label} did not start the cell in time and was stopped"
        return msg + _tail(log_tail), "sandbox", False
    if reason and reason.startswith("oversize:"):
        _, size, cap = reason.split(":")
        msg = (f"the cell's result ({human_bytes(int(size))}) is larger than the relay accepts "
               f"({human_bytes(int(cap))}, depin.coordinator.relay-max-bytes) on volunteer {label}; it was "
               f"stopped")
        return msg, "relay-max-bytes", False
    sig = None
    if status is not None and status < 0:
        sig = -status
    elif bw and status is not None and status > 128:
        sig = status - 128
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and limits.cpu_time is not None
                                 and cpu_used is not None and cpu_used >= limits.cpu_time):
        msg = (f"the cell used more than {limits.cpu_time:g}s of CPU time (depin.sandbox.cpu-time) on "
               f"volunteer {label} and was stopped")
        return msg, "cpu-time", False
    if sig == signal.SIGKILL:
        mem = (f"lower depin.sandbox.memory (now {human_bytes(limits.memory)})" if limits.memory else
               "set depin.sandbox.memory")
        msg = (f"the cell's process on volunteer {label} was killed (SIGKILL), most likely because the "
               f"machine ran out of memory: use less memory, or {mem} so that the cell gets a MemoryError first")
        return msg, "memory", False
    if sig is not None:
        msg = f"the cell's process crashed on volunteer {label} ({_signal_name(sig)})"
        return msg + _tail(log_tail), "sandbox", False
    msg = f"the sandbox on volunteer {label} ended without a result (exit status {status})"
    return msg + _tail(log_tail), "sandbox", False


def _tail(log: bytes) -> str:
    text = log.decode(errors="replace").strip()
    return f". Its last output:\n{text[-_LOG_TAIL_BYTES:]}" if text else ""
