"""Moving a cell's variables: inputs to the cluster (content-hashed, sent once), results back into the namespace.

Inputs are classified: modules travel as their import path and are re-imported on the worker;
small immutable values ride inside the task; everything else is scattered once under a key made
of its content hash and kept on the cluster (LRU, `depin.input-cache-bytes`), so a cell that reads
the same 1 GiB array again ships nothing. Results are bound back by `kernel.binding`.
"""

from __future__ import annotations

import collections
import sys
import threading
import types
from dataclasses import dataclass, field
from typing import Any

from depin_jupyter import config
from depin_jupyter.errors import CellInputError
from depin_jupyter.protocol.bundles import ModuleBundle
from depin_jupyter.protocol.constants import MODULES_ARG
from depin_jupyter.protocol.values import ByValue, box, content_hash
from depin_jupyter.protocol.views import InputView, windows

__all__ = ["InputCache", "ShippedInputs", "ship_inputs"]

_INLINE_TYPES = (int, float, complex, bool, str, bytes, type(None))
_INLINE_MAX_BYTES = 64 * 1024


@dataclass
class ShippedInputs:
    """What a run's inputs became: task arguments, modules to import, and what was sent."""

    args: dict[str, Any] = field(default_factory=dict)       # name -> future or inline value
    modules: dict[str, str] = field(default_factory=dict)    # name -> module import path
    hashes: dict[str, str] = field(default_factory=dict)     # name -> content hash
    sent_bytes: int = 0                                      # bytes scattered by this run
    reused: list[str] = field(default_factory=list)          # names found on the cluster already
    views: dict[str, str] = field(default_factory=dict)      # name -> the input it is sent as a view of


class InputCache:
    """Futures of inputs already on the cluster, by content hash, least recently used released first."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes if max_bytes is not None else config.nbytes("input-cache-bytes")
        self._items: collections.OrderedDict[str, tuple[Any, int]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.total_sent = 0  # bytes scattered over the session's life (tests and benchmarks read it)

    def get(self, key: str) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            fut, _ = item
            if fut.status in ("error", "cancelled", "lost"):
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return fut

    def put(self, key: str, future: Any, nbytes: int) -> None:
        with self._lock:
            self._items[key] = (future, nbytes)
            self._items.move_to_end(key)
            total = sum(n for _, n in self._items.values())
            while total > self.max_bytes and len(self._items) > 1:
                _, (old, n) = self._items.popitem(last=False)
                total -= n
                old.release()

    def discard(self, key: str) -> None:
        with self._lock:
            item = self._items.pop(key, None)
        if item is not None:
            item[0].release()

    def clear(self) -> None:
        with self._lock:
            items = list(self._items.values())
            self._items.clear()
        for fut, _ in items:
            fut.release()

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        return len(self._items)


def _is_inline(value: Any) -> bool:
    if isinstance(value, _INLINE_TYPES):
        return not isinstance(value, (str, bytes)) or len(value) <= _INLINE_MAX_BYTES
    return False


def _serialized_size(name: str, value: Any) -> int:
    """Bytes ``value`` takes on the wire; raises CellInputError naming the variable if it cannot travel."""
    from distributed.protocol import serialize

    try:
        _, frames = serialize(value, serializers=("cuda", "dask", "pickle"), on_error="raise")
    except Exception as e:  # noqa: BLE001 - any failure means it cannot travel
        raise CellInputError(
            f"input {name!r} of type {type(value).__module__}.{type(value).__qualname__} cannot be sent to "
            f"a worker: {type(e).__name__}: {e}. Recreate it inside the %%depin cell, or leave it out "
            f"with --inputs."
        ) from None
    return sum(memoryview(f).nbytes for f in frames)


def fingerprints(namespace: dict[str, Any], names: list[str]) -> dict[str, str]:
    """Content hash of each input (modules by import path): the cache key's and the cluster's view."""
    return {n: ("module:" + namespace[n].__name__ if isinstance(namespace[n], types.ModuleType)
                else content_hash(namespace[n])) for n in names}


def _carry(value: Any, local: frozenset[str]) -> Any:
    """``value`` boxed for the trip; by value when it comes from one of the notebook's own modules."""
    of = value if isinstance(value, (type, types.FunctionType)) else type(value)
    if local and str(getattr(of, "__module__", "") or "").split(".")[0] in local:
        return ByValue(value)
    return box(value)


