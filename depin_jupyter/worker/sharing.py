"""What a cell's results still share with its inputs, found by identity and memory on the worker.

Pickling a result loses what it shares: a view `s = x[:2]` comes back as a copy, a list that still holds an
input's array holds a copy of it, `pop.index` is a new Index. So before the cell runs, every object inside
its inputs that aliases may point at is noted with its path (`Parts`); afterwards the results are matched
against them: views of the inputs' arrays (and of other outputs) are described by layout (`views`), outputs
that are an input's sub-object by path (`parts`), and sub-objects that a changed input or an output still
holds (`kept`). The notebook rebuilds each on its own objects (`kernel.binding`).
"""

from __future__ import annotations

import collections
import sys
from typing import Any

from depin_jupyter.protocol.parts import children, is_identity_worthy
from depin_jupyter.protocol.views import ViewRecord, describe, windows

__all__ = ["MAX_NODES", "Parts", "kept", "parts_of", "views"]

MAX_NODES = 10_000   # objects looked at inside one input or output


def _walk(root: Any) -> collections.abc.Iterator[tuple[list[Any], Any]]:
    """(path, object) of ``root``'s sub-objects, breadth first (shortest paths first), each object once."""
    queue: collections.deque[tuple[list[Any], Any]] = collections.deque(
        (list([step]), child) for step, child in children(root))
    seen = {id(root)}
    count = 0
    while queue and count < MAX_NODES:
        path, obj = queue.popleft()
        count += 1
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        yield path, obj
        queue.extend(([*path, step], child) for step, child in children(obj))


class Parts:
    """The inputs and every object inside them that an alias may hold, by id, with their input and path.

    Holds each object, so no id is reused by a new object while the cell runs.
    """

    def __init__(self, inputs: dict[str, Any]) -> None:
        self.by_id: dict[int, tuple[Any, str, list[Any]]] = {}
        for name, value in inputs.items():
            if is_identity_worthy(value):
                self.by_id.setdefault(id(value), (value, name, []))
        for name, value in inputs.items():
            for path, obj in _walk(value):
                if is_identity_worthy(obj):
                    self.by_id.setdefault(id(obj), (obj, name, path))

    def source(self, obj: Any) -> tuple[str, list[Any]] | None:
        """(input, path) of ``obj`` if it was inside an input before the cell ran."""
        entry = self.by_id.get(id(obj))
        return (entry[1], entry[2]) if entry is not None and entry[0] is obj else None


def views(outputs: dict[str, Any], parts: Parts) -> dict[str, ViewRecord]:
    """Outputs that are numpy views of an input's array (or of an array inside one), else of another output."""
    np = sys.modules.get("numpy")
    if np is None:
        return {}
    found: dict[str, ViewRecord] = {}
    inside = [(obj, name, path) for obj, name, path in parts.by_id.values() if isinstance(obj, np.ndarray)]
    arrays = {n: v for n, v in outputs.items() if isinstance(v, np.ndarray) and v.size}
    for name, v in arrays.items():
        if v.base is None:
            continue
        for src, of, path in inside:
            rec = describe(v, src, of, "input", path)
            if rec is not None:
                found[name] = rec
                break
    # Among the rest, the largest array holding another's memory carries it; the other is its view.
    found.update(windows({n: a for n, a in arrays.items() if n not in found}, "output"))
    return found


def parts_of(outputs: dict[str, Any], parts: Parts) -> dict[str, list[Any]]:
    """Outputs bound to an object inside an input (``first = L[0]``, ``idx = df.index``): name -> [input, path]."""
    out: dict[str, list[Any]] = {}
    for name, value in outputs.items():
        src = parts.source(value) if is_identity_worthy(value) else None
        if src is not None and src[1]:
            out[name] = [src[0], src[1]]
    return out


def kept(values: dict[str, Any], parts: Parts) -> dict[str, list[list[Any]]]:
    """For each value, the objects inside it that were inside an input: name -> [[path, input, input path]]."""
    out: dict[str, list[list[Any]]] = {}
    for name, root in values.items():
        found = [[path, *src] for path, obj in _walk(root) if (src := parts.source(obj)) is not None]
        if found:
            out[name] = found
    return out
