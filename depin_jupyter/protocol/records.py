"""The two records every `%%depin` run carries across process boundaries: what to run, and what came of it.

`RunSpec` goes kernel -> worker (-> sandbox child); `RunResult` comes back (worker -> kernel, through the
coordinator's relay on a volunteer network, where it is encoded with `safe_codec`). Both are plain dicts on
the wire (JSON / safe_codec / pickle), typed here so every side agrees on the keys.
"""

from __future__ import annotations

import datetime
import uuid
from typing import Any, Literal, TypedDict

from depin_jupyter.protocol.views import ViewRecord

__all__ = [
    "LocalModules", "RecordSpec", "RunError", "RunResult", "RunSpec", "RunStatus", "error_result", "new_run_id",
]

RunStatus = Literal["ok", "error", "cancelled"]


class LocalModules(TypedDict):
    """The notebook's own modules a run needs: the bundle's content key and its top-level names."""

    key: str
    names: list[str]


class RecordSpec(TypedDict, total=False):
    """A run the worker stores itself (background runs, which must not depend on the kernel)."""

    url: str
    storage_options: dict[str, Any]
    label: str
    hashes: dict[str, str]
    key: str
    options: Any
    pool: str | None
    private: list[str]


class _RunSpecRequired(TypedDict):
    run_id: str
    code: str
    filename: str
    modules: dict[str, str]          # name in the cell -> module to import there
    maybe_mutated: list[str]         # inputs the cell may change in place (fingerprinted before and after)
    outputs: list[str] | None        # names to bring back (None: every name the cell binds)
    last_expr: bool                  # the cell ends in an expression whose value is shown


class RunSpec(_RunSpecRequired, total=False):
    """What the worker needs to run a cell, besides the input values."""

    name: str                        # the run's label (--name, or "cell")
    timeout: float | None
    max_runtime: float | None
    flush_interval: float | None
    local_modules: LocalModules | None
    record: RecordSpec
    private: bool                    # carries private data (`%depin private`): a coordinator keeps it off its disk


class RunError(TypedDict, total=False):
    """A cell's exception (or a limit that stopped it), as text; ``exception`` only on trusted clusters."""

    type: str
    module: str
    message: str
    traceback: str
    exception: BaseException | None
    timed_out: bool
    limit: str


class _RunResultRequired(TypedDict):
    status: RunStatus


class RunResult(_RunResultRequired, total=False):
    """What came of a run: the names it bound, changed in place or deleted, its value, error and measurements."""

    run_id: str | None
    worker: str | None
    worker_name: str | None
    hardware: dict[str, Any]
    outputs: dict[str, Any]
    aliases: dict[str, str]          # name bound to the very object of an input -> that input
    modules: dict[str, str]          # name bound to a module -> the module's name
    mutated: dict[str, Any]          # inputs changed in place -> their new value
    skipped: dict[str, str]          # outputs that could not travel -> why
    deleted: list[str]
    value: Any                       # the last expression's value (or a `RichValue` standing in for it)
    error: RunError
    timings: dict[str, float]
    opened: list[str]                # files the cell read with open()
    stream_count: int                # how many stream events the worker sent (the kernel waits for each)
    energy: dict[str, Any]
    record_warning: str
    views: dict[str, ViewRecord]     # outputs that are numpy views of an input or another output: their layout
    parts: dict[str, list[Any]]      # outputs bound to an object inside an input -> [input, path] (`protocol.parts`)
    kept: dict[str, list[list[Any]]]  # changed inputs and outputs -> [[path, input, input path]] of what they hold
    lazy: dict[str, int | None]      # kernel side: a cache hit's outputs bound lazily -> their size
    shown: list[dict[str, Any]]      # kernel side: what the run printed and displayed, for a cache hit's replay
    replication: dict[str, Any]      # kernel side: the replicas and their verdicts


def new_run_id() -> str:
    """A time-sortable unique run id, ``YYYYmmddTHHMMSS.ffffffZ-<8 hex>`` (UTC): the store's format."""
    t = datetime.datetime.now(datetime.UTC)
    return f"{t:%Y%m%dT%H%M%S.%fZ}-{uuid.uuid4().hex[:8]}"


def error_result(spec: RunSpec | dict[str, Any], where: tuple[Any, Any], message: str, *,
                 type_name: str = "SandboxLimitError", module: str = "depin_jupyter.worker.sandbox",
                 status: RunStatus = "error", limit: str | None = None, timed_out: bool = False,
                 stream_count: int = 0) -> RunResult:
    """A run that failed outside the cell's own code (a limit, a sandbox that could not start, a lost input).

    ``where`` is (worker address, worker name)."""
    return {"status": status, "worker": where[0], "worker_name": where[1], "run_id": spec.get("run_id"),
            "outputs": {}, "aliases": {}, "modules": {}, "mutated": {}, "skipped": {}, "deleted": [],
            "stream_count": stream_count,
            "error": {"type": type_name, "module": module, "message": message, "traceback": "",
                      "timed_out": timed_out, "limit": limit or "sandbox"}}
