"""What the coordinator holds for others: cells' relayed results until their client fetches them, and inputs.

Volunteers sit behind NAT: they dial out, nobody dials in. A `%%depin` cell on a volunteer pushes its
pickle-free result here over its own connection; the client fetches it from here. The same way in: array
inputs are put here once by the notebook (held by content key, least recently used dropped first) and
fetched by the volunteers that run cells reading them. Only bytes: nothing here is ever unpickled.
"""

from __future__ import annotations

from depin_jupyter.errors import TrustError
from depin_jupyter.lru import ByteLRU

__all__ = ["InputStore", "ResultRelay"]


class ResultRelay:
    """Relayed results by task key, at most ``limit`` bytes in all (``depin.coordinator.relay-max-bytes``)."""

    def __init__(self) -> None:
        self._items: dict[str, bytes] = {}
        self.nbytes = 0

    def put(self, key: str, payload: bytes, limit: int) -> None:
        old = len(self._items.get(key, b""))
        if self.nbytes - old + len(payload) > limit:
            raise TrustError(f"the coordinator's result relay is full ({limit} bytes held for clients); "
                             f"store large results with the Zarr store instead of returning them")
        self._items[key] = bytes(payload)
        self.nbytes += len(payload) - old

    def get(self, key: str, pop: bool = True) -> bytes | None:
        data = self._items.get(key)
        if data is not None and pop:
            self.drop(key)
        return data

    def drop(self, key: str) -> None:
        data = self._items.pop(key, None)
        if data is not None:
            self.nbytes -= len(data)

    def __contains__(self, key: object) -> bool:
        return key in self._items


class InputStore:
    """Serialized inputs by content key (an LRU of ``depin.coordinator.input-cache-bytes``), with counters."""

    def __init__(self, limit: int) -> None:
        self.stats = {"puts": 0, "gets": 0, "misses": 0, "evicted": 0}
        self._lru: ByteLRU[bytes] = ByteLRU(limit, on_evict=self._evicted)

    def _evicted(self, key: str, data: bytes) -> None:
        self.stats["evicted"] += 1

    def put(self, key: str, data: bytes, limit: int) -> bool:
        """Hold ``data`` under ``key``; False if it cannot fit at all."""
        self._lru.max_bytes = limit
        if not self._lru.put(key, bytes(data), len(data)):
            return False
        self.stats["puts"] += 1
        return True

    def has(self, keys: list[str]) -> list[str]:
        """Which of ``keys`` are held (and so need not be sent again); they count as just used."""
        return [k for k in keys if self._lru.get(k) is not None]

    def get(self, key: str) -> bytes | None:
        data = self._lru.get(key)
        self.stats["misses" if data is None else "gets"] += 1
        return data

    def summary(self) -> dict[str, int]:
        return {**self.stats, "held": len(self._lru), "bytes": self._lru.nbytes}
