"""Big results on their way out: a volunteer pushes a result in parts, and its notebook reads each part as
soon as it has arrived (told by a stream event), so the coordinator never stores a whole result before
forwarding it; a result handed over in parts is held until every part was read (or the result TTL).

Only results of unreplicated runs are read while they arrive: a replicated run's result is the one the
coordinator accepted after judging, so it is read only once judged. Only bytes: nothing here is unpickled.
"""

from __future__ import annotations

import time
from typing import Any

from depin_jupyter.errors import TrustError
from depin_jupyter.network.uploads import Uploads
from depin_jupyter.protocol.constants import PART_BYTES, part_count

__all__ = ["ResultParts"]


class ResultParts:
    """Results arriving in parts (`Uploads` by task key) and results handed over in parts, by task key."""

    def __init__(self) -> None:
        self.arriving = Uploads()
        self._handed: dict[str, tuple[bytes, float, str]] = {}  # key -> (payload, when handed over, to whom)
        self._served: dict[str, set[int]] = {}              # key -> parts its client has read
        self.stats = {"parts-read-arriving": 0, "parts-read-after": 0}  # before the run's end was answered, after
        self._senders: dict[str, str] = {}  # key -> address of the worker whose parts are arriving
        self.gens: dict[str, str] = {}      # key -> generation of its whole result (the upload it came from)

    def receive(self, key: str, sender: str, index: int, data: bytes, total: int, room: int, limit: int,
                stall: float) -> tuple[bytes | None, bool]:
        """Part ``index`` of the result of ``key`` from the worker at ``sender``: (the whole result once its
        last part is in, whether this part began the upload). Parts from another worker than the one that
        began (the run was moved: its volunteer left) start the upload over; ``room``: bytes the relay has."""
        self.arriving.expire(stall)
        if key in self.arriving and self._senders.get(key) != sender:
            self.arriving.close(key)  # never a mix of two runs' parts
        began = key not in self.arriving
        if began:
            if not self.arriving.open(key, total, room - self.nbytes):
                raise TrustError(f"the coordinator's result relay is full ({limit} bytes held for clients); "
                                 f"store large results with the Zarr store instead of returning them")
            self._senders[key] = sender
        whole = self.arriving.put(key, index, data, total, limit)
        if whole is not None:
            self.gens[key] = self.arriving.gen(key) or ""
            self.arriving.close(key)
            self._senders.pop(key, None)
        return whole, began

    @property
    def nbytes(self) -> int:
        return self.arriving.nbytes + sum(len(p) for p, _, _ in self._handed.values())

    def hand_over(self, key: str, payload: bytes | None, asker: str) -> dict[str, Any]:
        """What a finished run's answer to ``asker`` carries: a small payload itself, a big one as its number
        of parts (read by the asker with `handed`; those read while they arrived are not kept again)."""
        if payload is None or len(payload) <= PART_BYTES:
            self._served.pop(key, None)
            return {"payload": payload}
        count = part_count(len(payload))
        if len(self._served.get(key, ())) < count:
            self._handed[key] = (payload, time.monotonic(), asker)
        else:
            self._served.pop(key, None)
        return {"parts": count, "nbytes": len(payload)}

    def handed(self, key: str, asker: str) -> bytes | None:
        """The result handed over to ``asker`` under ``key`` (None for anyone else)."""
        item = self._handed.get(key)
        return None if item is None or item[2] != asker else item[0]

    def served(self, key: str, index: int, count: int) -> None:
        """Part ``index`` of ``key`` was read; a handed-over result all of whose parts were read is dropped."""
        self.stats["parts-read-after" if key in self._handed else "parts-read-arriving"] += 1
        seen = self._served.setdefault(key, set())
        seen.add(index)
        if len(seen) >= count and key in self._handed:
            del self._handed[key]
            del self._served[key]

    def expire(self, ttl: float) -> None:
        """Drop handed-over results not read within ``ttl`` seconds (their client went away)."""
        now = time.monotonic()
        for key in [k for k, (_, t, _) in self._handed.items() if now - t > ttl]:
            del self._handed[key]
            self._served.pop(key, None)
        for book in (self._served, self.gens):  # of runs never answered (lost ones): forgotten in time
            if len(book) > 10_000:
                for key in [k for k in book if k not in self._handed and k not in self.arriving]:
                    del book[key]
