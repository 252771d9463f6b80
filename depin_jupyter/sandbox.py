"""The volunteer-side sandbox: each cell runs in a child process with limits, in a scratch directory.

A volunteer's worker runs code written by strangers. `run_sandboxed` executes one cell in a child
process (``python -m depin_jupyter.sandbox``) and returns the pickle-free result payload the child
produced (`relay.to_payload`). The worker never unpickles anything the child sends: the child talks
over a private pipe in length-prefixed frames (stream events, the cell's energy figures, then the
payload), each a `safe_codec` encoding; the worker decodes the events and the energy figures with
`safe_codec.decode` and passes the payload on as bytes.
What the child prints from C code (fd 1/2) goes to the worker's stderr, never into that pipe.

Protection, strongest available first (`describe` says what is active on this machine):

* bubblewrap (``bwrap``): the whole file system read-only, the home directories, /root, /run, /media,
  /mnt and /tmp hidden (the Python installation is bound back read-only), a private /tmp, /dev and
  /proc, no network (``depin.sandbox.network``), its own PID namespace: when the cell ends every
  process it started ends too.
* a separate user: a worker running as root runs the cell as ``depin.sandbox.user`` (nobody), so
  root's files are out of reach, `RLIMIT_NPROC` applies and setuid programs give nothing back
  (no_new_privs).
* rlimits set in the child before the cell runs: address space (``memory``), CPU time
  (``cpu-time``), processes and threads (``max-processes``); the parent enforces the wall time
  (``wall-time``) by killing the child's process group.
* a minimal environment (no inherited secrets), HOME and TMPDIR in a fresh 0700 scratch directory that
  is removed afterwards.

Every limit that stops a cell comes back as the cell's error, naming the limit and the setting to
change; the worker process itself carries on with the next cell.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Limits", "SandboxError", "describe", "run_sandboxed"]

# Frames child -> parent: 4-byte big-endian length, 1 kind byte, then the data.
_HDR = struct.Struct(">IB")
_READY, _EVENT, _PAYLOAD, _ENERGY = 1, 2, 3, 4
_MAX_ENERGY_BYTES = 64 * 1024
_MAX_EVENT_BYTES = 64 * 2**20
_STREAM_KINDS = frozenset({"start", "stdout", "stderr", "display"})
_LOG_FORWARD_BYTES = 64 * 1024  # the child's raw fd 1/2 output copied to the worker's stderr, per cell
_LOG_TAIL_BYTES = 2000
_START_ALLOWANCE_S = 120.0  # the child's own start (imports) before the cell's wall time starts counting
_AFTER_PAYLOAD_S = 2.0  # how long a child may take to exit once it has sent its result
_DEFAULT_WALL = 3600.0
_GiB = 2**30
_MARKER = "DEPIN_SANDBOX_RUN"

# Environment the child inherits, if set; everything else (tokens, AWS_*, DASK_*, ...) is dropped.
_ENV_PASS = ("PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_NUMERIC", "TZ", "TERM",
             "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES", "CUDA_HOME",
             "CUDA_PATH", "LD_LIBRARY_PATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
             "NUMBA_NUM_THREADS", "MPLBACKEND")
# Hidden inside bubblewrap (each replaced by an empty tmpfs), besides the worker's own $HOME.
_HIDDEN = ("/home", "/root", "/run", "/media", "/mnt", "/tmp", "/var/tmp")
_GPU_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset", "/dev/dri")


class SandboxError(RuntimeError):
    """The sandbox could not be set up as configured (e.g. ``bubblewrap: true`` without a working bwrap)."""


# ---------------------------------------------------------------- settings

def _bool_or_auto(value: Any, key: str) -> bool | str:
    if value is None or value == "auto":
        return "auto"
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "false", "no", "off"):
        return value.lower() in ("true", "yes", "on")
    raise ValueError(f"depin.sandbox.{key} must be true, false or auto, not {value!r}")


def _gpu_host() -> bool:
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0"))


def _auto_memory() -> int | None:
    """8 GiB or 3/4 of the machine's memory, whichever is smaller; none where a GPU is present (CUDA
    reserves far more virtual address space than it uses, so RLIMIT_AS would break it)."""
    if _gpu_host():
        return None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 16 * _GiB
    return int(min(8 * _GiB, total * 3 // 4))


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one sandboxed cell may use (``depin.sandbox.*``); None means no limit."""

    enabled: bool | str = "auto"       # auto: the caller decides (on for volunteer workers)
    memory: int | None = 8 * _GiB      # bytes of address space the cell may add (RLIMIT_AS)
    wall_time: float | None = _DEFAULT_WALL  # seconds; also capped by the cell's --timeout/--max-runtime
    cpu_time: float | None = None      # seconds of CPU (RLIMIT_CPU)
    max_processes: int | None = 256    # processes and threads the cell may add (RLIMIT_NPROC)
    bubblewrap: bool | str = "auto"    # auto: use bwrap when it is on PATH and works; True: require it
    scratch_root: str | None = None    # where per-cell scratch directories are made (None: the temp dir)
    user: str | int | None = "nobody"  # a root worker runs cells as this user; None: never switch
    network: bool = False              # inside bubblewrap: False gives the cell no network at all
    wall_source: str = "depin.sandbox.wall-time"  # what set wall_time (for the message when it stops a cell)

    @classmethod
    def from_config(cls, spec: dict[str, Any] | None = None) -> Limits:
        """The limits from ``depin.sandbox.*`` (defaults where unset), narrowed by ``spec``'s timeouts."""
        import dask
        import dask.config

        cfg = dask.config.get("depin.sandbox", default={}) or {}
        memory = cfg.get("memory", "auto")
        if memory == "auto":
            memory_b = _auto_memory()
        elif memory is None or memory is False or str(memory).lower() in ("null", "none", "false"):
            memory_b = None
        else:
            memory_b = int(dask.utils.parse_bytes(memory))
        wall = cfg.get("wall-time", "1h")
        cpu = cfg.get("cpu-time")
        nproc = cfg.get("max-processes", 256)
        limits = cls(
            enabled=_bool_or_auto(cfg.get("enabled", "auto"), "enabled"),
            memory=memory_b,
            wall_time=None if wall is None else float(dask.utils.parse_timedelta(wall, default="s")),
            cpu_time=None if cpu is None else float(dask.utils.parse_timedelta(cpu, default="s")),
            max_processes=None if nproc is None else int(nproc),
            bubblewrap=_bool_or_auto(cfg.get("bubblewrap", "auto"), "bubblewrap"),
            scratch_root=cfg.get("scratch-root"),
            user=cfg.get("user", "nobody"),
            network=bool(cfg.get("network", False)),
        )
        return limits.for_spec(spec) if spec else limits

    def for_spec(self, spec: dict[str, Any]) -> Limits:
        """These limits with the wall time capped by the cell's own --timeout/--max-runtime plus the
        cancel grace (the cell's own timer stops it first; the sandbox kills it if a C call holds on)."""
        import dask
        import dask.config

        grace = float(dask.utils.parse_timedelta(dask.config.get("depin.cancel-grace", "3s"), default="s"))
        wall, source = self.wall_time, self.wall_source
        for key, flag in (("timeout", "--timeout"), ("max_runtime", "--max-runtime")):
            value = spec.get(key)
            if value and (wall is None or value + grace < wall):
                wall, source = float(value) + grace, f"the cell's {flag} {value:g}s plus {grace:g}s grace"
        return dataclasses.replace(self, wall_time=wall, wall_source=source)

    def is_enabled(self, volunteer: bool) -> bool:
        """Whether cells run sandboxed: ``enabled`` itself, or for "auto" on volunteer workers only."""
        return volunteer if self.enabled == "auto" else bool(self.enabled)


