"""A `%%depin` cell on a volunteer: run it (sandboxed), push its pickle-free result to the coordinator.

Volunteers sit behind NAT and firewalls: their workers dial out to the coordinator, nobody can dial in,
while stock Dask fetches a task's result by dialling the worker that holds it. On a volunteer network a
cell therefore runs as `run_cell_gateway`: the worker encodes the result (`protocol.payloads`) and pushes
it to the coordinator over its own connection; the task itself returns a marker, and the notebook fetches
the payload from the coordinator.

Inputs come the same way: a large array is held by the coordinator and the task carries an `InputRef`;
this worker fetches the bytes over its own connection and keeps them in a small LRU cache
(``depin.volunteer.input-cache-bytes``), so a reused input crosses the network neither from the notebook
nor, on the same volunteer, from the coordinator again.
"""

from __future__ import annotations

import time
from typing import Any

from depin_jupyter import config
from depin_jupyter.lru import ByteLRU
from depin_jupyter.protocol.constants import CREDIT_TOPIC, RELAYED, STREAM_TOPIC, owner_scoped
from depin_jupyter.protocol.payloads import InputRef, energy_fields, to_payload
from depin_jupyter.protocol.records import RunSpec, error_result
from depin_jupyter.protocol.rpc import Coordinator

__all__ = ["InputMissingError", "resolve_inputs", "run_cell_gateway"]


class InputMissingError(Exception):
    """The coordinator no longer holds an input a task refers to (its input cache dropped it)."""


# Serialized inputs this worker fetched (bytes: never shared objects, so a cell that changes its input in
# place cannot change what the next cell gets).
_cache: ByteLRU[bytes] | None = None


def _input_cache() -> ByteLRU[bytes]:
    global _cache
    limit = config.nbytes("volunteer.input-cache-bytes")
    if _cache is None:
        _cache = ByteLRU(limit)
    _cache.max_bytes = limit  # the setting may change while the worker runs
    return _cache


def resolve_inputs(coordinator: Coordinator, inputs: dict[str, Any], task: str, owner: str = "") -> dict[str, Any]:
    """``inputs`` with each `InputRef` replaced by its value (from this worker's cache or the coordinator,
    read in parts as they arrive there: a new input may still be on its way from the notebook). Kept here
    per ``owner`` (the submitting client, as the coordinator says): one client's bytes never stand in for
    another's under the same content key.

    Raises InputMissingError naming the input when the coordinator no longer holds it.
    """
    refs = {n: v for n, v in inputs.items() if isinstance(v, InputRef)}
    if not refs:
        return inputs
    from distributed.protocol import deserialize_bytes

    cache = _input_cache()
    out = dict(inputs)
    for name, ref in refs.items():
        mine = owner_scoped(owner, ref.key)
        data = cache.get(mine)
        if data is None:
            data = coordinator.input_fetch(ref.key, task)
            if data is None:
                raise InputMissingError(
                    f"input {name!r} ({ref.nbytes} bytes) is not held by the coordinator (its input cache dropped "
                    f"it: depin.coordinator.input-cache-bytes, or its upload stalled: "
                    f"depin.coordinator.upload-stall)")
            cache.put(mine, data, len(data))
        out[name] = deserialize_bytes(data)
    return out


def _run(spec: RunSpec, inputs: dict[str, Any], blob: bytes | None, worker: Any) -> tuple[bytes, float, Any]:
    """(payload, CPU seconds the cell used, its energy figures): in the sandbox, or in this thread."""
    from depin_jupyter.worker import sandbox

    limits = sandbox.Limits.from_config()
    if limits.is_enabled(volunteer=True):
        # In a child process with limits (and bubblewrap when present); what it sends back is the
        # pickle-free payload and stream events, never unpickled here; the blob is opened only there.
        # CPU time is measured by this process (wait4, the child's process tree), or, if the child exited
        # too fast for that, taken from the child's own figure capped by its cores x wall time.
        stats: dict[str, Any] = {}
        payload = sandbox.run_sandboxed(spec, inputs, emit=lambda m: worker.log_event(STREAM_TOPIC, m),
                                        limits=limits, stats=stats, blob=blob)
        return payload, float(stats.get("cpu_seconds") or 0.0), stats.get("energy")
    import pickle

    from depin_jupyter.worker.execute import run_cell

    if blob is not None:  # no sandbox on this volunteer (depin.sandbox.enabled: false): its own choice
        inputs = {**inputs, **pickle.loads(blob)}  # noqa: S301 - the volunteer turned the sandbox off
    started = time.thread_time()
    result = run_cell(spec, inputs)
    return to_payload(result), time.thread_time() - started, result.get("energy")


def run_cell_gateway(spec_data: bytes, inputs_data: bytes, blob: bytes | None, owner: str = "") -> str:
    """The `%%depin` task on a volunteer: run a cell of ``owner``, push its result to the coordinator, return
    a marker.

    The spec and inputs are decoded with `safe_codec` (never unpickled here); inputs held by the coordinator
    are fetched. With the sandbox on (the default on volunteers, `depin_jupyter.worker.sandbox`) the cell
    runs in a child process under limits. The CPU time the cell really used (the child's, or the cell
    thread's ``time.thread_time`` without the sandbox: sleeping counts for nothing) is claimed in the event
    `CREDIT_TOPIC`, with the energy the cell's measurement found (`worker.energy`); the coordinator caps
    both by what it saw (`network.credit`).
    """
    from distributed import get_worker

    from depin_jupyter.protocol.cells import decode_inputs, decode_spec

    worker = get_worker()
    coordinator = Coordinator.of_worker(worker)
    key = str(worker.get_current_task())
    spec = decode_spec(spec_data)
    cell = decode_inputs(inputs_data, blob)
    try:
        inputs = resolve_inputs(coordinator, {**cell.values, **cell.refs}, key, owner)
    except InputMissingError as e:  # the notebook re-sends the inputs inside the task and runs it again
        error = error_result(spec, (worker.address, None if worker.name is None else str(worker.name)),
                             str(e), type_name="InputMissingError", module=__name__, limit="input-cache")
        coordinator.relay_put(key, to_payload(error))
        return RELAYED
    payload, used, energy = _run(spec, inputs, cell.blob, worker)
    try:
        worker.log_event(CREDIT_TOPIC, {"key": key, "cpu_seconds": float(used), **energy_fields(energy)})
    except Exception:  # noqa: BLE001, S110 - credit is best effort; the result matters
        pass
    coordinator.relay_put(key, payload)
    return RELAYED
