"""A `%%depin` cell as a client submits it to a volunteer network's coordinator: pickle-free, by design.

The spec and the inputs travel as `safe_codec` bytes (plain data and arrays). Inputs held by the coordinator
travel as references. Everything else a cell needs that only pickle can carry (notebook functions and
classes, ndarray subclasses, other objects) rides in one opaque ``blob``: cloudpickle bytes that neither the
coordinator nor the volunteer's worker ever unpickles — only the sandboxed child that runs the cell does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from depin_jupyter.protocol import safe_codec
from depin_jupyter.protocol.payloads import InputRef
from depin_jupyter.protocol.records import RunSpec

__all__ = ["CellInputs", "PLACEMENT_KEYS", "check_placement", "decode_inputs", "decode_spec", "encode_inputs",
           "encode_spec"]

_REF = "__depin_input_ref__"
# What a client may say about where its cell runs (Dask submit keywords), and nothing else.
PLACEMENT_KEYS = frozenset({"workers", "allow_other_workers", "resources"})


@dataclass
class CellInputs:
    """A cell's inputs on the worker: decoded plain values, references to fetch, and the unopened blob."""

    values: dict[str, Any]
    refs: dict[str, InputRef]
    blob: bytes | None


def encode_spec(spec: RunSpec) -> bytes:
    return safe_codec.encode(dict(spec), name="the cell's spec")


def decode_spec(data: bytes, max_bytes: int | None = None) -> RunSpec:
    """A submitted spec, checked for the keys and types the worker relies on (never unpickled)."""
    spec = safe_codec.decode(data, max_bytes=max_bytes)
    if not isinstance(spec, dict):
        raise safe_codec.DecodeError("a cell's spec is not a mapping")
    for key, kind in (("run_id", str), ("code", str), ("filename", str), ("modules", dict),
                      ("maybe_mutated", list), ("last_expr", bool)):
        if not isinstance(spec.get(key), kind):
            raise safe_codec.DecodeError(f"a cell's spec lacks {key!r} ({kind.__name__})")
    if spec.get("record"):
        raise safe_codec.DecodeError("a volunteer does not store runs itself (no 'record' in the spec)")
    return spec  # type: ignore[return-value]  # checked above


def encode_inputs(inputs: dict[str, Any]) -> tuple[bytes, bytes | None, list[str]]:
    """(safe-codec bytes of the plain inputs and references, the cloudpickle blob of the rest or None, the
    names that went into the blob)."""
    plain: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for name, value in inputs.items():
        if isinstance(value, InputRef):
            plain[name] = {_REF: [value.key, value.nbytes]}
        elif safe_codec.encodable(value, name=name) is None:
            plain[name] = value
        else:
            rest[name] = value
    blob = None
    if rest:
        from distributed.protocol import pickle as dpickle  # cloudpickle: notebook objects by value

        blob = bytes(dpickle.dumps(rest, protocol=5))
    return safe_codec.encode(plain, name="the cell's inputs"), blob, sorted(rest)


def decode_inputs(data: bytes, blob: bytes | None, max_bytes: int | None = None) -> CellInputs:
    """The inputs of a submitted cell, decoded without unpickling (the blob stays bytes)."""
    plain = safe_codec.decode(data, max_bytes=max_bytes)
    if not isinstance(plain, dict) or not all(isinstance(k, str) for k in plain):
        raise safe_codec.DecodeError("a cell's inputs are not a mapping of names")
    values: dict[str, Any] = {}
    refs: dict[str, InputRef] = {}
    for name, value in plain.items():
        if isinstance(value, dict) and set(value) == {_REF}:
            key, nbytes = value[_REF]
            refs[name] = InputRef(str(key), int(nbytes))
        else:
            values[name] = value
    if blob is not None and not isinstance(blob, bytes):
        raise safe_codec.DecodeError("a cell's blob is not bytes")
    return CellInputs(values, refs, blob)


def check_placement(placement: Any) -> dict[str, Any]:
    """The Dask submit keywords a client asked for, if they are only those it may ask for (plain data)."""
    if not isinstance(placement, dict) or not set(placement) <= PLACEMENT_KEYS:
        raise ValueError(f"a cell may only say {sorted(PLACEMENT_KEYS)} about where it runs")
    out: dict[str, Any] = {}
    workers = placement.get("workers")
    if workers is not None:
        if not isinstance(workers, (list, tuple)) or not all(isinstance(w, str) for w in workers):
            raise ValueError("placement 'workers' must be a list of addresses")
        out["workers"] = list(workers)
    if "allow_other_workers" in placement:
        out["allow_other_workers"] = bool(placement["allow_other_workers"])
    resources = placement.get("resources")
    if resources is not None:
        if not isinstance(resources, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                for k, v in resources.items()):
            raise ValueError("placement 'resources' must map names to non-negative numbers")
        out["resources"] = dict(resources)
    return out
