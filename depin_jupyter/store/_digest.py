"""Pure digest rules of the store: what is hashed, in which order, in which serialization.

SHA-256 (hashlib) everywhere, for tamper evidence. Documented here once so a reader without depin
can re-check a store:

- chunk digest: ``sha256(encoded chunk bytes as stored)``.
- output digest: ``sha256`` of the lines ``"<chunk key> <chunk digest>\\n"`` for every chunk of
  the array, keys relative to the array (``c/0/1``) sorted as strings. Arrays are written with
  ``write_empty_chunks=True``, so every chunk of the grid has a key and a missing key is an error,
  never "fill value".
- metadata digest: ``sha256`` of the raw bytes of a node's ``zarr.json``.
- manifest digest (held by the ledger): ``sha256`` of the raw bytes of the run group's
  ``zarr.json`` (whose attribute ``depin_manifest`` is the manifest).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

ALGORITHM = "sha256"


def sha256_hex(data: Any) -> str:
    """Hex SHA-256 of bytes or any contiguous buffer."""
    return hashlib.sha256(data).hexdigest()


def output_digest(chunk_digests: Mapping[str, str]) -> str:
    """The digest of one array from its per-chunk digests (order-independent input, sorted keys)."""
    h = hashlib.sha256()
    for key in sorted(chunk_digests):
        h.update(f"{key} {chunk_digests[key]}\n".encode())
    return h.hexdigest()


def canonical_json(obj: Any) -> bytes:
    """Compact, key-sorted, ASCII JSON: one byte string per value, so its hash is well defined."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def group_document(attributes: Mapping[str, Any]) -> bytes:
    """The ``zarr.json`` of a Zarr 3 group with these attributes, as depin writes it (readable, stable)."""
    doc = {"zarr_format": 3, "node_type": "group", "attributes": dict(attributes)}
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=True, allow_nan=False).encode()


def grid_size(shape: tuple[int, ...], chunks: tuple[int, ...]) -> int:
    """How many chunks a regular chunk grid has (0 for an empty array, 1 for a 0-d one)."""
    return math.prod(-(-s // c) for s, c in zip(shape, chunks))
