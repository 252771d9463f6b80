"""The store's own failures, as subclasses of the package hierarchy in `depin_jupyter.errors`."""

from __future__ import annotations

from depin_jupyter.errors import DepinError, DepinUsageError, StoreIntegrityError

__all__ = [
    "RunIncompleteError",
    "RunNotFoundError",
    "StoreAccessError",
    "StoreIntegrityError",
    "UnsupportedOutputError",
]


class StoreAccessError(DepinError):
    """The store cannot be reached, created or written (checked before any compute starts)."""


class RunNotFoundError(DepinUsageError):
    """No run with that id exists in the store."""


class RunIncompleteError(DepinUsageError):
    """The run has no sealed manifest (still running, aborted or killed), so it is never served."""


class UnsupportedOutputError(DepinUsageError):
    """An output's type cannot be stored portably (and pickling was not allowed)."""
