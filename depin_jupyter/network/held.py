"""Background runs' records and results, kept in the coordinator's state dir until their client fetches them.

A background run outlives its kernel; with this it also outlives its coordinator: a run is written down
with its submission (the cell's pickle-free bytes) when it is submitted, and again with its (pickle-free)
result when it ends, so a coordinator killed and restarted still hands a new kernel every result that had
finished and runs again the ones it was running (their volunteers' work went with it) instead of
forgetting them. Bounded by ``depin.coordinator.relay-max-bytes``; what nobody fetched within
``depin.coordinator.result-ttl`` is dropped. Nothing here is ever unpickled (submissions are msgpack).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import pathlib
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Held", "HeldRecord", "HeldResults", "HeldSubmission"]

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


@dataclass(frozen=True)
class HeldSubmission:
    """What a client sent to submit a background run, as it sent it: enough to submit it again."""

    spec: bytes
    inputs: bytes
    blob: bytes | None
    placement: Any
    replication: Any

    def encode(self) -> bytes:
        import msgpack

        return bytes(msgpack.packb(asdict(self), use_bin_type=True))

    @classmethod
    def decode(cls, data: bytes) -> HeldSubmission:
        import msgpack

        fields = msgpack.unpackb(data, raw=False, strict_map_key=False)
        if not isinstance(fields, dict) or not isinstance(fields.get("spec"), bytes) \
                or not isinstance(fields.get("inputs"), bytes) or not isinstance(fields.get("blob"), (bytes, type(None))):
            raise ValueError("not a held submission")
        return cls(fields["spec"], fields["inputs"], fields["blob"], fields.get("placement"), fields.get("replication"))


@dataclass(frozen=True)
class Held:
    """One run as a restarted coordinator finds it: its record, its result if it ended with one, and its
    submission if it was still to run (and fit beside the rest)."""

    record: HeldRecord
    payload: bytes | None
    submission: HeldSubmission | None


class HeldResults:
    """One ``<digest>.json`` record, ``<digest>.bin`` result and ``<digest>.sub`` submission per run under
    ``<state dir>/held``."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        # `keep` runs in a thread, `drop` on the event loop: one lock, and the keys dropped, so a write that
        # lost the race to a drop (the run was handed over meanwhile) never lands, not even for a moment.
        self._lock = threading.Lock()
        self._dropped: collections.OrderedDict[str, None] = collections.OrderedDict()

    def _paths(self, key: str) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
        # Keys come from clients: a digest names the files, so no key can name a path of its choosing.
        stem = hashlib.sha256(key.encode()).hexdigest()[:32]
        return self.root / f"{stem}.json", self.root / f"{stem}.bin", self.root / f"{stem}.sub"

    def keep(self, record: HeldRecord, payload: bytes | None, limit: int,
             submission: HeldSubmission | None = None) -> bool:
        """Write ``record`` (with its result, or the submission that runs it again) so a restarted coordinator
        has it; False when that does not fit beside what is held already (``limit`` bytes): the run is then
        held in memory only (and lost with this process). Called in a thread: the files are written first,
        then put in place under the lock `drop` takes (renames only: the event loop never waits on a write)."""
        if record.key in self._dropped:
            return True
        meta, data, sub = self._paths(record.key)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        staged: list[tuple[pathlib.Path, pathlib.Path]] = []
        stale: list[pathlib.Path] = []
        try:
            for path, content in ((data, payload), (sub, None if submission is None else submission.encode())):
                if content is None:
                    if path is data or record.state not in ("queued", "pending"):
                        stale.append(path)  # a submission stays while the run is still to end
                    continue
                if self.nbytes(but=path) + len(content) > limit:
                    logger.warning("not keeping the %s of %s on disk: over %d bytes held",
                                   "result" if path is data else "submission", record.key, limit)
                    if path is data:
                        return False
                    continue  # without its submission: named lost, not run again, after a restart
                staged.append((_staged(path, content), path))
            staged.append((_staged(meta, json.dumps(asdict(record)).encode()), meta))  # the record last
            with self._lock:
                if record.key in self._dropped:
                    return True  # handed over while this was written: it must not land
                for path in stale:
                    path.unlink(missing_ok=True)
                for tmp, path in staged:
                    os.replace(tmp, path)
                staged = []
            return True
        finally:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)

    def drop(self, key: str) -> None:
        """Forget ``key`` on disk, for good (a later `keep` of it writes nothing)."""
        with self._lock:
            self._dropped[key] = None
            while len(self._dropped) > 100_000:
                self._dropped.popitem(last=False)
            for p in self._paths(key):
                p.unlink(missing_ok=True)

    def nbytes(self, but: pathlib.Path | None = None) -> int:
        if not self.root.exists():
            return 0
        return sum(p.stat().st_size for suffix in ("*.bin", "*.sub") for p in self.root.glob(suffix) if p != but)

    def load(self, ttl: float) -> list[Held]:
        """Every run kept and not expired, with its result or submission; expired or unreadable ones are
        removed."""
        out: list[Held] = []
        found = [*self.root.glob("*.partial*"), *self.root.glob("*.bin"), *self.root.glob("*.sub")] \
            if self.root.exists() else []
        for left in found:
            if ".partial" in left.name or not left.with_suffix(".json").exists():
                left.unlink(missing_ok=True)  # a write the kill interrupted, or a file whose record was not
        for meta in sorted(self.root.glob("*.json")) if self.root.exists() else ():
            data, sub = meta.with_suffix(".bin"), meta.with_suffix(".sub")
            try:
                record = HeldRecord(**json.loads(meta.read_text()))
                payload = data.read_bytes() if record.nbytes else None
                if payload is not None and len(payload) != record.nbytes:
                    raise ValueError(f"{data.name} holds {len(payload)} bytes, its record says {record.nbytes}")
                again = HeldSubmission.decode(sub.read_bytes()) \
                    if record.state in ("queued", "pending") and sub.exists() else None
            except (OSError, ValueError, TypeError) as e:
                logger.warning("dropping held run %s: %s", meta.name, e)
                record = None  # type: ignore[assignment]
            if record is None or time.time() - record.submitted > ttl:
                for p in (meta, data, sub):
                    p.unlink(missing_ok=True)
                continue
            out.append(Held(record, payload, again))
        return out


def _staged(path: pathlib.Path, data: bytes) -> pathlib.Path:
    """``data`` written whole (and synced) beside ``path`` under a name of its own, to be renamed into place:
    a reader (a restarted coordinator) never sees half a file."""
    tmp = path.with_name(f"{path.name}.partial-{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp
