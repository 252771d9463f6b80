"""The Zarr 3 result store: runs, manifests, the ledger, the cache lookup and verification.

`open_store` -> `ResultStore.begin_run` -> `RunWriter.write_output` ... `RunWriter.finish`;
`ResultStore.runs / manifest / load / lookup_cache / verify` read it back. Layout and digest rules
are documented in `_store.py` and `_digest.py`.
"""

from __future__ import annotations

from depin_jupyter.store._errors import (
    RunIncompleteError,
    RunNotFoundError,
    StoreAccessError,
    StoreIntegrityError,
    UnsupportedOutputError,
)
from depin_jupyter.store._outputs import classify as output_kind
from depin_jupyter.store._store import ResultStore, RunWriter, new_run_id, open_store
from depin_jupyter.store.ledger import LedgerEntry
from depin_jupyter.store.manifest import OutputRecord, RunManifest, RunSummary, local_environment, local_worker
from depin_jupyter.store.verify import Problem, VerifyReport

__all__ = [
    "LedgerEntry",
    "OutputRecord",
    "Problem",
    "ResultStore",
    "RunIncompleteError",
    "RunManifest",
    "RunNotFoundError",
    "RunSummary",
    "RunWriter",
    "StoreAccessError",
    "StoreIntegrityError",
    "UnsupportedOutputError",
    "VerifyReport",
    "local_environment",
    "local_worker",
    "new_run_id",
    "open_store",
    "output_kind",
]
