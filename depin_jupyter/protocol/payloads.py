"""Results of cells run by volunteers, as pickle-free bytes: what a volunteer's worker sends and a notebook reads.

The worker encodes a cell's `RunResult` with `safe_codec` (plain data and arrays, no pickle); values that
cannot be encoded that way are reported by name, not sent. The notebook decodes it without unpickling.
Inputs the other way: an array of at least ``depin.coordinator.input-ref-min-bytes`` is held by the
coordinator under its content key, and the task carries an `InputRef` to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from depin_jupyter.protocol import safe_codec
from depin_jupyter.protocol.constants import RELAYED
from depin_jupyter.protocol.records import RunResult
from depin_jupyter.protocol.values import RichValue, unbox

__all__ = ["RELAYED", "InputRef", "energy_fields", "from_payload", "to_payload"]



_RICH = "__depin_rich__"


@dataclass(frozen=True)
class InputRef:
    """An input held by the coordinator under ``key`` (its serialized bytes: ``nbytes``)."""

    key: str
    nbytes: int


def _values_safe(values: dict[str, Any], skipped: dict[str, str]) -> dict[str, Any]:
    out = {}
    for name, value in values.items():
        value = unbox(value)
        why = safe_codec.encodable(value, name=name)
        if why is None:
            out[name] = value
        else:
            # apply_results words it: "output 'k' of type <this> could not be brought back"
            skipped[name] = (f"{type(value).__module__}.{type(value).__qualname__} (a volunteer can only send "
                             f"arrays, numbers, str, bytes, lists, tuples, dicts and sets: convert it to those, "
                             f"or run the cell on a cluster of your own)")
    return out


def to_payload(result: RunResult | dict[str, Any]) -> bytes:
    """The run's result dict as pickle-free bytes (worker side)."""
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
                                  "error": {"type": "UnsafeValueError", "module": "depin_jupyter.protocol.safe_codec",
                                            "message": str(e), "traceback": ""}})


def from_payload(payload: bytes, max_bytes: int | None = None) -> RunResult:
    """Decode a relayed result (notebook side): plain data and arrays only, never unpickled."""
    result = safe_codec.decode(payload, max_bytes=max_bytes)
    if not isinstance(result, dict) or "status" not in result:
        raise safe_codec.DecodeError("a relayed result is not a run result")
    value = result.get("value")
    if isinstance(value, dict) and set(value) == {_RICH}:
        data, md = value[_RICH]
        result["value"] = RichValue(dict(data), dict(md))
    return result  # type: ignore[return-value]  # checked above: a dict with a status


def energy_fields(energy: Any) -> dict[str, Any]:
    """What the ledger keeps of a cell's energy: ``energy_j`` (joules or None), its source or why not."""
    if not isinstance(energy, dict):
        return {"energy_j": None, "energy_reason": "no energy figures from the worker"}
    joules = energy.get("energy_j")
    if isinstance(joules, (int, float)) and not isinstance(joules, bool) and joules >= 0:
        return {"energy_j": float(joules), "energy_source": str(energy.get("source") or "")[:40]}
    return {"energy_j": None, "energy_reason": str(energy.get("reason") or "not measured")[:300]}
