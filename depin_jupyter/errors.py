"""One hierarchy for every failure a user can meet; each message names the cause and the fix."""

from __future__ import annotations


class DepinError(Exception):
    """Base of all depin-jupyter errors."""


class DepinUsageError(DepinError):
    """A malformed magic/CLI argument or a request that cannot be satisfied as asked."""


class DepinConfigError(DepinUsageError):
    """A `depin` setting is misspelt or has the wrong type; the message names it, its source and the right spelling."""


class CellInputError(DepinError):
    """A cell's inputs cannot be shipped: undefined, or not serializable."""


class ClusterConnectionError(DepinError):
    """No scheduler is reachable at the address, or the connection was refused."""


class RemoteExecutionError(DepinError):
    """The cell did not complete on the cluster for a reason that is not its own exception."""


class WorkerLostError(RemoteExecutionError):
    """The worker running the cell died or left (after any retries)."""


class CellTimeoutError(RemoteExecutionError):
    """The cell ran past its --timeout and was cancelled on the worker."""


class NoSuitableWorkerError(RemoteExecutionError):
    """No connected worker satisfies what the cell asked for (GPUs, a named worker)."""


class EnvironmentMismatchError(DepinError):
    """A package the cell uses differs in version (or is missing) between the kernel and the workers."""


class StoreIntegrityError(DepinError):
    """A stored result, manifest or the ledger does not match its digests."""


class TrustError(DepinError):
    """A peer is not authenticated or not allowed to do what it asked."""
