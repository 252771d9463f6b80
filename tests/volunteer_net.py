"""Real volunteer-network processes for tests: `depin scheduler` and `depin worker` on 127.0.0.1."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any

DEPIN = [sys.executable, "-m", "depin_jupyter.cli"]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["DASK_DEPIN__COORDINATOR__DASHBOARD_ADDRESS"] = "127.0.0.1:0"
    env["DASK_DEPIN__VOLUNTEER__LEAVE_TIMEOUT"] = "10s"
    env.update(extra or {})
    return env


def wait_for_text(path: pathlib.Path, text: str, proc: subprocess.Popen[Any], timeout: float = 60) -> str:
    """Wait until ``text`` appears in the log file ``path``; fail fast if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {text!r}:\n{content[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not seen within {timeout}s:\n{(path.read_text() if path.exists() else '')[-3000:]}")


class Network:
    """A coordinator process with its state dir, and the volunteer processes started against it."""

    def __init__(self, root: pathlib.Path, port: int, env: dict[str, str] | None = None) -> None:
        from depin_jupyter.network.coordinator import StateDir

        self.root = root
        self.port = port
        self.extra_env = env or {}
        self.state = StateDir(root / "state")
        self.scheduler: subprocess.Popen[Any] | None = None
        self.workers: list[subprocess.Popen[Any]] = []
        self._n = 0

    @property
    def address(self) -> str:
        return f"tls://127.0.0.1:{self.port}"

    def start_scheduler(self) -> None:
        log = self.root / f"scheduler-{time.monotonic_ns()}.log"
        self.scheduler_log = log
        self.scheduler = subprocess.Popen(
            [*DEPIN, "scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--state-dir",
             str(self.state.path)], stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=_env(self.extra_env))
        wait_for_text(log, "listening at", self.scheduler)

    def stop_scheduler(self) -> int:
        assert self.scheduler is not None
        self.scheduler.send_signal(signal.SIGTERM)
        rc = self.scheduler.wait(30)
        self.scheduler = None
        return rc

    def token(self, role: str, name: str, **kw: Any) -> str:
        return self.state.issue_token(role, name, **kw).encode()

    def start_worker(self, token: str, *args: str, wait: bool = True,
                     env: dict[str, str] | None = None) -> tuple[subprocess.Popen[Any], pathlib.Path]:
        self._n += 1
        log = self.root / f"worker-{self._n}.log"
        proc = subprocess.Popen([*DEPIN, "worker", token, "--gpus", "none", *args], stdout=subprocess.DEVNULL,
                                stderr=open(log, "w"), env=_env({**self.extra_env, **(env or {})}))
        self.workers.append(proc)
        if wait:
            wait_for_text(log, "depin worker: joined", proc)
        return proc, log

    def close(self) -> None:
        for p in self.workers:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        if self.scheduler is not None and self.scheduler.poll() is None:
            self.scheduler.kill()
            self.scheduler.wait(10)


def wait_for_workers(session: Any, n: int, timeout: float = 60) -> list[Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ws = session.workers(max_age=0)
        if len(ws) >= n:
            return ws
        time.sleep(0.2)
    raise AssertionError(f"{n} workers did not join within {timeout}s (have {len(session.workers(max_age=0))})")


def cell_async(session: Any, code: str, ns: dict[str, Any] | None = None, **options: Any) -> Any:
    """Run a `%%depin` cell on ``session`` in a thread (a volunteer network takes cells, not Dask tasks);
    a concurrent Future of (namespace, CellOutcome). One replica and no store unless said otherwise."""
    import threading
    from concurrent.futures import Future

    from depin_jupyter.kernel import runner

    done: Future[Any] = Future()
    namespace = dict(ns or {})
    opts = runner.RunOptions(**{"no_store": True, "replicas": 1, **options})

    def go() -> None:
        try:
            outcome = runner.run_cell(session, code, namespace, opts)
            done.set_result((namespace, outcome))
        except BaseException as e:
            done.set_exception(e)

    threading.Thread(target=go, daemon=True).start()
    return done


def running_on(session: Any) -> dict[str, list[str]]:
    """Worker address -> keys of this client's cells queued or running there, as the coordinator says."""
    from depin_jupyter.protocol.rpc import Coordinator

    out: dict[str, list[str]] = {}
    for job in Coordinator.of_client(session.client).jobs():
        if job.get("worker"):
            out.setdefault(str(job["worker"]), []).append(str(job["key"]))
    return out


LONG_CELL = "import time\nstart = time.time()\ntime.sleep(1.5)\nstop = time.time()\n"
"""A 1.5 s cell binding its start and stop time (which worker ran it: the outcome says)."""
