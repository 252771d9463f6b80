"""Results of cells run by volunteers: pickle-free, through the coordinator.

Volunteers sit behind NAT and firewalls: their workers dial out to the coordinator, nobody can dial in,
while stock Dask fetches a task's result by dialling the worker that holds it. On a volunteer network a
`%%depin` cell therefore runs as `run_cell_relayed`: the worker encodes the cell's result with
`safe_codec` (plain data and arrays, no pickle) and pushes it to the coordinator over its own connection;
the task itself returns a marker. The notebook fetches the payload from the coordinator and decodes it
without unpickling anything. Values that cannot be encoded that way are reported by name, not sent.

Inputs travel the other way through the coordinator too. Small ones ride inside the task; an array of at
least ``depin.coordinator.input-ref-min-bytes`` is put on the coordinator once, under its content key,
and the task carries an `InputRef`: the volunteer's worker fetches the bytes (over its own connection)
and keeps them in a small LRU cache (``depin.volunteer.input-cache-bytes``), so a reused input crosses
the network neither from the notebook nor, on the same volunteer, from the coordinator again.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Any

from . import safe_codec

__all__ = ["InputRef", "InputMissingError", "run_cell_relayed", "to_payload", "from_payload", "fetch"]

RELAYED = "depin-relayed"
_RICH = "__depin_rich__"


@dataclass(frozen=True)
class InputRef:
    """An input held by the coordinator under ``key`` (its serialized bytes: ``nbytes``)."""

    key: str
    nbytes: int


class InputMissingError(Exception):
    """The coordinator no longer holds an input a task refers to (its input cache dropped it)."""


class _InputCache:
    """Serialized inputs this worker fetched, least recently used dropped first (bytes: never shared objects,
    so a cell that changes its input in place cannot change what the next cell gets)."""

    def __init__(self) -> None:
        self._items: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: str, data: bytes, limit: int) -> None:
        with self._lock:
            if len(data) > limit:
                return
            old = self._items.pop(key, None)
            self._bytes -= len(old) if old is not None else 0
            while self._items and self._bytes + len(data) > limit:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)
            self._items[key] = data
            self._bytes += len(data)


_cache = _InputCache()


def resolve_inputs(worker: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` with each `InputRef` replaced by its value (from this worker's cache or the coordinator).

    Raises InputMissingError naming the input when the coordinator no longer holds it.
    """
    refs = {n: v for n, v in inputs.items() if isinstance(v, InputRef)}
    if not refs:
        return inputs
    from distributed.protocol import deserialize_bytes
    from distributed.utils import sync

    from . import config

    out = dict(inputs)
    for name, ref in refs.items():
        data = _cache.get(ref.key)
        if data is None:
            data = sync(worker.loop, worker.scheduler.depin_input_get, key=ref.key)
            if data is None:
                raise InputMissingError(
                    f"input {name!r} ({ref.nbytes} bytes) is no longer held by the coordinator (its input cache "
                    f"dropped it: depin.coordinator.input-cache-bytes)")
            _cache.put(ref.key, bytes(data), config.nbytes("volunteer.input-cache-bytes"))
        out[name] = deserialize_bytes(data)
    return out


def _values_safe(values: dict[str, Any], skipped: dict[str, str]) -> dict[str, Any]:
    from .remote import unbox

    out = {}
    for name, value in values.items():
        value = unbox(value)
        why = safe_codec.encodable(value, name=name)
        if why is None:
            out[name] = value
        else:
            # apply_results words it: "output 'k' of type <this> could not be brought back"
            skipped[name] = (f"{type(value).__module__}.{type(value).__qualname__} (a volunteer can only send "
                             f"arrays, numbers, str, bytes, lists, tuples, dicts and sets: convert it, or on a "
                             f"network you trust set depin.volunteer.allow-pickle: true)")
    return out


def to_payload(result: dict[str, Any]) -> bytes:
    """The run's result dict as pickle-free bytes (worker side)."""
    from .remote import RichValue

    r = dict(result)
    skipped = dict(r.get("skipped") or {})
    r["outputs"] = _values_safe(r.get("outputs") or {}, skipped)
    r["mutated"] = _values_safe(r.get("mutated") or {}, skipped)
    r["skipped"] = skipped
    if r.get("error"):
        r["error"] = {k: v for k, v in r["error"].items() if k != "exception"}  # text only
    if "value" in r:
        value = r["value"]
        if isinstance(value, RichValue):
            r["value"] = {_RICH: [value.data, value.metadata]}
        elif safe_codec.encodable(value) is not None:
            data, md = value._repr_mimebundle_() if hasattr(value, "_repr_mimebundle_") else ({}, {})
            r["value"] = {_RICH: [data or {"text/plain": repr(value)}, md or {}]}
    r.pop("shown", None)
    try:
        return safe_codec.encode(r, name="result")
    except safe_codec.UnsafeValueError as e:  # something outside the values: send the error instead
        return safe_codec.encode({"status": "error", "worker": r.get("worker"), "stream_count": r.get("stream_count", 0),
                                  "error": {"type": "UnsafeValueError", "module": "depin_jupyter.safe_codec",
                                            "message": str(e), "traceback": ""}})


