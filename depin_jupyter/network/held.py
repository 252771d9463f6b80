"""Background runs' records and results, kept in the coordinator's state dir until their client fetches them.

A background run outlives its kernel; with this it also outlives its coordinator: a run is written down
when it is submitted and again with its (pickle-free) result when it ends, so a coordinator killed and
restarted still hands a new kernel every result that had finished, and names the runs it was running as
lost (run them again) instead of forgetting them. Bounded by ``depin.coordinator.relay-max-bytes``; what
nobody fetched within ``depin.coordinator.result-ttl`` is dropped. Nothing here is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import time
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["HeldRecord", "HeldResults"]

logger = logging.getLogger("depin.coordinator")


@dataclass(frozen=True)
class HeldRecord:
    """What the coordinator keeps of one background run (the result's bytes lie beside it)."""

    key: str
    run_id: str
    name: str
    owner: str
    submitted: float
    state: str                 # pending while it runs; finished, error, lost, cancelled once it ended
    error: str = ""
    worker: str | None = None
    replication: dict[str, Any] | None = None
    nbytes: int = 0            # of the result beside it (0: none)


class HeldResults:
    """One ``<digest>.json`` record and ``<digest>.bin`` result per run under ``<state dir>/held``."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root

    def _paths(self, key: str) -> tuple[pathlib.Path, pathlib.Path]:
        # Keys come from clients: a digest names the files, so no key can name a path of its choosing.
        stem = hashlib.sha256(key.encode()).hexdigest()[:32]
        return self.root / f"{stem}.json", self.root / f"{stem}.bin"

    def keep(self, record: HeldRecord, payload: bytes | None, limit: int) -> bool:
        """Write ``record`` (and its result) so a restarted coordinator has it; False when the result does not
        fit beside what is held already (``limit`` bytes): the run is then held in memory only."""
        meta, data = self._paths(record.key)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if payload is not None:
            if self.nbytes(but=record.key) + len(payload) > limit:
                logger.warning("not keeping the result of %s on disk: over %d bytes held", record.key, limit)
                return False
            _write(data, payload)
        elif data.exists():
            data.unlink()
        _write(meta, json.dumps(asdict(record)).encode())
        return True

    def drop(self, key: str) -> None:
        for p in self._paths(key):
            p.unlink(missing_ok=True)

    def nbytes(self, but: str | None = None) -> int:
        skip = self._paths(but)[1] if but is not None else None
        return sum(p.stat().st_size for p in self.root.glob("*.bin") if p != skip) if self.root.exists() else 0

    def load(self, ttl: float) -> list[tuple[HeldRecord, bytes | None]]:
        """Every run kept and not expired, with its result; expired or unreadable ones are removed."""
        out: list[tuple[HeldRecord, bytes | None]] = []
        for left in [*self.root.glob("*.partial"), *self.root.glob("*.bin")] if self.root.exists() else ():
            if left.suffix == ".partial" or not left.with_suffix(".json").exists():
                left.unlink(missing_ok=True)  # a write the kill interrupted, or a result whose record was not
        for meta in sorted(self.root.glob("*.json")) if self.root.exists() else ():
            data = meta.with_suffix(".bin")
            try:
                record = HeldRecord(**json.loads(meta.read_text()))
                payload = data.read_bytes() if record.nbytes else None
                if payload is not None and len(payload) != record.nbytes:
                    raise ValueError(f"{data.name} holds {len(payload)} bytes, its record says {record.nbytes}")
            except (OSError, ValueError, TypeError) as e:
                logger.warning("dropping held run %s: %s", meta.name, e)
                record, payload = None, None  # type: ignore[assignment]
            if record is None or time.time() - record.submitted > ttl:
                meta.unlink(missing_ok=True)
                data.unlink(missing_ok=True)
                continue
            out.append((record, payload))
        return out


def _write(path: pathlib.Path, data: bytes) -> None:
    """Whole or not at all: a reader (a restarted coordinator) never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