def ship_inputs(client: Any, namespace: dict[str, Any], names: list[str], cache: InputCache,
                modules: ModuleBundle | None = None, hashes: dict[str, str] | None = None,
                inline: bool = False, via_coordinator: bool = False,
                keep_inline: frozenset[str] = frozenset()) -> ShippedInputs:
    """Prepare ``names`` from ``namespace`` for a run, scattering only content the cluster lacks.

    ``modules``, the source of the notebook's own modules the cell needs, travels the same way;
    ``hashes`` are the inputs' `fingerprints` when the caller already computed them. ``inline`` sends
    inputs inside the task instead (volunteer networks: scattering would dial the workers); with
    ``via_coordinator`` large arrays among them are put on the coordinator once and referred to
    (`relay.InputRef`), except the names in ``keep_inline`` (private data: held by no one else).
    """
    shipped = ShippedInputs()
    local = frozenset(modules.names) if modules is not None else frozenset()
    if inline:
        if modules is not None:
            shipped.args[MODULES_ARG] = modules.files
            shipped.sent_bytes += modules.nbytes
        by_ref: dict[str, Any] = {}
        min_ref = config.nbytes("coordinator.input-ref-min-bytes") if via_coordinator else 0
        for name in names:
            value = namespace[name]
            if isinstance(value, types.ModuleType):
                shipped.modules[name] = value.__name__
            elif via_coordinator and name not in keep_inline and _ref_worthy(value, min_ref):
                by_ref[name] = value
            else:
                shipped.args[name] = _carry(value, local)
                if not _is_inline(value):
                    shipped.sent_bytes += _serialized_size(name, value)
        if by_ref:
            _ship_via_coordinator(client, by_ref, hashes or {}, shipped)
        cache.total_sent += shipped.sent_bytes
        return shipped
    to_send: dict[str, tuple[str, Any, int]] = {}
    if modules is not None:
        fut = cache.get(modules.key)
        if fut is not None:
            shipped.args[MODULES_ARG] = fut
        else:
            to_send[modules.key] = (MODULES_ARG, modules.files, modules.nbytes)
        shipped.hashes[MODULES_ARG] = modules.key
    # An input that is a view of another input travels as that: the worker rebuilds it on its copy.
    views = windows({n: namespace[n] for n in names}, "input")
    for name in names:
        value = namespace[name]
        if isinstance(value, types.ModuleType):
            shipped.modules[name] = value.__name__
            continue
        if name in views:
            shipped.args[name] = InputView(views[name])
            shipped.views[name] = views[name]["of"]
            continue
        if _is_inline(value):
            shipped.args[name] = value
            continue
        key = "depin-input-" + (hashes[name] if hashes and name in hashes else content_hash(value))
        shipped.hashes[name] = key
        fut = cache.get(key)
        if fut is not None:
            shipped.args[name] = fut
            shipped.reused.append(name)
        elif key in to_send:  # two names, one content: send once
            continue
        else:
            to_send[key] = (name, value, _serialized_size(name, value))
    if to_send:
        futures = client.scatter({key: _carry(value, local) for key, (_, value, _) in to_send.items()}, hash=False)
        for key, (_, _, size) in to_send.items():
            cache.put(key, futures[key], size)
            shipped.sent_bytes += size
        cache.total_sent += shipped.sent_bytes
    for name, key in shipped.hashes.items():
        if name not in shipped.args:
            shipped.args[name] = cache.get(key) or futures[key]
    return shipped


def _ref_worthy(value: Any, min_bytes: int) -> bool:
    """A host array big enough to be worth holding on the coordinator (cupy and others ride in the task)."""
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.ndarray) and value.nbytes >= min_bytes


def _ship_via_coordinator(client: Any, values: dict[str, Any], hashes: dict[str, str], shipped: ShippedInputs) -> None:
    """Refer to ``values`` by content key, sending the coordinator only those it does not hold yet.

    One round trip learns which are held and opens uploads for the rest; those then stream in parts from a
    thread while the cell is submitted and dispatched (the volunteer reads each part as it arrives), so a
    new input costs about one hop, not a put and then a fetch. What does not fit rides inside the task."""
    from distributed.protocol import serialize_bytes

    from depin_jupyter.protocol.payloads import InputRef
    from depin_jupyter.protocol.rpc import Coordinator

    coordinator = Coordinator.of_client(client)
    keys = {name: "depin-input-" + (hashes.get(name) or content_hash(value)) for name, value in values.items()}
    try:
        held, stream = coordinator.input_offer({keys[n]: int(v.nbytes) for n, v in values.items()})
    except Exception:  # noqa: BLE001 - a coordinator without an input cache (older): inside the task
        for name, value in values.items():
            shipped.args[name] = box(value)
            shipped.sent_bytes += _serialized_size(name, value)
        return
    uploads: dict[str, bytes] = {}
    for name, value in values.items():
        key = keys[name]
        if key in held:
            shipped.reused.append(name)
        elif key not in uploads:
            try:
                data = serialize_bytes(box(value), serializers=("dask", "pickle"), on_error="raise")
            except Exception as e:  # noqa: BLE001 - any failure means it cannot travel
                raise CellInputError(
                    f"input {name!r} of type {type(value).__module__}.{type(value).__qualname__} cannot be sent "
                    f"to a worker: {type(e).__name__}: {e}. Recreate it inside the %%depin cell, or leave it "
                    f"out with --inputs.") from None
            shipped.sent_bytes += len(data)
            if key not in stream:
                shipped.args[name] = box(value)  # larger than the coordinator's room for inputs: inline
                continue
            uploads[key] = data
        shipped.hashes[name] = key
        shipped.args[name] = InputRef(key, len(uploads[key]) if key in uploads else int(value.nbytes))
    if uploads:
        threading.Thread(target=_stream_inputs, args=(coordinator, uploads), daemon=True,
                         name="depin-input-upload").start()


def _stream_inputs(coordinator: Any, uploads: dict[str, bytes]) -> None:
    """Send offered inputs in parts (a thread: the cell is submitted meanwhile). A failed upload is logged;
    the volunteer waiting on it is told the input is gone, and the notebook sends it inside the task."""
    import logging

    for key, data in uploads.items():
        try:
            coordinator.input_stream(key, data)
        except Exception as e:  # noqa: BLE001 - the run reports the missing input; this says why
            logging.getLogger("depin_jupyter").warning("streaming input %s to the coordinator failed: %s: %s",
                                                       key, type(e).__name__, e)
