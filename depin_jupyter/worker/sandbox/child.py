"""The sandboxed child process: read the cell and its inputs, drop privileges, set limits, run it, send frames.

Runs as ``python -m depin_jupyter.worker.sandbox FD``. It imports neither Dask nor distributed (a third of a
second per cell): the inputs are a plain pickle stream (cloudpickle's functions load with `pickle`), results
go through `safe_codec`, and Dask collections a cell computes run on threads here (DASK_SCHEDULER in the
child's environment: no cluster client)."""

from __future__ import annotations

import json
import os
import signal
import struct
import sys
import threading
from typing import Any

from depin_jupyter.protocol.constants import STREAM_TOPIC
from depin_jupyter.worker.sandbox.frames import ENERGY, EVENT, HEADER, PAYLOAD, READY
from depin_jupyter.worker.sandbox.isolation import listdir
from depin_jupyter.worker.sandbox.limits import SandboxError, human_bytes

__all__ = ["main"]


class _Relay:
    """Stands in for the Dask worker inside the child: `log_event` sends stream events to the parent."""

    one_cell_process = True  # this process runs only the cell: its whole CPU time is the cell's (energy.py)

    def __init__(self, fd: int, address: str | None, name: str | None) -> None:
        self.fd, self.address, self.name = fd, address, name
        self.nanny = None
        self._lock = threading.Lock()

    def log_event(self, topic: str, msg: dict[str, Any]) -> None:
        from depin_jupyter.protocol import safe_codec

        if topic != STREAM_TOPIC:
            return
        try:
            data = safe_codec.encode(msg, name="event")
        except Exception:  # noqa: BLE001 - an event that cannot be sent safely is dropped
            data = safe_codec.encode({"kind": "stderr", "text": f"[depin: a {msg.get('kind')} message of the "
                                                              f"cell could not be sent and was dropped]\n"})
        self.send(EVENT, data)

    def get_current_task(self) -> None:
        return None

    def send(self, kind: int, data: bytes) -> None:
        with self._lock:
            _write_all(self.fd, HEADER.pack(len(data), kind))
            _write_all(self.fd, data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while len(view):
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 24))
        if not chunk:
            raise EOFError("the worker closed the sandbox's input early")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _drop_privileges(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise SandboxError("the sandbox could switch back to root after dropping privileges")


def _open_ways(paths: list[str]) -> dict[str, str]:
    """Directories of the Python installation the sandbox user cannot reach (e.g. under a 0700 /root),
    opened while the child is still the worker's user: after the switch it imports through
    ``/proc/self/fd/N`` (a process may always use its own descriptors), which skips the closed ancestors
    and nothing else: the rest of /root stays closed, and the directories themselves keep their modes."""
    ways = {}
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)  # not inherited by what the cell starts
        except OSError:
            continue
        ways[path.rstrip("/") or "/"] = f"/proc/self/fd/{fd}"
    return ways


def _route_imports(ways: dict[str, str]) -> None:
    """Point sys.path and the loaded packages' __path__ at the opened directories."""
    import importlib

    def route(entry: Any) -> Any:
        if not isinstance(entry, str):
            return entry
        best = max((p for p in ways if entry == p or entry.startswith(p + "/")), key=len, default=None)
        return entry if best is None else ways[best] + entry[len(best):]

    sys.path[:] = [route(p) for p in sys.path]
    for module in list(sys.modules.values()):
        path = getattr(module, "__path__", None)
        if isinstance(path, list):
            path[:] = [route(p) for p in path]
    sys.path_importer_cache.clear()
    importlib.invalidate_caches()


def _no_new_privs() -> None:
    """prctl(PR_SET_NO_NEW_PRIVS): setuid programs (sudo, ...) give the cell nothing."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(38, 1, 0, 0, 0)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the worker
    except Exception:  # noqa: BLE001, S110 - best effort: without libc prctl there is nothing to set
        pass


def _vm_size() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _set_limits(control: dict[str, Any]) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if control.get("memory"):
        # On top of what the sandbox's Python and libraries already hold (a few hundred MB).
        limit = _vm_size() + int(control["memory"])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if control.get("cpu_time"):
        used = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        soft = int(used + float(control["cpu_time"])) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 2))  # SIGXCPU at soft, SIGKILL at hard


def _set_process_limit(control: dict[str, Any]) -> None:
    """RLIMIT_NPROC: the user's processes when the cell came (sent with it: a warm child waited) plus its own."""
    import resource

    if control.get("max_processes") is not None and os.getuid() != 0:
        own = len(listdir("/proc/self/task")) or 1
        n = int(control["nproc_base"]) + own + int(control["max_processes"])
        resource.setrlimit(resource.RLIMIT_NPROC, (n, n))


