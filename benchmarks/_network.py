"""Shared by the volunteer-network benchmarks: a real `depin scheduler` and `depin worker`s on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEPIN = [sys.executable, "-m", "depin_jupyter.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(path: Path, text: str, proc: subprocess.Popen[Any], timeout: float = 180) -> float:
    """When ``text`` appeared in the log ``path`` (time.monotonic); exits if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return time.monotonic()
        if proc.poll() is not None:
            raise SystemExit(f"exited before {text!r}:\n{path.read_text()[-2000:]}")
        time.sleep(0.02)
    raise SystemExit(f"{text!r} not seen in {path} within {timeout}s")


class BenchNetwork:
    """A coordinator with its state dir, and the volunteers started against it; `close` stops them all."""

    def __init__(self, prefix: str) -> None:
        from depin_jupyter.network.coordinator import StateDir

        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.port = free_port()
        self.env = {**os.environ, "DASK_DEPIN__COORDINATOR__DASHBOARD_ADDRESS": "127.0.0.1:0"}
        self.procs: list[subprocess.Popen[Any]] = []
        log = self.root / "scheduler.log"
        self.procs.append(subprocess.Popen([*DEPIN, "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                                            "--state-dir", str(self.root / "state")],
                                           stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=self.env))
        wait_for(log, "listening at", self.procs[-1])
        self.state = StateDir(self.root / "state")

    def token(self, role: str, name: str) -> str:
        return self.state.issue_token(role, name).encode()

    def start_worker(self, token: str, name: str, env: dict[str, str] | None = None) -> tuple[Any, float]:
        """Start `depin worker TOKEN` (CPU) and wait until it joined: (the process, seconds it took)."""
        log = self.root / f"worker-{name}.log"
        t0 = time.monotonic()
        proc = subprocess.Popen([*DEPIN, "worker", token, "--gpus", "none"], stdout=subprocess.DEVNULL,
                                stderr=open(log, "w"), env={**self.env, **(env or {})})
        self.procs.append(proc)
        return proc, wait_for(log, "depin worker: joined", proc) - t0

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
