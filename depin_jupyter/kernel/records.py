"""The records of one run on the notebook side: its options, what was decided before sending, what came back."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from depin_jupyter.errors import RemoteExecutionError
from depin_jupyter.kernel.failures import Death

__all__ = ["CellOutcome", "InputsLost", "Prepared", "Progress", "RemoteCellError", "RunOptions", "WorkerDied"]


@dataclass(frozen=True)
class RunOptions:
    """Options of one `%%depin` run (None: take the configured default)."""

    gpu: int | None = None
    cpu: bool = False
    timeout: float | None = None
    retries: int | None = None
    name: str | None = None
    worker: str | None = None
    inputs: tuple[str, ...] | None = None
    outputs: tuple[str, ...] | None = None
    gpu_mem: float | None = None        # GiB a GPU must have
    gpu_arch: float | None = None       # minimum compute capability, e.g. 8.0
    max_runtime: float | None = None    # seconds; enforced on the worker even if the kernel is gone
    store: str | None = None            # result store URL (default: config depin.store.url)
    no_store: bool = False
    no_cache: bool = False
    deps: tuple[str, ...] | None = None  # files the cell reads (globs): their content is part of the cache key
    replicas: int | None = None         # run on this many distinct volunteers; a tolerant majority decides
    rtol: float | None = None           # replica agreement for floats (default: config depin.rtol)
    atol: float | None = None
    pool: str | None = None             # run only on workers of this pool (default: config depin.pool)
    private: tuple[str, ...] = ()       # private variables: sent only to a trusted pool (depin.trusted-pools)
    detached: bool = False              # volunteer network: kept by the coordinator when the kernel goes (a map's batches)


class Progress:
    """Receives a run's stages; the default shows nothing. `widgets.make_progress` gives a visible one.

    Stages: "shipping" (detail: what is sent), "queued", "running" (detail: worker), "retrying",
    "storing", "done", "cached", "failed".
    """

    def update(self, stage: str, detail: str = "") -> None:
        pass

    def note(self, text: str) -> None:
        """Tell the user something about the run that is neither output nor a warning: on stdout (warnings
        and errors go to stderr); a widget shows it in its own line instead."""
        print(f"depin: {text}")

    def close(self) -> None:
        """Stop any timers; called once the run is over, whatever happened."""


@dataclass
class CellOutcome:
    """What a run produced besides the names it bound."""

    run_id: str
    worker: str | None
    value: Any = None
    has_value: bool = False
    sent_bytes: int = 0
    reused_inputs: list[str] = field(default_factory=list)
    attempts: int = 1
    timings: dict[str, float] = field(default_factory=dict)
    cached: bool = False
    energy: dict[str, Any] | None = None   # what the worker measured (`energy.py`); None when cached


class WorkerDied(Exception):
    """The worker running the cell died; carries the explanation."""

    def __init__(self, death: Death) -> None:
        super().__init__(death.message)
        self.death = death


class InputsLost(Exception):
    """Inputs kept on the cluster were lost with a worker: ship them again and resubmit."""


class RemoteCellError(RemoteExecutionError):
    """A cell's exception whose class could not travel back; keeps the remote type name and message."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.remote_message = message


@dataclass
class Prepared:
    """A run checked and routed, ready to ship: everything decided before any byte is sent."""

    run_id: str
    label: str
    code: str
    filename: str
    plan: Any
    names: list[str]
    bundle: Any
    placement: dict[str, Any]
    options: RunOptions
    candidates: list[str] = field(default_factory=list)   # workers that may run it (for replicas)
    started: float = field(default_factory=time.perf_counter)
    pool: str | None = None                                # the pool it runs in (None: any worker)
    private: list[str] = field(default_factory=list)       # inputs that carry private data
