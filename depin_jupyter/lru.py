"""One byte-bounded LRU map, for the three caches of inputs (kernel, coordinator, volunteer)."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["ByteLRU"]

V = TypeVar("V")


class ByteLRU(Generic[V]):
    """Values with a size in bytes; the least recently used go first once the total passes ``max_bytes``.

    ``on_evict(key, value)`` is told of each value dropped to make room (not of `pop`). With ``keep_one``
    the newest value stays even when it alone is over the limit; otherwise such a value is not kept.
    Thread-safe.
    """

    def __init__(self, max_bytes: int, on_evict: Callable[[str, V], None] | None = None,
                 keep_one: bool = False) -> None:
        self.max_bytes = max_bytes
        self._on_evict = on_evict
        self._keep_one = keep_one
        self._items: collections.OrderedDict[str, tuple[V, int]] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> V | None:
        """The value under ``key`` (now the most recently used), or None."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: str, value: V, nbytes: int) -> bool:
        """Keep ``value``; False if it is larger than the whole cache (and so not kept)."""
        if nbytes > self.max_bytes and not self._keep_one:
            return False
        evicted = []
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            while self._items and self._bytes + nbytes > self.max_bytes:
                k, (v, n) = self._items.popitem(last=False)
                self._bytes -= n
                evicted.append((k, v))
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
        if self._on_evict is not None:
            for k, v in evicted:
                self._on_evict(k, v)
        return True

    def pop(self, key: str) -> V | None:
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                return None
            self._bytes -= item[1]
            return item[0]

    def items(self) -> list[tuple[str, V]]:
        with self._lock:
            return [(k, v) for k, (v, _) in self._items.items()]

    def clear(self) -> list[V]:
        """Drop everything; returns the values dropped."""
        with self._lock:
            values = [v for v, _ in self._items.values()]
            self._items.clear()
            self._bytes = 0
            return values

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)
