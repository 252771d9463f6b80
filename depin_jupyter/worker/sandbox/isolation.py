"""Who the sandboxed child runs as and where: bubblewrap, a separate user, its scratch directory and environment."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from typing import Any

from depin_jupyter.worker.sandbox.limits import Limits, SandboxError, gpu_host, human_bytes

__all__ = ["MARKER", "bwrap_argv", "bwrap_works", "child_env", "describe", "kill_marked", "listdir", "make_scratch",
           "remove_tree", "target_ids", "tasks_of", "unreadable_by_others", "use_bwrap"]


MARKER = "DEPIN_SANDBOX_RUN"


# Environment the child inherits, if set; everything else (tokens, AWS_*, DASK_*, ...) is dropped.
_ENV_PASS = ("PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_NUMERIC", "TZ", "TERM",
             "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES", "CUDA_HOME",
             "CUDA_PATH", "LD_LIBRARY_PATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
             "NUMBA_NUM_THREADS", "MPLBACKEND")


# Hidden inside bubblewrap (each replaced by an empty tmpfs), besides the worker's own $HOME.
_HIDDEN = ("/home", "/root", "/run", "/media", "/mnt", "/tmp", "/var/tmp")


_GPU_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset", "/dev/dri")


def target_ids(limits: Limits) -> tuple[int, int] | None:
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
    # depin_jupyter/worker/sandbox/isolation.py -> the directory holding depin_jupyter
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
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


def unreadable_by_others() -> list[str]:
    """Parts of the Python installation a switched-to user cannot reach by path without bubblewrap (e.g. a
    Python under a 0700 /root): the child opens them before it switches user (`child._open_ways`)."""
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


def bwrap_argv(scratch: str, limits: Limits, ids: tuple[int, int] | None) -> list[str]:
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
    for dev in _GPU_DEVICES + tuple(sorted(f"/dev/{d}" for d in listdir("/dev") if d[6:].isdigit()
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


def listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


@functools.lru_cache(maxsize=8)
def bwrap_works(network: bool, user: Any) -> tuple[bool, str]:
    """Whether bubblewrap runs here with the options a cell gets: (works, why not / what)."""
    if not shutil.which("bwrap"):
        return False, "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    limits = Limits(network=network, user=user)
    try:
        ids = target_ids(limits)
    except SandboxError as e:
        return False, str(e)
    scratch = tempfile.mkdtemp(prefix="depin-probe-")
    try:
        argv = bwrap_argv(scratch, limits, ids) + [sys.executable, "-S", "-c", "pass"]
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


def use_bwrap(limits: Limits) -> tuple[bool, str]:
    if limits.bubblewrap is False:
        return False, "off (depin.sandbox.bubblewrap: false)"
    works, why = bwrap_works(limits.network, limits.user)
    if not works and limits.bubblewrap is True:
        raise SandboxError(f"depin.sandbox.bubblewrap is true but {why}")
    return works, why


def tasks_of(uid: int) -> int:
    """Processes and threads of ``uid`` on this machine now (what RLIMIT_NPROC counts)."""
    count = 0
    for pid in listdir("/proc"):
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


def kill_marked(marker: str, uid: int) -> None:
    """SIGKILL this run's processes that left its process group (setsid), found by the marker in their
    environment: without bubblewrap's PID namespace this is best effort (a cell can clear its environment)."""
    needle = f"{MARKER}={marker}".encode()
    for _ in range(3):
        found = False
        for pid in listdir("/proc"):
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


def child_env(scratch: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in _ENV_PASS if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.setdefault("LANG", "C.UTF-8")
    env.update(HOME=scratch, TMPDIR=scratch, PYTHONPATH=os.pathsep.join(_python_paths()),
               PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1",
               DASK_SCHEDULER="threads")  # Dask collections a cell computes: on its own threads
    return env


def make_scratch(limits: Limits, ids: tuple[int, int] | None) -> str:
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


def remove_tree(path: str) -> None:
    def fix(func: Any, p: str, _exc: Any) -> None:  # a cell may have left directories without permissions
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=fix)
    shutil.rmtree(path, ignore_errors=True)


def describe(limits: Limits | None = None) -> dict[str, Any]:
    """What protection a sandboxed cell gets on this machine, for the volunteer's startup message.

    Keys: enabled, bubblewrap ({"active", "why"}), user ({"switch", "uid", "why"}), network, memory,
    wall_time, cpu_time, max_processes, scratch_root, and ``lines``: the same in plain sentences.
    """
    limits = limits or Limits.from_config()
    lines = []
    try:
        bw, bw_why = use_bwrap(limits)
    except SandboxError as e:
        bw, bw_why = False, str(e)
    try:
        ids = target_ids(limits)
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
    if ids and not bw and unreadable_by_others():
        lines.append(f"  uid {ids[0]} cannot reach {', '.join(unreadable_by_others()[:3])} by path: the sandbox "
                     f"opens those directories before it switches user and cells import through them (the rest "
                     f"stays closed); bubblewrap isolates better")
    mem = "no limit" if limits.memory is None else f"{human_bytes(limits.memory)} of address space"
    if limits.memory is None and gpu_host():
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
