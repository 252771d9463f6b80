"""Frames child -> parent: 4-byte big-endian length, 1 kind byte, then the data (a `safe_codec` encoding)."""

from __future__ import annotations

import struct

__all__ = ["ENERGY", "EVENT", "HEADER", "MAX_ENERGY_BYTES", "MAX_EVENT_BYTES", "PAYLOAD", "READY", "STREAM_KINDS"]


# Frames child -> parent: 4-byte big-endian length, 1 kind byte, then the data.
HEADER = struct.Struct(">IB")


MAX_ENERGY_BYTES = 64 * 1024


MAX_EVENT_BYTES = 64 * 2**20


STREAM_KINDS = frozenset({"start", "stdout", "stderr", "display"})
READY, EVENT, PAYLOAD, ENERGY = 1, 2, 3, 4
