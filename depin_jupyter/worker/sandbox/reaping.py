"""The sandbox child's process, seen from the worker: kill its group, wait for its exit (woken by the exit
itself), reap it with its resource usage, measure its tree's CPU time."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
import weakref
from typing import Any

__all__ = ["kill", "reap", "tree_cpu", "wait"]


def kill(proc: subprocess.Popen) -> None:
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


def wait(proc: subprocess.Popen, timeout: float) -> int | None:
    """The child's exit status once it exited, waiting at most ``timeout`` s (None if it still runs).

    Woken by the exit itself where the kernel offers a pidfd (Linux 5.3+): the child exits right after
    sending its result, and polling in steps put up to a step's wait on every cell's path."""
    deadline = time.monotonic() + timeout
    pidfd = _pidfd(proc)
    try:
        while proc.returncode is None and time.monotonic() < deadline:
            if reap(proc, block=False) is None and proc.returncode is None:
                if pidfd is None:
                    time.sleep(0.02)
                else:
                    select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return proc.returncode


def _pidfd(proc: subprocess.Popen) -> int | None:
    """A descriptor readable once ``proc`` exited, or None (no pidfd on this system, or it is reaped)."""
    if proc.returncode is not None or not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(proc.pid)
    except OSError:
        return None


# The resource usage wait4 reported for each reaped child (the Popen itself has no place for it).
_usage: weakref.WeakKeyDictionary[subprocess.Popen[bytes], Any] = weakref.WeakKeyDictionary()


def reap(proc: subprocess.Popen[bytes], block: bool = True) -> Any:
    """Wait for the child (os.wait4, for its resource usage); sets ``proc.returncode``."""
    if proc.returncode is not None:
        return _usage.get(proc)
    try:
        pid, status, usage = os.wait4(proc.pid, 0 if block else os.WNOHANG)
    except ChildProcessError:  # reaped elsewhere already
        proc.returncode = -signal.SIGKILL
        return None
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    _usage[proc] = usage
    return usage


def tree_cpu(pid: int) -> float:
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