def _human_bytes(n: int) -> str:
    for unit, size in (("GiB", _GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


# ---------------------------------------------------------------- who the child runs as, and where

def _target_ids(limits: Limits) -> tuple[int, int] | None:
    """(uid, gid) a root worker switches the child to, or None (not root, or ``user: null``)."""
    if os.geteuid() != 0 or limits.user is None or limits.user is False:
        return None
    import pwd

    user = limits.user
    try:
        entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(str(user))
        uid, gid = entry.pw_uid, entry.pw_gid
    except KeyError:
        if user not in ("nobody", 65534):
            raise SandboxError(f"depin.sandbox.user: no user {user!r} on this machine") from None
        uid = gid = 65534
    if uid == 0:
        raise SandboxError("depin.sandbox.user must not be root (uid 0)")
    return uid, gid


def _home() -> str | None:
    homes = {os.path.expanduser("~")}
    try:
        import pwd

        homes.add(pwd.getpwuid(os.geteuid()).pw_dir)
    except KeyError:
        pass
    homes = {os.path.realpath(h) for h in homes if h and os.path.isdir(h)}
    homes.discard("/")
    return min(homes) if homes else None


def _python_paths() -> list[str]:
    """What the child needs to import depin_jupyter and the worker's packages."""
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [pkg_parent]
    for p in sys.path:
        if not p or "depin-modules" in p:  # '' is the worker's cwd; depin-modules: the worker's own bundles
            continue
        p = os.path.abspath(p)
        if p not in paths and os.path.exists(p):
            paths.append(p)
    return paths


def _needed_mounts() -> list[str]:
    """Paths of the Python installation, bound back read-only where bubblewrap hides their parents."""
    paths = set(_python_paths())
    paths.update({sys.prefix, sys.base_prefix, sys.exec_prefix,
                  os.path.dirname(os.path.realpath(sys.executable)), os.path.dirname(sys.executable)})
    return sorted(p for p in paths if p and os.path.exists(p))


def _unreadable_by_others() -> list[str]:
    """Parts of the Python installation a switched-to user cannot read without bubblewrap (e.g. a
    Python under /root): cells can then use only the modules the sandbox imported beforehand."""
    bad = []
    for p in _needed_mounts():
        path = p
        while True:
            try:
                mode = os.stat(path).st_mode
            except OSError:
                break
            if not mode & stat.S_IXOTH or (path == p and not mode & stat.S_IROTH):
                bad.append(p)
                break
            if path == "/":
                break
            path = os.path.dirname(path)
    return bad


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _bwrap_argv(scratch: str, limits: Limits, ids: tuple[int, int] | None) -> list[str]:
    argv = [shutil.which("bwrap") or "bwrap", "--die-with-parent", "--new-session", "--unshare-pid",
            "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if not limits.network:
        argv.append("--unshare-net")
    if os.geteuid() == 0:
        # A privileged bwrap keeps root's capabilities: keep only what the child needs to switch to
        # the sandbox user (it does so before anything else, and sets no_new_privs).
        argv += ["--cap-drop", "ALL"]
        if ids is not None:
            argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv.append("--unshare-user")
    sticky = ["--perms", "01777"] if _bwrap_has("--perms") else []  # bwrap >= 0.5
    argv += ["--ro-bind", "/", "/", "--dev", "/dev", *sticky, "--tmpfs", "/dev/shm", "--proc", "/proc"]
    for dev in _GPU_DEVICES + tuple(sorted(f"/dev/{d}" for d in _listdir("/dev") if d[6:].isdigit()
                                           and d.startswith("nvidia"))):
        if os.path.exists(dev):
            argv += ["--dev-bind-try", dev, dev]
    hidden = [h for h in _HIDDEN if os.path.isdir(h) and not os.path.islink(h)]
    home = _home()
    if home and not any(_under(home, h) for h in hidden):
        hidden.append(home)
    for h in hidden:
        argv += (sticky if h in ("/tmp", "/var/tmp") else []) + ["--tmpfs", h]
    # bwrap would make the missing parents of these binds 0700: make them 0755 (--dir), so the
    # sandbox user can reach the Python installation.
    bound: list[str] = []
    made: set[str] = set()
    for p in _needed_mounts():  # sorted: parents before children
        top = next((h for h in hidden if _under(p, h)), None)
        if top is None or _under(p, scratch) or any(_under(p, b) for b in bound):
            continue
        parts = os.path.relpath(p, top).split(os.sep)[:-1]
        for i in range(1, len(parts) + 1):
            ancestor = os.path.join(top, *parts[:i])
            if ancestor not in made:
                argv += ["--dir", ancestor]
                made.add(ancestor)
        argv += ["--ro-bind-try", p, p]
        bound.append(p)
    # A root bwrap without capabilities cannot enter the sandbox user's 0700 scratch: the child does,
    # once it is that user.
    argv += ["--bind", scratch, scratch, "--chdir", "/" if ids is not None else scratch, "--"]
    return argv


@functools.cache
def _bwrap_has(option: str) -> bool:
    try:
        out = subprocess.run(["bwrap", "--help"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return option.encode() in out.stdout + out.stderr


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


@functools.lru_cache(maxsize=8)
def _bwrap_works(network: bool, user: Any) -> tuple[bool, str]:
    """Whether bubblewrap runs here with the options a cell gets: (works, why not / what)."""
    if not shutil.which("bwrap"):
        return False, "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    limits = Limits(network=network, user=user)
    try:
        ids = _target_ids(limits)
    except SandboxError as e:
        return False, str(e)
    scratch = tempfile.mkdtemp(prefix="depin-probe-")
    try:
        argv = _bwrap_argv(scratch, limits, ids) + [sys.executable, "-S", "-c", "pass"]
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            return False, f"bwrap failed to start: {e}"
        if proc.returncode != 0:
            why = proc.stderr.decode(errors="replace").strip().splitlines()
            return False, f"bwrap does not work here ({why[-1] if why else f'exit {proc.returncode}'})"
        return True, f"bubblewrap {_bwrap_version()}"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _bwrap_version() -> str:
    try:
        out = subprocess.run(["bwrap", "--version"], capture_output=True, timeout=10, check=False).stdout.decode().split()
        return out[-1] if out else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def _use_bwrap(limits: Limits) -> tuple[bool, str]:
    if limits.bubblewrap is False:
        return False, "off (depin.sandbox.bubblewrap: false)"
    works, why = _bwrap_works(limits.network, limits.user)
    if not works and limits.bubblewrap is True:
        raise SandboxError(f"depin.sandbox.bubblewrap is true but {why}")
    return works, why


def _tasks_of(uid: int) -> int:
    """Processes and threads of ``uid`` on this machine now (what RLIMIT_NPROC counts)."""
    count = 0
    for pid in _listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                count += int(fields.get("Threads", "1"))
        except (OSError, KeyError, ValueError):
            continue
    return count


def _kill_marked(marker: str, uid: int) -> None:
    """SIGKILL this run's processes that left its process group (setsid), found by the marker in their
    environment: without bubblewrap's PID namespace this is best effort (a cell can clear its environment)."""
    needle = f"{_MARKER}={marker}".encode()
    for _ in range(3):
        found = False
        for pid in _listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                if os.stat(f"/proc/{pid}").st_uid != uid:
                    continue
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if needle not in f.read().split(b"\0"):
                        continue
                os.kill(int(pid), signal.SIGKILL)
                found = True
            except (OSError, ValueError):
                continue
        if not found:
            return


def _child_env(scratch: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in _ENV_PASS if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.setdefault("LANG", "C.UTF-8")
    env.update(HOME=scratch, TMPDIR=scratch, PYTHONPATH=os.pathsep.join(_python_paths()),
               PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1",
               DASK_SCHEDULER="threads")  # Dask collections a cell computes: on its own threads
    return env


def _make_scratch(limits: Limits, ids: tuple[int, int] | None) -> str:
    root = os.path.expanduser(limits.scratch_root) if limits.scratch_root else tempfile.gettempdir()
    try:
        if not os.path.isdir(root):
            os.makedirs(root, mode=0o711, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix="depin-cell-", dir=root)
        os.chmod(scratch, 0o700)
        if ids is not None:
            os.chown(scratch, *ids)
    except OSError as e:
        raise SandboxError(f"cannot make the cell's scratch directory under {root} "
                           f"(depin.sandbox.scratch-root): {e}") from e
    return scratch


def _remove_tree(path: str) -> None:
    def fix(func: Any, p: str, _exc: Any) -> None:  # a cell may have left directories without permissions
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=fix)
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- describe

def describe(limits: Limits | None = None) -> dict[str, Any]:
    """What protection a sandboxed cell gets on this machine, for the volunteer's startup message.

    Keys: enabled, bubblewrap ({"active", "why"}), user ({"switch", "uid", "why"}), network, memory,
    wall_time, cpu_time, max_processes, scratch_root, and ``lines``: the same in plain sentences.
    """
    limits = limits or Limits.from_config()
    lines = []
    try:
        bw, bw_why = _use_bwrap(limits)
    except SandboxError as e:
        bw, bw_why = False, str(e)
    try:
        ids = _target_ids(limits)
        if ids:
            user_why = f"the worker runs as root: cells run as uid {ids[0]} (depin.sandbox.user)"
        elif os.geteuid() == 0:
            user_why = "the worker runs as root and depin.sandbox.user is null: cells run as root"
        else:
            user_why = f"cells run as this worker's user (uid {os.geteuid()}); only a root worker can switch users"
    except SandboxError as e:
        ids, user_why = None, str(e)
    lines.append(f"bubblewrap: {'yes, ' + bw_why if bw else 'no: ' + bw_why}")
    if bw:
        lines.append("  read-only file system; home directories, /root, /run, /media, /mnt and /tmp hidden; "
                     + ("no network" if not limits.network else "network allowed (depin.sandbox.network)"))
    lines.append(f"user: {user_why}")
    if ids and not bw and _unreadable_by_others():
        lines.append(f"  warning: uid {ids[0]} cannot read {', '.join(_unreadable_by_others()[:3])}: cells can "
                     f"import only what the sandbox preloads; install bubblewrap or Python where others can read it")
    mem = "no limit" if limits.memory is None else f"{_human_bytes(limits.memory)} of address space"
    if limits.memory is None and _gpu_host():
        mem += " (a GPU is present: CUDA needs a large address space, so RLIMIT_AS is off)"
    lines.append(f"memory: {mem} (depin.sandbox.memory)")
    wall = "no limit" if limits.wall_time is None else f"{limits.wall_time:g}s, or the cell's --timeout"
    lines.append(f"wall time: {wall} (depin.sandbox.wall-time)")
    lines.append("cpu time: " + ("no limit" if limits.cpu_time is None else f"{limits.cpu_time:g}s")
                 + " (depin.sandbox.cpu-time)")
    lines.append("processes: " + ("no limit" if limits.max_processes is None
                                  else f"{limits.max_processes} more processes/threads")
                 + " (depin.sandbox.max-processes)")
    root = os.path.expanduser(limits.scratch_root) if limits.scratch_root else tempfile.gettempdir()
    lines.append(f"scratch: a fresh 0700 directory under {root} per cell, removed afterwards")
    return {
        "enabled": limits.enabled,
        "bubblewrap": {"active": bw, "why": bw_why},
        "user": {"switch": ids is not None, "uid": ids[0] if ids else os.geteuid(), "why": user_why},
        "network": bool(limits.network) if bw else True,
        "memory": limits.memory,
        "wall_time": limits.wall_time,
        "cpu_time": limits.cpu_time,
        "max_processes": limits.max_processes,
        "scratch_root": root,
        "lines": lines,
    }


# ---------------------------------------------------------------- the parent side

class _Registered:
    """Stands in for a `_RunContext` in `remote._active`, so the worker's cancel reaches this thread."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker

    def announce(self, after: float = 0.0) -> None:  # remote._flusher calls these on every active run
        pass

    def flush(self, stale_only: bool = False) -> None:
        pass


def _error_result(spec: dict[str, Any], where: tuple[Any, Any], message: str, *, type_name: str = "SandboxLimitError",
                  status: str = "error", limit: str | None = None, timed_out: bool = False,
                  stream_count: int = 0) -> dict[str, Any]:
    return {"status": status, "worker": where[0], "worker_name": where[1], "run_id": spec.get("run_id"),
            "outputs": {}, "aliases": {}, "modules": {}, "mutated": {}, "skipped": {}, "deleted": [],
            "stream_count": stream_count,
            "error": {"type": type_name, "module": __name__, "message": message, "traceback": "",
                      "timed_out": timed_out, "limit": limit or "sandbox"}}


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


def run_sandboxed(spec: dict[str, Any], inputs: dict[str, Any], *, emit: Callable[[dict[str, Any]], None],
                  limits: Limits | None = None, stats: dict[str, Any] | None = None) -> bytes:
    """Run the cell ``spec`` with ``inputs`` in a sandboxed child; return its `relay.to_payload` bytes.

    ``emit(msg)`` receives the cell's stream events (stdout, stderr, display, start), decoded with
    `safe_codec` only; connect it to ``worker.log_event(remote.STREAM_TOPIC, msg)``. ``limits``
    defaults to `Limits.from_config()`; the cell's --timeout/--max-runtime cap its wall time either
    way. ``stats``, if given, is filled with what the worker measured: ``cpu_seconds`` (the child's
    user+system time, e.g. for credit; where the child exited before its tree could be read, its own
    figure, at most its cores x the wall time), ``wall_seconds``,
    ``max_rss`` (bytes); and ``energy``, the child's own `energy.measure` figures (numbers and short
    text only, decoded with `safe_codec`), so the coordinator's ledger can total energy per volunteer
    without decoding the result.

    Limits that stop the cell, and a sandbox that cannot start, come back as a payload with status
    "error" and a message naming the setting. A cancel of the run (`remote.cancel_run`, the worker's
    cancel plugin) kills the child and returns status "cancelled". Raises `SandboxError` only for a
    configuration that cannot work (``bubblewrap: true`` without bwrap, an unknown ``user``, an
    unwritable ``scratch-root``).
    """
    from . import relay, remote

    limits = (limits or Limits.from_config()).for_spec(spec)
    address, name, worker = _where()
    where = (address, name)
    label = name or address or socket.gethostname()
    bw, _why = _use_bwrap(limits)
    ids = _target_ids(limits)
    scratch = _make_scratch(limits, ids)
    run_id = spec.get("run_id")
    key = worker.get_current_task() if worker is not None else None
    with remote._active_lock:
        remote._active[run_id] = (_Registered(worker), threading.get_ident())
        if key is not None:
            remote._run_of_key[key] = run_id
    proc = None
    marker = os.urandom(8).hex()
    fds: list[int] = []
    forwarded = 0
    log_tail = bytearray()
    logged = 0
    t0 = time.monotonic()
    tree_cpu = 0.0
    try:
        try:
            from distributed.protocol import pickle as dpickle

            blob = dpickle.dumps(inputs, protocol=5)
        except Exception as e:  # noqa: BLE001 - reported to the scientist
            return relay.to_payload(_error_result(spec, where, f"the cell's inputs could not be passed to the "
                                                  f"sandbox on volunteer {label}: {type(e).__name__}: {e}",
                                                  type_name="SandboxError"))
        control = {
            "spec": spec, "where": list(where), "label": label,
            "ids": list(ids) if ids else None, "scratch": scratch,
            "unreadable": _unreadable_by_others() if ids and not bw else [],
            "memory": limits.memory, "cpu_time": limits.cpu_time, "max_processes": limits.max_processes,
            "nproc_base": _tasks_of(ids[0] if ids else os.getuid()) if limits.max_processes is not None else 0,
        }
        try:
            head = json.dumps(control).encode()
        except (TypeError, ValueError) as e:
            return relay.to_payload(_error_result(spec, where, f"the cell's spec is not plain data: {e}",
                                                  type_name="SandboxError"))
        to_child = struct.pack(">Q", len(head)) + head + struct.pack(">Q", len(blob))
        out_r, out_w = os.pipe()
        log_r, log_w = os.pipe()
        fds += [out_r, log_r]
        cmd = [sys.executable, "-s", "-m", "depin_jupyter.sandbox", str(out_w)]
        argv = (_bwrap_argv(scratch, limits, ids) if bw else []) + cmd
        try:
            env = _child_env(scratch)
            env[_MARKER] = marker
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log_w, stderr=log_w, pass_fds=(out_w,),
                                    cwd=scratch, env=env, start_new_session=True, close_fds=True)
        finally:
            os.close(out_w)
            os.close(log_w)
        stdin_fd = proc.stdin.fileno()
        os.set_blocking(stdin_fd, False)
        os.set_blocking(out_r, False)
        os.set_blocking(log_r, False)
        pending = [memoryview(to_child), memoryview(blob)]
        del blob
        buf = bytearray()
        payload: bytes | None = None
        ready_at: float | None = None
        reason: str | None = None
        open_fds = {out_r, log_r}
        max_payload = _payload_cap()
        while payload is None:
            now = time.monotonic()
            wall_left = (None if limits.wall_time is None else
                         (ready_at + limits.wall_time - now) if ready_at is not None else
                         (t0 + _START_ALLOWANCE_S + limits.wall_time - now))
            if wall_left is not None and wall_left <= 0:
                reason = "wall" if ready_at is not None else "start"
                break
            if out_r not in open_fds:
                break
            wlist = [stdin_fd] if pending else []
            r, w, _ = select.select(list(open_fds), wlist, [], 0.1 if wall_left is None else min(0.1, wall_left))
            if w:
                try:
                    while pending:
                        n = os.write(stdin_fd, pending[0][:1 << 20])
                        pending[0] = pending[0][n:]
                        if not len(pending[0]):
                            pending.pop(0)
                except BlockingIOError:
                    pass
                except BrokenPipeError:
                    pending.clear()
                if not pending:
                    proc.stdin.close()
            if log_r in r:
                chunk = _read(log_r)
                if chunk is None:
                    open_fds.discard(log_r)
                else:
                    if logged < _LOG_FORWARD_BYTES:
                        _to_stderr(chunk[:_LOG_FORWARD_BYTES - logged], run_id)
                    logged += len(chunk)
                    log_tail += chunk
                    del log_tail[:-_LOG_TAIL_BYTES]
            if out_r in r:
                chunk = _read(out_r, 64 * 2**20)
                if chunk is None:
                    open_fds.discard(out_r)
                    continue
                buf += chunk
                while len(buf) >= _HDR.size:
                    size, kind = _HDR.unpack_from(buf)
                    cap = max_payload if kind == _PAYLOAD else _MAX_EVENT_BYTES
                    if size > cap:
                        reason = f"oversize:{size}:{cap}"
                        break
                    if len(buf) < _HDR.size + size:
                        break
                    data = bytes(buf[_HDR.size:_HDR.size + size])
                    del buf[:_HDR.size + size]
                    if kind == _READY and ready_at is None:
                        ready_at = time.monotonic()
                    elif kind == _EVENT:
                        msg = _decode_event(data, run_id, where)
                        if msg is not None:
                            forwarded += 1
                            emit(msg)
                    elif kind == _ENERGY and stats is not None and size <= _MAX_ENERGY_BYTES:
                        energy = _decode_energy(data)
                        if energy is not None:
                            stats["energy"] = energy
                    elif kind == _PAYLOAD:
                        payload = data
                        break
                if reason:
                    break
        if payload is not None:
            tree_cpu = _tree_cpu(proc.pid)  # the cell's process is still alive: measure it from here
            _wait(proc, _AFTER_PAYLOAD_S)
            return payload
        # No result: the child died, or a limit stopped it.
        if reason is None:  # the pipe closed: the child is exiting
            _wait(proc, 5.0)
        _kill(proc)
        usage = _reap(proc)
        cpu_used = None if usage is None else usage.ru_utime + usage.ru_stime
        msg, limit, timed_out = _explain(reason, proc.returncode, limits, label, bw, bytes(log_tail), cpu_used)
        return relay.to_payload(_error_result(spec, where, msg, limit=limit, timed_out=timed_out,
                                              stream_count=forwarded))
    except remote.CellCancelled as exc:  # the worker cancelled the run (interrupt, --timeout, client gone)
        if proc is not None:
            _kill(proc)
        timed_out = isinstance(exc, remote.CellTimedOut)
        return relay.to_payload(_error_result(
            spec, where, f"the cell was {'stopped by its time limit' if timed_out else 'cancelled'} on "
                         f"volunteer {label}", type_name=type(exc).__name__, status="cancelled",
            limit="max-runtime" if isinstance(exc, remote.CellMaxRuntime) else "timeout", timed_out=timed_out,
            stream_count=forwarded))
    finally:
        with remote._active_lock:
            remote._active.pop(run_id, None)
            if key is not None:
                remote._run_of_key.pop(key, None)
        if proc is not None:
            _kill(proc)
            usage = _reap(proc)
            if not bw:
                _kill_marked(marker, ids[0] if ids else os.getuid())
            if stats is not None:
                stats["wall_seconds"] = time.monotonic() - t0
                if usage is not None:
                    # wait4 sees only what bwrap reaped; the tree measured when the result arrived sees the
                    # cell's process unless it had already exited (then it is gone from the tree, and bwrap's
                    # pid 1 may be killed before reaping it). The child's own figure (its energy frame) covers
                    # that race, capped by what its cores could have done in the wall time.
                    own = (stats.get("energy") or {}).get("cpu_seconds")
                    own = min(float(own), stats["wall_seconds"] * (os.cpu_count() or 1)) \
                        if isinstance(own, (int, float)) and own > 0 else 0.0
                    stats["cpu_seconds"] = max(usage.ru_utime + usage.ru_stime, tree_cpu, own)
                    stats["max_rss"] = usage.ru_maxrss * 1024
            if proc.stdin and not proc.stdin.closed:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        _remove_tree(scratch)


def _payload_cap() -> int:
    try:
        import dask.config
        import dask.utils

        return int(dask.utils.parse_bytes(dask.config.get("depin.coordinator.relay-max-bytes", "1GiB")))
    except Exception:  # noqa: BLE001
        return _GiB


def _read(fd: int, n: int = 65536) -> bytes | None:
    """What is there to read (b"" if nothing yet), or None at end of file."""
    try:
        data = os.read(fd, n)
    except BlockingIOError:
        return b""
    except OSError:
        return None
    return data if data else None


def _to_stderr(chunk: bytes, run_id: Any) -> None:
    try:
        stream = sys.__stderr__
        if stream is not None:
            stream.write(chunk.decode(errors="replace"))
            stream.flush()
    except (OSError, ValueError):
        pass


def _decode_event(data: bytes, run_id: Any, where: tuple[Any, Any]) -> dict[str, Any] | None:
    """A stream event from the child, decoded without unpickling; None if it is not one."""
    from . import safe_codec

    try:
        msg = safe_codec.decode(data, max_bytes=_MAX_EVENT_BYTES)
    except safe_codec.DecodeError:
        return None
    if not isinstance(msg, dict) or msg.get("kind") not in _STREAM_KINDS or not all(isinstance(k, str) for k in msg):
        return None
    msg["run"] = run_id  # the child speaks for its own run only
    if msg["kind"] == "start":  # where it runs is the worker's to say (the notebook uses the pid to explain a death)
        msg.update(worker=where[0], name=where[1], pid=os.getpid())
    return msg


def _decode_energy(data: bytes) -> dict[str, Any] | None:
    """The child's energy figures: a flat dict of str -> number/short str, else None (and it is dropped)."""
    from . import safe_codec

    try:
        msg = safe_codec.decode(data, max_bytes=_MAX_ENERGY_BYTES)
    except safe_codec.DecodeError:
        return None
    if not isinstance(msg, dict):
        return None
    ok = (int, float, str, type(None))
    return {k: v for k, v in msg.items() if isinstance(k, str) and isinstance(v, ok)
            and not isinstance(v, bool) and (not isinstance(v, str) or len(v) <= 500)}


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (and with bwrap its PID namespace goes with it)."""
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.kill()
        except OSError:
            pass
    else:
        try:  # the child is gone; what it left in its process group goes too
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _wait(proc: subprocess.Popen, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while proc.returncode is None and time.monotonic() < deadline:
        if _reap(proc, block=False) is None and proc.returncode is None:
            time.sleep(0.02)
    return proc.returncode


def _reap(proc: subprocess.Popen, block: bool = True) -> Any:
    """Wait for the child (os.wait4, for its resource usage); sets ``proc.returncode``."""
    if proc.returncode is not None:
        return getattr(proc, "_depin_usage", None)
    try:
        pid, status, usage = os.wait4(proc.pid, 0 if block else os.WNOHANG)
    except ChildProcessError:  # reaped elsewhere already
        proc.returncode = -signal.SIGKILL
        return None
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc._depin_usage = usage  # type: ignore[attr-defined]
    return usage


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
        msg = (f"the cell's result ({_human_bytes(int(size))}) is larger than the relay accepts "
               f"({_human_bytes(int(cap))}, depin.coordinator.relay-max-bytes) on volunteer {label}; it was "
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
        mem = (f"lower depin.sandbox.memory (now {_human_bytes(limits.memory)})" if limits.memory else
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


# ---------------------------------------------------------------- the child side

class _Relay:
    """Stands in for the Dask worker inside the child: `log_event` sends stream events to the parent."""

    one_cell_process = True  # this process runs only the cell: its whole CPU time is the cell's (energy.py)

    def __init__(self, fd: int, address: str | None, name: str | None) -> None:
        self.fd, self.address, self.name = fd, address, name
        self.nanny = None
        self._lock = threading.Lock()

    def log_event(self, topic: str, msg: dict[str, Any]) -> None:
        from . import remote, safe_codec

        if topic != remote.STREAM_TOPIC:
            return
        try:
            data = safe_codec.encode(msg, name="event")
        except Exception:  # noqa: BLE001 - an event that cannot be sent safely is dropped
            data = safe_codec.encode({"kind": "stderr", "text": f"[depin: a {msg.get('kind')} message of the "
                                                              f"cell could not be sent and was dropped]\n"})
        self.send(_EVENT, data)

    def get_current_task(self) -> None:
        return None

    def send(self, kind: int, data: bytes) -> None:
        with self._lock:
            _write_all(self.fd, _HDR.pack(len(data), kind))
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
    if control.get("max_processes") is not None and os.getuid() != 0:
        own = len(_listdir("/proc/self/task")) or 1
        n = int(control["nproc_base"]) + own + int(control["max_processes"])
        resource.setrlimit(resource.RLIMIT_NPROC, (n, n))


def _annotate(result: dict[str, Any], control: dict[str, Any]) -> None:
    """Name the limit and its setting in errors that a limit caused."""
    err = result.get("error")
    if not err or result.get("status") != "error":
        return
    label = control.get("label")
    if err.get("type") in ("MemoryError", "_ArrayMemoryError") and control.get("memory"):
        err["message"] = (f"the cell used more than {_human_bytes(int(control['memory']))} "
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


def _tree_cpu(pid: int) -> float:
    """CPU seconds (user + system, with reaped children) of ``pid`` and its live descendants, read by the
    worker from /proc (not reported by the sandboxed code)."""
    try:
        import psutil

        root = psutil.Process(pid)
        total = 0.0
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                continue
        return total
    except Exception:  # noqa: BLE001 - no psutil or the process is gone: wait4's figure stands
        return 0.0


def _child_main(argv: list[str]) -> None:
    out_fd = int(argv[0])
    os.set_inheritable(out_fd, False)  # what the cell starts does not get the protocol pipe
    control = json.loads(_read_exact(0, struct.unpack(">Q", _read_exact(0, 8))[0]))
    # Imported (as the worker's user) before the switch and the limits: they are the sandbox's, not the
    # cell's, and without bubblewrap the sandbox user may not be able to read the Python installation.
    # Not Dask or distributed (a third of a second per cell): the inputs are a plain pickle stream
    # (cloudpickle's functions load with `pickle`), results go through safe_codec, and Dask collections a
    # cell computes run on threads here (DASK_SCHEDULER in the child's environment: no cluster client).
    import pickle

    from . import relay, remote, safe_codec

    remote._install(cluster_scheduler=False)
    remote._SAFE_CODEC_RESULTS = True
    remote.hardware()
    remote._cell_builtins()
    if control.get("ids"):
        _drop_privileges(*control["ids"])
    _no_new_privs()
    os.chdir(control["scratch"])
    if sys.path and sys.path[0] in ("", "/"):
        sys.path[0] = control["scratch"]
    relay_ = _Relay(out_fd, *control["where"])
    _set_limits(control)
    relay_.send(_READY, b"")
    spec = control["spec"]
    try:
        blob = _read_exact(0, struct.unpack(">Q", _read_exact(0, 8))[0])
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        inputs = pickle.loads(blob)  # noqa: S301 - the scientist's inputs, in the scientist's cell's sandbox
        del blob
    except MemoryError as e:
        result = {"status": "error", "worker": control["where"][0], "worker_name": control["where"][1],
                  "run_id": spec.get("run_id"), "stream_count": 0,
                  "error": {"type": "MemoryError", "module": "builtins", "message": f"the cell's inputs: {e}",
                            "traceback": ""}}
    else:
        result = remote.run_cell(spec, inputs, worker=relay_)
    _annotate(result, control)
    try:
        payload = relay.to_payload(result)
    except MemoryError:
        result = {"status": "error", "worker": control["where"][0], "worker_name": control["where"][1],
                  "run_id": spec.get("run_id"), "stream_count": result.get("stream_count", 0),
                  "error": {"type": "MemoryError", "module": "builtins", "traceback": "", "limit": "memory",
                            "message": f"the cell's results did not fit in {_human_bytes(int(control['memory'] or 0))} "
                                       f"(depin.sandbox.memory) on volunteer {control.get('label')} while "
                                       f"being encoded: return less, or raise the limit"}}
        payload = relay.to_payload(result)
    if isinstance(result.get("energy"), dict):
        try:
            relay_.send(_ENERGY, safe_codec.encode(result["energy"], name="energy"))
        except Exception:  # noqa: BLE001, S110 - energy is reported when it can be; the result matters
            pass
    relay_.send(_PAYLOAD, payload)
    os._exit(0)  # threads the cell left behind do not hold the result back


if __name__ == "__main__":
    try:
        _child_main(sys.argv[1:])
    except BaseException as e:  # noqa: BLE001 - the parent reports the tail of this
        if not isinstance(e, SystemExit):
            import traceback

            traceback.print_exc()
        os._exit(70)
