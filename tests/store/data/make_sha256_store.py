"""Regenerate ``sha256-store.zarr``: a store written by depin-jupyter before digests named their algorithm
(bare-hex SHA-256, manifest schema 1), kept so tests prove such stores still verify and load.

Run it with the code of that time, e.g. from the repository root::

    mkdir /tmp/old && git archive 7ed7199 depin_jupyter | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python tests/store/data/make_sha256_store.py tests/store/data/sha256-store.zarr
"""

from __future__ import annotations

import sys

import dask.config
import numpy as np
import xarray as xr

from depin_jupyter.store import open_store
from depin_jupyter.store._digest import ALGORITHM

assert ALGORITHM == "sha256", "run this with the pre-BLAKE3 code (see the docstring)"
rs = open_store(sys.argv[1])
for compression in ("none", "zstd"):
    with dask.config.set({"depin.store.chunk-bytes": 1024, "depin.store.compression": compression}):
        w = rs.begin_run(code=f"x = old ({compression})", inputs={}, options={}, cache_key=f"old-{compression}",
                         name=f"old-{compression}")
        w.write_output("x", np.arange(1000, dtype="f4").reshape(50, 20))
        w.write_output("ds", xr.Dataset({"v": (("t",), np.linspace(0, 1, 300))}, coords={"t": np.arange(300)}))
        w.write_output("meta", {"answer": 42})
        w.finish(worker={"host": "fixture"}, environment={"python": "3.11", "packages": {}}, timings={"run_s": 0.0})
print(rs.verify().format())