def _annotate(result: dict[str, Any], control: dict[str, Any]) -> None:
    """Name the limit and its setting in errors that a limit caused."""
    err = result.get("error")
    if not err or result.get("status") != "error":
        return
    label = control.get("label")
    if err.get("type") in ("MemoryError", "_ArrayMemoryError") and control.get("memory"):
        err["message"] = (f"the cell used more than {human_bytes(int(control['memory']))} "
                          f"(depin.sandbox.memory) on volunteer {label} and was stopped: {err.get('message')}")
        err["limit"] = "memory"
    elif control.get("max_processes") is not None and (
            (err.get("type") == "BlockingIOError" and "temporarily unavailable" in str(err.get("message")))
            or (err.get("type") == "RuntimeError" and "can't start new thread" in str(err.get("message")))):
        err["message"] = (f"{err.get('message')}: the cell may start at most {control['max_processes']} "
                          f"processes and threads (depin.sandbox.max-processes) on volunteer {label}")
        err["limit"] = "max-processes"
    elif control.get("unreadable") and err.get("type") in ("ModuleNotFoundError", "ImportError", "PermissionError"):
        err["message"] = (f"{err.get('message')} (on volunteer {label} cells run as an unprivileged user who "
                          f"cannot read {', '.join(control['unreadable'][:3])}: the volunteer can install "
                          f"bubblewrap, or Python where other users can read it)")


def main(argv: list[str]) -> None:
    out_fd = int(argv[0])
    os.set_inheritable(out_fd, False)  # what the cell starts does not get the protocol pipe
    # Two frames from the worker: how this child is confined (sent at its start, possibly long before a cell:
    # a warm child), then the cell (spec, where) once there is one; the inputs follow.
    control = json.loads(_read_exact(0, struct.unpack(">Q", _read_exact(0, 8))[0]))
    # Imported (as the worker's user) before the switch and the limits: they are the sandbox's, not the
    # cell's, and without bubblewrap the sandbox user may not be able to read the Python installation.
    # Not Dask or distributed (a third of a second per cell): the inputs are a plain pickle stream
    # (cloudpickle's functions load with `pickle`), results go through safe_codec, and Dask collections a
    # cell computes run on threads here (DASK_SCHEDULER in the child's environment: no cluster client).
    import pickle

    from depin_jupyter.protocol import safe_codec
    from depin_jupyter.protocol.payloads import to_payload
    from depin_jupyter.worker import execute
    from depin_jupyter.worker.output import install

    install(cluster_scheduler=False)
    execute.hardware()
    execute.cell_builtins()
    ways = _open_ways(control.get("unreadable") or []) if control.get("ids") else {}
    if control.get("ids"):
        _drop_privileges(*control["ids"])
    if ways:
        _route_imports(ways)
    _no_new_privs()
    os.chdir(control["scratch"])
    if sys.path and sys.path[0] in ("", "/"):
        sys.path[0] = control["scratch"]
    relay_ = _Relay(out_fd, None, None)
    _set_limits(control)
    relay_.send(READY, b"")
    control.update(json.loads(_read_exact(0, struct.unpack(">Q", _read_exact(0, 8))[0])))
    _set_process_limit(control)
    relay_.address, relay_.name = control["where"]
    spec = control["spec"]
    try:
        blob = _read_exact(0, struct.unpack(">Q", _read_exact(0, 8))[0])
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        received = pickle.loads(blob)  # noqa: S301 - the scientist's inputs, in the scientist's cell's sandbox
        del blob
        inputs = dict(received["inputs"])
        if received.get("blob") is not None:  # what only pickle can carry, opened here and nowhere else
            inputs.update(pickle.loads(received["blob"]))  # noqa: S301 - ditto
        del received
    except MemoryError as e:
        result: dict[str, Any] = {"status": "error", "worker": control["where"][0], "worker_name": control["where"][1],
                  "run_id": spec.get("run_id"), "stream_count": 0,
                  "error": {"type": "MemoryError", "module": "builtins", "message": f"the cell's inputs: {e}",
                            "traceback": ""}}
    else:
        result = dict(execute.run_cell(spec, inputs, worker=relay_, sandboxed=True))
    _annotate(result, control)
    try:
        payload = to_payload(result)
    except MemoryError:
        result = {"status": "error", "worker": control["where"][0], "worker_name": control["where"][1],
                  "run_id": spec.get("run_id"), "stream_count": result.get("stream_count", 0),
                  "error": {"type": "MemoryError", "module": "builtins", "traceback": "", "limit": "memory",
                            "message": f"the cell's results did not fit in {human_bytes(int(control['memory'] or 0))} "
                                       f"(depin.sandbox.memory) on volunteer {control.get('label')} while "
                                       f"being encoded: return less, or raise the limit"}}
        payload = to_payload(result)
    if isinstance(result.get("energy"), dict):
        try:
            relay_.send(ENERGY, safe_codec.encode(result["energy"], name="energy"))
        except Exception:  # noqa: BLE001, S110 - energy is reported when it can be; the result matters
            pass
    relay_.send(PAYLOAD, payload)
    os._exit(0)  # threads the cell left behind do not hold the result back
