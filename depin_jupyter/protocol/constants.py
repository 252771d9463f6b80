"""Names both sides of a process boundary must agree on: event topics, key prefixes, resource names, exit codes."""

from __future__ import annotations

__all__ = [
    "CREDIT_TOPIC", "ENDED_STATES", "MODULES_ARG", "PART_BYTES", "POOL_CAPACITY", "POOL_PREFIX", "RELAYED",
    "RUN_KEY_PREFIX", "STREAM_TOPIC", "STUCK_EXIT_STATUS", "owner_scoped", "part_count", "pool_resource",
    "pools_of", "run_key", "run_of_key",
]

STREAM_TOPIC = "depin-stream"   # Dask event topic of a cell's live output (stdout, stderr, display, start)
CREDIT_TOPIC = "depin-credit"   # Dask event topic of a volunteer's claimed CPU time and energy for a task
RELAYED = "depin-relayed"       # what a relayed cell's task returns: its result waits on the coordinator
MODULES_ARG = "__depin_modules__"  # the task argument carrying the bundle of the notebook's own modules

RUN_KEY_PREFIX = "depin-run-"   # Dask keys of `%%depin` tasks: depin-run-<run id>-<6 hex>
POOL_PREFIX = "pool:"           # Dask resource naming a worker's pool; on a volunteer network the coordinator grants it
POOL_CAPACITY = 1_000_000       # so that a pool never limits how many cells run at once on a worker

# the states of a run on the coordinator's gateway after which nothing more happens to it
ENDED_STATES = frozenset({"finished", "error", "cancelled", "lost"})

# Big inputs and results cross the coordinator in parts of this many bytes, each forwarded as soon as it
# has arrived (`network.uploads`): a transfer costs about one hop plus one part, not two hops.
PART_BYTES = 4 * 2**20

STUCK_EXIT_STATUS = 70          # a worker process exits with this when a cancelled cell is stuck in a C call


def run_key(run_id: str, suffix: str) -> str:
    """The Dask key of one submission of run ``run_id``."""
    return f"{RUN_KEY_PREFIX}{run_id}-{suffix}"


def run_of_key(key: str) -> str:
    """The run id in a `%%depin` task's key (the key itself for other keys)."""
    if not key.startswith(RUN_KEY_PREFIX):
        return key
    return key[len(RUN_KEY_PREFIX):].rsplit("-", 1)[0]


def owner_scoped(owner: str, key: str) -> str:
    """The key an input of client ``owner`` is held under (coordinator and volunteer caches): clients never
    see, reuse or overwrite each other's inputs, whose content keys are guessable."""
    return f"{len(owner)}:{owner}/{key}"


def part_count(nbytes: int) -> int:
    """How many `PART_BYTES` parts ``nbytes`` bytes travel in (an empty payload is one empty part)."""
    return max(1, -(-nbytes // PART_BYTES))


def pool_resource(pool: str) -> str:
    """The Dask resource name of ``pool``."""
    return POOL_PREFIX + pool


def pools_of(resources: object) -> tuple[str, ...]:
    """The pools a worker's resources put it in, sorted."""
    if not isinstance(resources, dict):
        return ()
    return tuple(sorted(str(r)[len(POOL_PREFIX):] for r in resources if str(r).startswith(POOL_PREFIX)))