def from_payload(payload: bytes, max_bytes: int | None = None) -> dict[str, Any]:
    """Decode a relayed result (notebook side): plain data and arrays only, never unpickled."""
    from .remote import RichValue

    result = safe_codec.decode(payload, max_bytes=max_bytes)
    if not isinstance(result, dict) or "status" not in result:
        raise safe_codec.DecodeError("a relayed result is not a run result")
    value = result.get("value")
    if isinstance(value, dict) and set(value) == {_RICH}:
        data, md = value[_RICH]
        result["value"] = RichValue(dict(data), dict(md))
    return result


def run_cell_relayed(spec: dict[str, Any], inputs: dict[str, Any]) -> str:
    """The `%%depin` task on a volunteer: run the cell, push its result to the coordinator, return a marker.

    With the sandbox on (the default on volunteers, `depin_jupyter.sandbox`) the cell runs in a child
    process under limits. The CPU time the cell really used (the child's, or the cell thread's
    ``time.thread_time`` without the sandbox: sleeping counts for nothing) is reported as the event
    ``depin-credit``; the coordinator's ledger turns it into normalized credit. The same event carries
    the energy the cell's measurement found (`energy.py`: joules, or none and why), which the ledger
    totals per volunteer. Both are self-reported by the volunteer's worker: replication checks results,
    not credit or energy.
    """
    import time

    from distributed import get_worker
    from distributed.utils import sync

    from . import sandbox
    from .remote import STREAM_TOPIC, run_cell

    worker = get_worker()
    key = worker.get_current_task()
    try:
        inputs = resolve_inputs(worker, inputs)
    except InputMissingError as e:  # the notebook re-sends the inputs inside the task and runs it again
        error = sandbox._error_result(spec, (worker.address, None if worker.name is None else str(worker.name)),
                                      str(e), type_name="InputMissingError", limit="input-cache")
        sync(worker.loop, worker.scheduler.depin_relay_put, key=str(key), payload=to_payload(error))
        return RELAYED
    limits = sandbox.Limits.from_config()
    if limits.is_enabled(volunteer=True):
        # In a child process with limits (and bubblewrap when present); what it sends back is the
        # pickle-free payload and stream events, never unpickled here. CPU time is measured by this
        # process (wait4, the child's process tree), or, if the child exited too fast for that, taken
        # from the child's own figure capped by its cores x wall time (`sandbox.run_sandboxed`).
        stats: dict[str, Any] = {}
        payload = sandbox.run_sandboxed(spec, inputs, emit=lambda m: worker.log_event(STREAM_TOPIC, m),
                                        limits=limits, stats=stats)
        used = float(stats.get("cpu_seconds") or 0.0)
        energy = stats.get("energy")
    else:
        started = time.thread_time()
        result = run_cell(spec, inputs)
        used = time.thread_time() - started
        energy = result.get("energy")
        payload = to_payload(result)
    try:
        worker.log_event("depin-credit", {"key": str(key), "cpu_seconds": float(used), **_energy_fields(energy)})
    except Exception:  # noqa: BLE001, S110 - credit is best effort; the result matters
        pass
    sync(worker.loop, worker.scheduler.depin_relay_put, key=str(key), payload=payload)
    return RELAYED


def _energy_fields(energy: Any) -> dict[str, Any]:
    """What the ledger keeps of a cell's energy: ``energy_j`` (joules or None), its source or why not."""
    if not isinstance(energy, dict):
        return {"energy_j": None, "energy_reason": "no energy figures from the worker"}
    joules = energy.get("energy_j")
    if isinstance(joules, (int, float)) and not isinstance(joules, bool) and joules >= 0:
        return {"energy_j": float(joules), "energy_source": str(energy.get("source") or "")[:40]}
    return {"energy_j": None, "energy_reason": str(energy.get("reason") or "not measured")[:300]}


def fetch(client: Any, key: str) -> bytes | None:
    """The relayed payload of task ``key`` from the coordinator (removed there once fetched)."""
    return client.sync(client.scheduler.depin_relay_get, key=key)
