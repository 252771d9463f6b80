"""Inputs on their way in: a notebook streams a new big input in parts while its cell is already dispatched,
and the volunteer reads each part as soon as it has arrived, so the coordinator never stores a whole input
before forwarding it (a transfer costs about one hop, not two).

An upload is opened by the notebook's offer (`depin_input_offer`), filled part by part
(`depin_input_put` with an index) and, once whole, handed to the `relay.InputStore` that keeps it for
reuse. Parts are `PART_BYTES` long (the last one shorter); an upload that gets no part for ``stall``
seconds (its notebook died) is dropped, and a volunteer waiting on it is told the input is gone. Only
bytes: nothing here is ever unpickled.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from depin_jupyter.errors import TrustError
from depin_jupyter.network.relay import InputStore
from depin_jupyter.protocol.constants import PART_BYTES, owner_scoped, part_count

__all__ = ["InputDesk", "Uploads", "part_of"]


@dataclass
class _Upload:
    nbytes: int
    count: int
    parts: dict[int, bytes] = field(default_factory=dict)
    touched: float = field(default_factory=time.monotonic)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    gone: bool = False
    gen: str = field(default_factory=lambda: uuid.uuid4().hex)  # tells this upload from a later one of its key


class Uploads:
    """The inputs being streamed in, by (scoped) key; at most ``budget`` bytes open at once."""

    def __init__(self) -> None:
        self._open: dict[str, _Upload] = {}

    @property
    def nbytes(self) -> int:
        return sum(u.nbytes for u in self._open.values())

    def __contains__(self, key: object) -> bool:
        return key in self._open

    def __len__(self) -> int:
        return len(self._open)

    def open(self, key: str, nbytes: int, budget: int) -> bool:
        """Make room for ``nbytes`` under ``key``; False when the open uploads would pass ``budget``."""
        if key in self._open:
            return True
        if nbytes < 0 or self.nbytes + nbytes > budget:
            return False
        self._open[key] = _Upload(nbytes, part_count(nbytes))
        return True

    def put(self, key: str, index: int, data: bytes, total: int, limit: int) -> bytes | None:
        """Part ``index`` of ``key`` (``total`` bytes in all, at most ``limit``); the whole input once its last
        part is in (the upload stays readable until `close`). TrustError for a part that does not belong
        (unknown upload, bad index or length)."""
        up = self._open.get(key)
        if up is None or up.gone:
            raise TrustError(f"no upload of {key!r} is open on the coordinator (it stalled and was dropped, or "
                             f"was never offered): run the cell again")
        if total != up.nbytes:
            if up.parts or not 0 <= total <= limit:  # the offer named the array's size; the first part, exact
                raise TrustError(f"upload {key!r} is {up.nbytes} bytes, not {total}")
            up.nbytes, up.count = total, part_count(total)
        if not 0 <= index < up.count:
            raise TrustError(f"part {index} of {key!r} is out of range (it has {up.count} parts)")
        want = min(PART_BYTES, up.nbytes - index * PART_BYTES) if up.nbytes else 0
        if len(data) != want:
            raise TrustError(f"part {index} of {key!r} is {len(data)} bytes, not {want}")
        up.parts.setdefault(index, bytes(data))
        up.touched = time.monotonic()
        up.changed.set()
        up.changed = asyncio.Event()
        if len(up.parts) < up.count:
            return None
        return b"".join(up.parts[i] for i in range(up.count))

    def close(self, key: str) -> None:
        """Forget the upload of ``key`` (it is whole and held elsewhere now, or it failed)."""
        up = self._open.pop(key, None)
        if up is not None:
            up.gone = True
            up.changed.set()

    async def read(self, key: str, index: int, stall: float) -> tuple[int, bytes, str] | None:
        """(parts in all, part ``index``, the upload's generation) of an open upload, waiting while it is
        filling; None when there is no such upload, it was dropped meanwhile (a later upload of the same key
        is another one), or it got no part for ``stall`` seconds (then it is dropped)."""
        up = self._open.get(key)
        while True:
            if up is None or up.gone or not 0 <= index < up.count:
                return None
            if index in up.parts:
                return up.count, up.parts[index], up.gen
            left = up.touched + stall - time.monotonic()
            if left <= 0:
                self.close(key)
                return None
            try:
                await asyncio.wait_for(up.changed.wait(), left)
            except TimeoutError:
                continue

    def gen(self, key: str) -> str | None:
        up = self._open.get(key)
        return None if up is None else up.gen

    def expire(self, stall: float) -> int:
        """Drop the uploads that got no part for ``stall`` seconds; how many."""
        now = time.monotonic()
        stale = [k for k, u in self._open.items() if now - u.touched > stall]
        for key in stale:
            self.close(key)
        return len(stale)


class InputDesk:
    """The coordinator's inputs, held (`relay.InputStore`) and on their way in (`Uploads`), per client."""

    def __init__(self, store: InputStore) -> None:
        self.store = store
        self.uploads = Uploads()

    def has(self, owner: str, keys: list[str]) -> list[str]:
        """Which of ``keys`` the coordinator holds for ``owner`` or is being sent them (so a cell may refer
        to them now: a volunteer waits for the parts still on their way)."""
        held = set(self.store.has([owner_scoped(owner, k) for k in keys]))
        return [k for k in keys if owner_scoped(owner, k) in held or owner_scoped(owner, k) in self.uploads]

    def offer(self, owner: str, sizes: dict[str, int], limit: int, stall: float) -> dict[str, list[str]]:
        """Of ``sizes`` (content key -> serialized bytes): those held, and those to stream in parts now (the
        rest do not fit: they ride inside the task)."""
        self.uploads.expire(stall)
        held = self.has(owner, list(sizes))
        stream = [k for k, n in sizes.items() if k not in held and 0 <= int(n) <= limit
                  and self.uploads.open(owner_scoped(owner, k), int(n), limit)]
        return {"held": held, "stream": stream}

    async def put(self, owner: str, key: str, data: bytes, index: int | None, limit: int, total: int = -1) -> str:
        """A whole input (``index`` None: "OK" or "too-large") or one part of an offered upload of ``total``
        bytes ("whole" once it completed the input)."""
        name = owner_scoped(owner, key)
        if index is None:
            return "OK" if await asyncio.to_thread(self.store.put, name, data, limit) else "too-large"
        whole = self.uploads.put(name, int(index), data, int(total), limit)
        if whole is None:
            return "OK"
        try:  # the upload stays readable while the disk write runs
            await asyncio.to_thread(self.store.put, name, whole, limit)
        finally:
            self.uploads.close(name)
        return "whole"

    async def read(self, owner: str, key: str, index: int, stall: float) -> dict[str, Any] | None:
        """``{"count": parts, "data": part index}`` of an input of ``owner``, waiting for a part on its way;
        None when the coordinator does not hold it (dropped from the cache, or its upload stalled)."""
        name = owner_scoped(owner, key)
        data = self.store.peek(name)
        if data is None:
            got = await self.uploads.read(name, index, stall)
            if got is not None:
                self.store.stats["streamed"] += 1  # parts read while they were arriving
                if index == 0:
                    self.store.stats["gets"] += 1
                return {"count": got[0], "data": got[1]}
            data = self.store.peek(name)  # it became whole (and left the uploads) while this read waited
        if index == 0:
            self.store.stats["misses" if data is None else "gets"] += 1
        return None if data is None else part_of(data, index)


def part_of(payload: bytes, index: int) -> dict[str, Any]:
    """The answer to a read of part ``index`` of a whole ``payload``: how many parts, and that one."""
    return {"count": part_count(len(payload)), "data": payload[index * PART_BYTES:(index + 1) * PART_BYTES]}
