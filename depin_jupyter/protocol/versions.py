"""The versions two ends of a volunteer network should agree on (`depin doctor` compares them)."""

from __future__ import annotations

import importlib.metadata
import platform

__all__ = ["MUST_MATCH", "stack_versions"]

# Distributions whose versions decide whether two ends speak the same protocol: Dask's comms and
# serialization, and the cell protocol itself. Others (numpy, zarr) matter to results, not to the wire.
MUST_MATCH = ("dask", "distributed", "depin-jupyter", "msgpack", "cloudpickle")
_SHOWN = (*MUST_MATCH, "numpy", "zarr", "cupy")


def stack_versions() -> dict[str, str]:
    """python and the installed versions of the distributions above (those installed)."""
    out = {"python": platform.python_version()}
    for dist in _SHOWN:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out
