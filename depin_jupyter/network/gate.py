"""The role gate: every message a peer sends is checked (and cleaned) against the role its certificate carries.

Stock Dask accepts any certificate signed by its CA in any role. A worker identity may only do what a
worker does (register, heartbeat, report its tasks, leave itself); a client identity may not register as a
worker or report task results. Task errors from volunteers are reduced to their text and pickled result
types are dropped, so a client never receives bytes a volunteer pickled.
"""

from __future__ import annotations

import logging
from typing import Any

from depin_jupyter.protocol.constants import POOL_CAPACITY, POOL_PREFIX, STREAM_TOPIC

__all__ = ["CLIENT_RPC_OPS", "CLIENT_STREAM_OPS", "WORKER_RPC_OPS", "WORKER_STREAM_OPS", "RoleGate", "grant_pool",
           "normalized_address"]

logger = logging.getLogger("depin.coordinator")


# Operations a worker identity may call on the scheduler, by RPC or on its stream. No listing of other
# tasks (who_has): a volunteer's cells have no dependencies, so it never fetches data from peers.
WORKER_RPC_OPS = frozenset({
    "register-worker", "heartbeat_worker", "retire_workers", "unregister", "identity",
    "depin_relay_put", "depin_input_get", "close-stream", "close", "connection_stream", "register_nanny",
    "depin_hello",
})

# Stream operations only a worker may send (results and state of tasks it runs).
WORKER_STREAM_OPS = frozenset({
    "task-finished", "task-erred", "release-worker-data", "long-running", "reschedule",
    "keep-alive", "log-event", "worker-status-change", "steal-response", "close-stream",
})

# What a client identity may do: speak the cell protocol (`network.gateway`), read who is in the network
# and its credit, and hear its own cells' output. No Dask graphs, functions, plugins, scatter, metadata or
# other clients' keys: everything else is refused before it is handled (and nothing it sends is unpickled).
CLIENT_RPC_OPS = frozenset({
    "register-client", "identity", "close", "close-stream", "depin_submit_cell", "depin_wait_cell", "depin_wait_cells",
    "depin_cancel_cell", "depin_release_cells", "depin_jobs", "depin_input_put", "depin_input_has", "depin_input_offer",
    "depin_identities", "depin_pools", "depin_reputation", "depin_credits", "depin_lab_status", "depin_relay_get",
    "depin_input_stats", "depin_hello", "depin_roster",
})
CLIENT_STREAM_OPS = frozenset({"heartbeat-client", "close-client", "subscribe-topic", "unsubscribe-topic",
                               "close-stream", "keep-alive"})


def grant_pool(resources: Any, pool: str) -> dict[str, Any]:
    """The resources a worker registers with: every ``pool:`` name it claims is dropped, and it gets the
    pool its certificate names — but only if it asked for that one (a worker that does not know pools, or
    that claims another pool, is in none: it could not run a pool's tasks anyway)."""
    claimed = dict(resources or {}) if isinstance(resources, dict) else {}
    out = {k: v for k, v in claimed.items() if not str(k).startswith(POOL_PREFIX)}
    if pool and POOL_PREFIX + pool in claimed:
        out[POOL_PREFIX + pool] = POOL_CAPACITY
    return out


def normalized_address(address: Any) -> str:
    from distributed.comm import normalize_address

    try:
        return str(normalize_address(str(address)))
    except Exception:  # noqa: BLE001 - not an address: matches nothing
        return str(address)


