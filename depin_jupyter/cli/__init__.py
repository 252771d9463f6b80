"""The `depin` command line: one click group, one module per command group.

Imports stay lazy: each command imports dask/zarr inside its body, so `depin --help` is instant.
"""

from __future__ import annotations

from depin_jupyter.cli import demo, doctor, jobs, keys, network, reproduce, store  # noqa: F401  (each adds its commands)
from depin_jupyter.cli.group import main

__all__ = ["main"]
