"""What the coordinator holds for others: cells' relayed results until their client fetches them, and inputs.

Volunteers sit behind NAT: they dial out, nobody dials in. A `%%depin` cell on a volunteer pushes its
pickle-free result here over its own connection; the client fetches it from here. The same way in: array
inputs are put here once by the notebook (held by content key, least recently used dropped first) and
fetched by the volunteers that run cells reading them (kept in the state dir, so they survive a restart).
Only bytes: nothing here is ever unpickled.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import uuid

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
    """Serialized inputs by content key (an LRU of ``depin.coordinator.input-cache-bytes``), with counters.

    With ``root`` (``<state dir>/inputs``) every input held is also a file there, written whole or not at
    all and deleted when evicted, so a restarted coordinator still has them: a second use after a restart
    sends nothing, and a run resumed for a kernel that is gone still finds its inputs. File names are a
    digest of the key (keys come from clients); the key is kept inside the file."""

    def __init__(self, limit: int, root: pathlib.Path | None = None) -> None:
        self.stats = {"puts": 0, "gets": 0, "misses": 0, "evicted": 0, "streamed": 0}
        self.root = root
        self._lru: ByteLRU[bytes] = ByteLRU(limit, on_evict=self._evicted)
        if root is not None:
            self._load(root)

    def _path(self, key: str) -> pathlib.Path:
        assert self.root is not None
        return self.root / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.in"

    def _evicted(self, key: str, data: bytes) -> None:
        self.stats["evicted"] += 1
        if self.root is not None:
            self._path(key).unlink(missing_ok=True)

    def _load(self, root: pathlib.Path) -> None:
        """The inputs a previous coordinator process held (oldest first, so the LRU order survives)."""
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for left in root.glob("*.partial-*"):
            left.unlink(missing_ok=True)  # a write the kill interrupted
        files = sorted(root.glob("*.in"), key=lambda p: p.stat().st_mtime)
        for path in files:
            try:
                blob = path.read_bytes()
                n = int.from_bytes(blob[:4], "big")
                key = blob[4:4 + n].decode()
                if len(blob) < 4 + n or path != self._path(key):
                    raise ValueError("not an input file of this coordinator")
            except (OSError, ValueError, UnicodeDecodeError):
                path.unlink(missing_ok=True)
                continue
            data = blob[4 + n:]
            if not self._lru.put(key, data, len(data)):
                path.unlink(missing_ok=True)

    def put(self, key: str, data: bytes, limit: int) -> bool:
        """Hold ``data`` under ``key``; False if it cannot fit at all. Blocks on the disk write: call it off
        the event loop when the store has a ``root``."""
        self._lru.max_bytes = limit
        if len(data) > limit:
            return False
        if self.root is not None:
            head = len(key.encode()).to_bytes(4, "big") + key.encode()
            _write_whole(self._path(key), head + bytes(data))
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

    def peek(self, key: str) -> bytes | None:
        """The input held under ``key`` (it counts as just used), without counting a get or a miss."""
        return self._lru.get(key)

    def summary(self) -> dict[str, int]:
        return {**self.stats, "held": len(self._lru), "bytes": self._lru.nbytes}


def _write_whole(path: pathlib.Path, data: bytes) -> None:
    """Whole or not at all (a restarted coordinator never reads half an input); a unique temporary name, as
    two clients may put the same input at once."""
    tmp = path.with_name(f"{path.name}.partial-{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