class RoleGate:
    """Checks and cleans each message a peer sends, by the role its certificate carries."""

    def __init__(self, scheduler: Any, name: str, role: str, pool: str = "") -> None:
        self.scheduler = scheduler  # the `DepinScheduler`
        self.name = name
        self.role = role
        self.pool = pool  # the pool in a worker identity's certificate

    def check(self, msg: Any) -> Any:
        if isinstance(msg, (list, tuple)):  # a batched stream: many messages
            return type(msg)(m for m in (self._one(m, stream=True) for m in msg) if m is not None)
        return self._one(msg, stream=False)

    def _refuse(self, msg: dict[str, Any], why: str, stream: bool) -> dict[str, Any] | None:
        logger.warning("refused %r from %s identity %r: %s", msg.get("op"), self.role, self.name, why)
        if msg.get("op") == "register-worker":
            return {"op": "depin_refuse_worker", "message": why}
        if msg.get("op") == "register-client":
            return {"op": "depin_refuse_client", "message": why}
        if stream:
            return None  # dropped from the batch
        return {"op": "depin_refused", "message": why, "reply": msg.get("reply", True)}

    def _client(self, msg: dict[str, Any], op: Any, stream: bool) -> Any:
        allowed = CLIENT_STREAM_OPS if stream else CLIENT_RPC_OPS
        if op not in allowed:
            return self._refuse(msg, f"a client identity may not {op!r}: on a volunteer network a client submits "
                                     f"%%depin cells through the coordinator (no Dask graphs, functions, plugins "
                                     f"or other clients' data)", stream)
        if op == "subscribe-topic" and msg.get("topic") != STREAM_TOPIC:
            return self._refuse(msg, f"a client identity may only hear its own cells' output ({STREAM_TOPIC!r})",
                                stream)
        return msg

    def _one(self, msg: Any, stream: bool) -> Any:
        if not isinstance(msg, dict):
            return msg
        op = msg.get("op")
        if self.role == "scheduler" or op is None:
            return msg
        if self.role == "client":
            return self._client(msg, op, stream)
        # worker identity
        if stream:
            if op not in WORKER_STREAM_OPS:
                return self._refuse(msg, f"a worker identity may not send {op!r}", stream)
        elif op not in WORKER_RPC_OPS:
            return self._refuse(msg, f"a worker identity may not call {op!r} (a worker cannot submit work, "
                                     f"run functions or change the cluster)", stream)
        mine = self.scheduler.addresses_of(self.name)
        if op == "register-worker":
            # Whose worker it is is recorded by the scheduler once the registration succeeded (`add_worker`):
            # an address another worker holds is refused by Dask before anyone's name is attached to it.
            msg = dict(msg)  # the certificate decides the pool, not the worker's claim
            claimed = sorted(str(k) for k in (msg.get("resources") or {}) if str(k).startswith(POOL_PREFIX))
            msg["resources"] = grant_pool(msg.get("resources"), self.pool)
            granted = [k for k in msg["resources"] if k.startswith(POOL_PREFIX)]
            if claimed != granted:
                logger.warning("worker identity %r (pool %r) claimed %s; granted %s", self.name, self.pool,
                               claimed or "no pool", granted or "no pool")
        elif op == "heartbeat_worker" and msg.get("resources"):
            # Dask adds a heartbeat's resources to the worker: the same rule as at registration, and
            # never for another identity's worker.
            msg = dict(msg)
            if normalized_address(msg.get("address")) in mine:
                msg["resources"] = grant_pool(msg["resources"], self.pool)
            else:
                msg.pop("resources")
        elif op == "retire_workers":
            asked = set(msg.get("workers") or ())
            others = {a for a in asked if self.scheduler.is_connected(a)} - mine
            if not asked or others or msg.get("names"):
                return self._refuse(msg, "a worker identity may only retire its own workers", stream)
        elif op == "unregister" and self.scheduler.is_connected(msg.get("address")) and msg.get("address") not in mine:
            # (an address no longer connected is a no-op: a nanny reports its dead worker after the fact)
            return self._refuse(msg, "a worker identity may only unregister its own workers", stream)
        elif op == "task-erred":
            # The text only: a volunteer's pickled exception never reaches anyone.
            msg = dict(msg)
            text = str(msg.get("exception_text") or "error")
            msg["exception"] = f"task failed on volunteer {self.name!r}: {text}"
            msg["traceback"] = None
        elif op == "task-finished":
            msg = dict(msg)
            msg["type"] = None  # a pickled class otherwise unpickled by the client
        return self.scheduler.strip_serialized(msg)
