"""The coordinator of a volunteer network: a Dask scheduler with mutual TLS, roles, a result relay and credit.

State lives in one directory (``depin scheduler --state-dir``): the certificate authority, the registry of
issued certificates (``tokens.json``, where revocation is recorded), the advertised address and the credit
ledger. The CLI and the running scheduler share it; the scheduler re-reads the registry when it changes.

Three things stock Dask does not do, done here:

* **Roles.** Any certificate signed by the CA would be accepted in any role. `RoleGate` checks every
  message of every connection against the peer certificate's role: a worker identity may only do what a
  worker does (register, heartbeat, report tasks, leave itself); a client identity may not register as a
  worker or report task results.
* **Nothing pickled from volunteers.** Messages from worker identities are read with unpickling disabled
  (`_UNTRUSTED` guard), serialized objects in them are dropped, task errors are reduced to their text and
  the pickled result type is removed, so a client never receives bytes a volunteer pickled.
* **A relay for results.** Volunteers sit behind NAT: they dial out, nobody dials in. A `%%depin` cell on
  a volunteer pushes its pickle-free result to the scheduler over its own connection
  (``depin_relay_put``); the client fetches it from there (``depin_relay_get``). Nothing dials the worker.
  The same way in: array inputs are put here once by the notebook (``depin_input_put``, held by content
  hash, least recently used dropped first) and fetched by the volunteers that run cells reading them
  (``depin_input_get``), so a reused input is not sent again (`relay.InputRef`).
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import json
import logging
import os
import pathlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from depin_jupyter import config
from depin_jupyter.errors import DepinUsageError, TrustError
from depin_jupyter.network.pki import ROLES, Token, cert_info, create_ca, issue, peer_identity, peer_pool

__all__ = ["StateDir", "RoleGate", "default_state_dir", "scheduler_class", "serve"]

logger = logging.getLogger("depin.coordinator")

# Operations a worker identity may call on the scheduler, by RPC or on its stream.
WORKER_RPC_OPS = frozenset({
    "register-worker", "heartbeat_worker", "retire_workers", "unregister", "who_has", "identity",
    "depin_relay_put", "depin_input_get", "close-stream", "close", "connection_stream", "register_nanny",
})
# Stream operations only a worker may send (results and state of tasks it runs).
WORKER_STREAM_OPS = frozenset({
    "task-finished", "task-erred", "release-worker-data", "add-keys", "long-running", "reschedule",
    "keep-alive", "log-event", "worker-status-change", "request-refresh-who-has", "steal-response",
    "close-stream",
})
_WORKER_ONLY_RPC = frozenset({"register-worker", "heartbeat_worker", "depin_relay_put", "depin_input_get"})


def default_state_dir() -> pathlib.Path:
    return pathlib.Path(os.path.expanduser(config.get("coordinator.state-dir")))


def _write_atomic(path: pathlib.Path, text: str, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class StateDir:
    """The coordinator's directory: CA, issued certificates, address and credit ledger."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = pathlib.Path(path).expanduser() if path else default_state_dir()
        self._registry_cache: tuple[Any, dict[str, Any]] | None = None

    # --- files ---
    @property
    def exists(self) -> bool:
        return (self.path / "ca.pem").exists()

    def _read(self, name: str, default: Any) -> Any:
        p = self.path / name
        if not p.exists():
            return default
        return json.loads(p.read_text())

    def init(self, address: str, hosts: tuple[str, ...] = ()) -> bool:
        """Create the CA and the scheduler's certificate on first use; record ``address``. True if new."""
        self.path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        new = not self.exists
        if new:
            ca, ca_key = create_ca()
            _write_atomic(self.path / "ca.key", ca_key)
            _write_atomic(self.path / "ca.pem", ca, 0o644)
            _write_atomic(self.path / "tokens.json", json.dumps({"certificates": []}))
        meta = self._read("coordinator.json", {})
        if meta.get("address") != address or new:
            _write_atomic(self.path / "coordinator.json", json.dumps({"address": address}))
        cert, key, serial = issue(self.ca, self.ca_key, "scheduler", "scheduler", days=3650, hosts=hosts)
        self._register("scheduler", "scheduler", serial, cert_info(cert).not_after.timestamp())
        _write_atomic(self.path / "scheduler.pem", cert, 0o644)
        _write_atomic(self.path / "scheduler.key", key)
        return new

    @property
    def ca(self) -> str:
        return (self.path / "ca.pem").read_text()

    @property
    def ca_key(self) -> str:
        return (self.path / "ca.key").read_text()

    @property
    def address(self) -> str:
        meta = self._read("coordinator.json", {})
        if "address" not in meta:
            raise DepinUsageError(f"{self.path} holds no coordinator; start one with "
                                  f"`depin scheduler --state-dir {self.path}`.")
        return str(meta["address"])

    def scheduler_security(self) -> Any:
        from distributed.security import Security

        return Security(tls_ca_file=str(self.path / "ca.pem"), require_encryption=True,
                        tls_scheduler_cert=str(self.path / "scheduler.pem"),
                        tls_scheduler_key=str(self.path / "scheduler.key"))

    # --- certificates and tokens ---
    def registry(self) -> dict[str, Any]:
        """The issued certificates (re-read only when the file changed)."""
        p = self.path / "tokens.json"
        try:
            st = p.stat()
            # Every write replaces the file (a new inode): two writes within one tick of the file system's
            # coarse clock have the same mtime, and a cache keyed on it alone missed a token just issued.
            stamp: Any = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if self._registry_cache is None or self._registry_cache[0] != stamp:
            self._registry_cache = (stamp, self._read("tokens.json", {"certificates": []}))
        return self._registry_cache[1]

    @contextlib.contextmanager
    def _registry_lock(self) -> Iterator[None]:
        """Hold the registry for a read-modify-write: the scheduler and `depin token` may write at once."""
        import fcntl

        fd = os.open(self.path / ".tokens.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _register(self, name: str, role: str, serial: int, expires: float, pool: str | None = None,
                  **lab: Any) -> None:
        entry = {"name": name, "role": role, "serial": str(serial), "issued": time.time(),
                 "expires": expires, "revoked": None}
        if pool is not None:
            entry["pool"] = pool
        entry.update({k: v for k, v in lab.items() if v})  # quota, educator (virtual labs, `lab.py`)
        with self._registry_lock():
            reg = self._read("tokens.json", {"certificates": []})
            reg["certificates"].append(entry)
            _write_atomic(self.path / "tokens.json", json.dumps(reg, indent=1))

    def issue_token(self, role: str, name: str, days: float | None = None,
                    not_after: Any = None, pool: str | None = None, quota: Any = None,
                    educator: bool = False) -> Token:
        """Issue a certificate to ``name`` in ``role`` and return its join token.

        ``pool`` (workers; default ``volunteer``) is written into the certificate: the coordinator puts the
        worker in that pool whatever it claims (see `RoleGate`)."""
        if not self.exists:
            raise DepinUsageError(f"no coordinator in {self.path}; start it first: `depin scheduler "
                                  f"--state-dir {self.path}`.")
        if role == "scheduler":
            raise DepinUsageError("tokens are for workers and clients; the scheduler has its own certificate")
        days = config.get("coordinator.token-days") if days is None else days
        if role == "worker" and pool is None:
            from depin_jupyter.network.pki import DEFAULT_POOL

            pool = DEFAULT_POOL
        elif role != "worker" and pool is not None:
            raise DepinUsageError("--pool is for worker tokens: a client is in no pool")
        if (quota or educator) and role != "client":
            raise DepinUsageError("--quota and --educator are for client tokens (students, educators)")
        from depin_jupyter.network.lab import parse_quota

        quota = parse_quota(quota) or None  # checked before anything is issued
        cert, key, serial = issue(self.ca, self.ca_key, name, role, days=float(days), not_after=not_after,
                                  pool=pool)
        self._register(name, role, serial, cert_info(cert).not_after.timestamp(), pool=pool, quota=quota,
                       educator=educator)
        return Token(address=self.address, ca=self.ca, cert=cert, key=key)

    def revoke(self, name: str) -> int:
        """Revoke every certificate issued to ``name``; returns how many were live."""
        with self._registry_lock():
            reg = self._read("tokens.json", {"certificates": []})
            n = 0
            for c in reg["certificates"]:
                if c["name"] == name and c["role"] != "scheduler" and not c["revoked"]:
                    c["revoked"] = time.time()
                    n += 1
            if not n:
                raise DepinUsageError(f"no live certificate is issued to {name!r} (see `depin token list`)")
            _write_atomic(self.path / "tokens.json", json.dumps(reg, indent=1))
        return n

    def admit(self, name: str, roles: set[str], serial: int | None) -> str | None:
        """None if this certificate may connect, else the reason it may not."""
        if len(roles) != 1 or not roles <= set(ROLES):
            return f"certificate of {name!r} carries no valid depin role"
        for c in self.registry()["certificates"]:
            if c["serial"] == str(serial):
                if c["revoked"]:
                    return f"the token of {name!r} was revoked by the coordinator"
                if c["name"] != name or c["role"] not in roles:
                    return f"certificate of {name!r} does not match what was issued"
                return None
        return f"certificate of {name!r} (serial {serial}) was not issued by this coordinator's registry"

    # --- credit ---
    def credits(self) -> dict[str, dict[str, float]]:
        return self._read("credits.json", {})

    def save_credits(self, credits: dict[str, dict[str, float]]) -> None:
        _write_atomic(self.path / "credits.json", json.dumps(credits, indent=1, sort_keys=True))

    # --- reputation (replicated runs) ---
    def reputation(self) -> dict[str, dict[str, int]]:
        return self._read("reputation.json", {})

    def save_reputation(self, reputation: dict[str, dict[str, int]]) -> None:
        _write_atomic(self.path / "reputation.json", json.dumps(reputation, indent=1, sort_keys=True))


# Set while the scheduler reads a message from a worker identity: unpickling is refused there.
_UNTRUSTED: contextvars.ContextVar[str | None] = contextvars.ContextVar("depin_untrusted_peer", default=None)
_guard_installed = False


def _install_unpickle_guard() -> None:
    """Make Dask's protocol refuse to unpickle while an untrusted peer's message is being decoded.

    Dask decodes ``__Pickled__`` sub-frames even with ``deserialize=False``; a worker could use that to run
    code on the coordinator. The guard is a context variable, so client connections are unaffected.
    """
    global _guard_installed
    if _guard_installed:
        return
    from distributed.protocol import pickle as dpickle

    original = dpickle.loads

    def loads(x: Any, *args: Any, **kwargs: Any) -> Any:
        peer = _UNTRUSTED.get()
        if peer is not None:
            raise TrustError(f"refused to unpickle data sent by worker identity {peer!r}")
        return original(x, *args, **kwargs)

    dpickle.loads = loads
    _guard_installed = True


def _strip_serialized(obj: Any, depth: int = 0) -> Any:
    """``obj`` with every serialized (pickled) sub-object replaced by None."""
    from distributed.protocol.serialize import Pickled, Serialized, ToPickle

    if isinstance(obj, (Serialized, Pickled, ToPickle)):
        return None
    if depth > 50:
        return None
    if isinstance(obj, dict):
        return {k: _strip_serialized(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_strip_serialized(v, depth + 1) for v in obj)
    return obj


POOL_PREFIX = "pool:"      # Dask resource naming a worker's pool; only the coordinator grants it
POOL_CAPACITY = 1_000_000  # so that a pool never limits how many cells run at once on a worker


def grant_pool(resources: Any, pool: str) -> dict[str, Any]:
    """The resources a worker registers with: every ``pool:`` name it claims is dropped, and it gets the
    pool its certificate names — but only if it asked for that one (a worker that does not know pools, or
    that claims another pool, is in none: it could not run a pool's tasks anyway)."""
    claimed = dict(resources or {}) if isinstance(resources, dict) else {}
    out = {k: v for k, v in claimed.items() if not str(k).startswith(POOL_PREFIX)}
    if pool and POOL_PREFIX + pool in claimed:
        out[POOL_PREFIX + pool] = POOL_CAPACITY
    return out


def _normalized(address: Any) -> str:
    from distributed.comm import normalize_address

    try:
        return str(normalize_address(str(address)))
    except Exception:  # noqa: BLE001 - not an address: matches nothing
        return str(address)


class RoleGate:
    """Checks and cleans each message a peer sends, by the role its certificate carries."""

    pool: str = ""  # the pool in a worker identity's certificate (set by the scheduler's handle_comm)

    def __init__(self, scheduler: Any, name: str, role: str) -> None:  # the scheduler_class() instance
        self.scheduler = scheduler
        self.name = name
        self.role = role

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

    def _one(self, msg: Any, stream: bool) -> Any:
        if not isinstance(msg, dict):
            return msg
        op = msg.get("op")
        if self.role == "scheduler" or op is None:
            return msg
        if self.role == "client":
            if op in _WORKER_ONLY_RPC or (stream and op in WORKER_STREAM_OPS - {"close-stream", "keep-alive"}):
                return self._refuse(msg, f"a client identity may not {op!r} (worker operations need a worker "
                                         f"token)", stream)
            return msg
        # worker identity
        if stream:
            if op not in WORKER_STREAM_OPS:
                return self._refuse(msg, f"a worker identity may not send {op!r}", stream)
        elif op not in WORKER_RPC_OPS:
            return self._refuse(msg, f"a worker identity may not call {op!r} (a worker cannot submit work, "
                                     f"run functions or change the cluster)", stream)
        mine = self.scheduler.addresses_of(self.name)
        if op == "register-worker":
            self.scheduler.note_worker(str(msg.get("address")), self.name)
            msg = dict(msg)  # the certificate decides the pool, not the worker's claim
            claimed = sorted(str(k) for k in (msg.get("resources") or {}) if str(k).startswith(POOL_PREFIX))
            msg["resources"] = grant_pool(msg.get("resources"), self.pool)
            granted = [k for k in msg["resources"] if k.startswith(POOL_PREFIX)]
            if claimed != granted:
                logger.warning("worker identity %r (pool %r) claimed %s; granted %s", self.name, self.pool,
                               claimed or "no pool", granted or "no pool")
            self.scheduler.note_pool(str(msg.get("address")), granted[0][len(POOL_PREFIX):] if granted else None)
        elif op == "heartbeat_worker" and msg.get("resources"):
            # Dask adds a heartbeat's resources to the worker: the same rule as at registration, and
            # never for another identity's worker.
            msg = dict(msg)
            if _normalized(msg.get("address")) in mine:
                msg["resources"] = grant_pool(msg["resources"], self.pool)
            else:
                msg.pop("resources")
        elif op == "retire_workers":
            asked = set(msg.get("workers") or ())
            others = {a for a in asked if a in self.scheduler.workers} - mine
            if not asked or others or msg.get("names"):
                return self._refuse(msg, "a worker identity may only retire its own workers", stream)
        elif op == "unregister" and msg.get("address") in self.scheduler.workers and msg.get("address") not in mine:
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
        return _strip_serialized(msg)


def _make_scheduler_class() -> type:
    from distributed import Scheduler
    from distributed.core import Status
    from distributed.diagnostics.plugin import SchedulerPlugin
    from distributed.utils import NoOpAwaitable

    class _Ledger(SchedulerPlugin):
        """Credit per volunteer for completed work; frees relayed results of forgotten tasks.

        Per volunteer name it keeps:

        * ``gpu_seconds`` / ``cpu_seconds``: raw wall-clock compute time of finished tasks, as the worker's
          ``startstops`` report it (a task that sleeps earns as much as one that computes);
        * ``cpu_used_seconds``: CPU time the `%%depin` cells' threads really used, reported by the worker
          (event ``depin-credit`` from `relay.run_cell_relayed`), capped at the task's wall time;
        * ``credit``: normalized credit = cpu_used_seconds x speed factor, where the speed factor is
          reference time / the worker's benchmark time (advertised at registration), clipped to 0.1-10
          (`controls.speed_factor`). A slow machine does not earn less for the same work, and sleeping
          earns nothing;
        * ``energy_j``: joules the volunteer's cells were measured to use (`energy.py`: NVML board power on a
          GPU, RAPL CPU packages), over ``energy_tasks`` tasks; ``energy_unmeasured_tasks`` counts tasks with
          no power counter and ``energy_reason`` says why (the last reason seen). Never estimated.

        All of these are self-reported by volunteers' workers; replication (another issue) checks them.
        """

        name = "depin-ledger"

        def __init__(self, sched: Any) -> None:
            self.sched = sched
            # task key -> (worker address, CPU seconds, energy fields of the event)
            self.pending: dict[str, tuple[str, float, dict[str, Any]]] = {}

        def log_event(self, topic: str, msg: Any) -> None:
            if topic != "depin-credit" or not isinstance(msg, dict):
                return
            key, address = msg.get("key"), msg.get("worker")  # "worker": set by the scheduler from the stream
            try:
                cpu = float(msg.get("cpu_seconds"))
            except (TypeError, ValueError):
                return
            ts = self.sched.tasks.get(key)
            if (ts is None or ts.state != "processing" or ts.processing_on is None
                    or ts.processing_on.address != address or not cpu >= 0 or cpu == float("inf")):
                return  # only for a task this worker is running now
            energy: dict[str, Any] = {}
            joules = msg.get("energy_j")
            if isinstance(joules, (int, float)) and not isinstance(joules, bool) and 0 <= joules < float("inf"):
                energy = {"energy_j": float(joules), "source": str(msg.get("energy_source") or "")[:40]}
            else:
                energy = {"reason": str(msg.get("energy_reason") or "not measured")[:300]}
            self.pending[str(key)] = (address, cpu, energy)

        def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
            if finish == "forgotten":
                self.sched.relay_drop(str(key))
                self.pending.pop(str(key), None)
                return
            if start != "processing":
                return
            pending = self.pending.pop(str(key), None)
            if finish != "memory":
                return
            worker = kwargs.get("worker")
            name = self.sched.worker_names.get(worker)
            if name is None:
                return
            seconds = sum(float(s.get("stop", 0)) - float(s.get("start", 0))
                          for s in kwargs.get("startstops") or () if s.get("action") == "compute")
            ws = self.sched.workers.get(worker)
            kind = "gpu_seconds" if ws is not None and ws.resources.get("GPU") else "cpu_seconds"
            entry = self.sched.credits.setdefault(name, {"gpu_seconds": 0.0, "cpu_seconds": 0.0, "tasks": 0})
            entry[kind] = entry.get(kind, 0.0) + max(0.0, seconds)
            entry["tasks"] = entry.get("tasks", 0) + 1
            if pending is not None and pending[0] == worker:
                from depin_jupyter.worker.controls import normalized_credit

                used = min(pending[1], max(0.0, seconds))
                bench = ((ws.extra or {}).get("depin") or {}).get("benchmark") if ws is not None else None
                entry["cpu_used_seconds"] = entry.get("cpu_used_seconds", 0.0) + used
                entry["credit"] = entry.get("credit", 0.0) + normalized_credit(used, bench)
                gained = normalized_credit(used, bench)
                energy = pending[2]
                if "energy_j" in energy:
                    entry["energy_j"] = entry.get("energy_j", 0.0) + energy["energy_j"]
                    entry["energy_tasks"] = entry.get("energy_tasks", 0) + 1
                    if energy["source"]:
                        entry["energy_source"] = energy["source"]
                else:
                    entry["energy_unmeasured_tasks"] = entry.get("energy_unmeasured_tasks", 0) + 1
                    entry["energy_reason"] = energy["reason"]
            else:
                gained = 0.0
            self.sched.note_credit(str(key), name, kind, max(0.0, seconds), gained)
            self.sched.credits_dirty = True

    class _DepinScheduler(Scheduler):
        """Dask scheduler enforcing certificate roles and revocation, relaying results, keeping credit."""

        def __init__(self, *args: Any, state: StateDir, **kwargs: Any) -> None:
            _install_unpickle_guard()
            super().__init__(*args, **kwargs)
            self.state = state
            self.worker_names: dict[str, str] = {}     # worker address -> certificate name
            self.worker_pools: dict[str, str | None] = {}  # worker address -> pool granted (None: no pool)
            self.credits: dict[str, dict[str, float]] = state.credits()
            self.credits_dirty = False
            self.relay: dict[str, bytes] = {}
            self.relay_bytes = 0
            self.inputs: collections.OrderedDict[str, bytes] = collections.OrderedDict()  # LRU by content key
            self.inputs_bytes = 0
            self.input_stats = {"puts": 0, "gets": 0, "misses": 0, "evicted": 0}
            self.reputation: dict[str, dict[str, int]] = state.reputation()
            self.reputation_dirty = False
            # task key -> (volunteer, kind, raw seconds, normalized credit) of recent work, so a replica
            # found invalid can have its credit withheld
            self.key_credit: dict[str, tuple[str, str, float, float]] = {}
            self.handlers.update({
                "depin_identities": self.depin_identities,
                "depin_pools": self.depin_pools,
                "depin_reputation": self.depin_reputation,
                "depin_verdicts": self.depin_verdicts,
                "depin_refused": self.depin_refused,
                "depin_refuse_worker": self.depin_refuse_worker,
                "depin_refuse_client": self.depin_refuse_client,
                "depin_relay_put": self.depin_relay_put,
                "depin_relay_get": self.depin_relay_get,
                "depin_input_put": self.depin_input_put,
                "depin_input_has": self.depin_input_has,
                "depin_input_get": self.depin_input_get,
                "depin_input_stats": self.depin_input_stats,
                "depin_credits": self.depin_credits,
                "depin_lab_status": self.depin_lab_status,
            })
            self.add_plugin(_Ledger(self))
            from depin_jupyter.network.lab import LabGate, make_plugin

            self.lab = LabGate(self)  # virtual labs: quotas per student, fair share (`lab.py`)
            self.add_plugin(make_plugin(self.lab))
            from tornado.ioloop import PeriodicCallback

            self.periodic_callbacks["depin-housekeeping"] = PeriodicCallback(self._housekeeping, 1000)

        # --- admission ---
        def handle_comm(self, comm: Any) -> Any:
            name, roles, serial = peer_identity(comm.extra_info.get("peercert"))
            why = self.state.admit(name, roles, serial) if comm.extra_info.get("peercert") else \
                "no client certificate"
            if why is not None:
                logger.warning("refused connection from %s: %s", comm.peer_address, why)
                comm.abort()
                return NoOpAwaitable()
            role = next(iter(roles))
            gate = RoleGate(self, name, role)
            gate.pool = peer_pool(comm.extra_info.get("peercert")) if role == "worker" else ""
            read = comm.read

            async def gated_read(deserializers: Any = None) -> Any:
                token = _UNTRUSTED.set(name) if role == "worker" else None
                try:
                    msg = await read(deserializers)
                finally:
                    if token is not None:
                        _UNTRUSTED.reset(token)
                return gate.check(msg)

            comm.read = gated_read
            comm.depin_identity = (name, role)
            return super().handle_comm(comm)

        def addresses_of(self, name: str) -> set[str]:
            return {a for a, n in self.worker_names.items() if n == name}

        def note_worker(self, address: str, name: str) -> None:
            from distributed.comm import normalize_address

            try:
                address = normalize_address(address)
            except Exception:  # noqa: BLE001 - registration will reject a bad address itself
                pass
            self.worker_names[address] = name

        def note_pool(self, address: str, pool: str | None) -> None:
            from distributed.comm import normalize_address

            try:
                address = normalize_address(address)
            except Exception:  # noqa: BLE001 - registration will reject a bad address itself
                pass
            self.worker_pools[address] = pool

        async def depin_pools(self) -> dict[str, str | None]:
            """Worker address -> the pool its certificate put it in (None: in no pool), connected ones."""
            return {a: p for a, p in self.worker_pools.items() if a in self.workers}

        async def depin_refused(self, message: str, reply: bool = True, **_: Any) -> None:
            raise TrustError(f"refused by the coordinator: {message}")

        async def depin_refuse_worker(self, comm: Any, message: str, **_: Any) -> Any:
            await comm.write({"status": "error", "time": time.time(),
                              "message": f"refused by the coordinator: {message}"})
            return Status.dont_reply

        async def depin_refuse_client(self, comm: Any, message: str, **_: Any) -> Any:
            await comm.write([{"op": "stream-start", "error": f"refused by the coordinator: {message}"}])
            return Status.dont_reply

        # --- relay ---
        async def depin_relay_put(self, comm: Any, key: str, payload: bytes) -> str:
            limit = config.nbytes("coordinator.relay-max-bytes")
            old = len(self.relay.get(key, b""))
            if self.relay_bytes - old + len(payload) > limit:
                raise TrustError(f"the coordinator's result relay is full ({limit} bytes held for clients); "
                                 f"store large results with the Zarr store instead of returning them")
            self.relay[key] = bytes(payload)
            self.relay_bytes += len(payload) - old
            return "OK"

        async def depin_relay_get(self, key: str, pop: bool = True) -> bytes | None:
            data = self.relay.get(key)
            if data is not None and pop:
                self.relay_drop(key)
            return data

        def relay_drop(self, key: str) -> None:
            data = self.relay.pop(key, None)
            if data is not None:
                self.relay_bytes -= len(data)

        # --- inputs, sent once by notebooks and fetched by volunteers (only these bytes: never unpickled here)
        async def depin_input_put(self, key: str, data: bytes) -> str:
            """Hold a serialized input under its content key; "too-large" if it cannot fit at all."""
            limit = config.nbytes("coordinator.input-cache-bytes")
            if len(data) > limit:
                return "too-large"
            old = self.inputs.pop(key, None)
            if old is not None:
                self.inputs_bytes -= len(old)
            while self.inputs and self.inputs_bytes + len(data) > limit:
                _, dropped = self.inputs.popitem(last=False)
                self.inputs_bytes -= len(dropped)
                self.input_stats["evicted"] += 1
            self.inputs[key] = bytes(data)
            self.inputs_bytes += len(data)
            self.input_stats["puts"] += 1
            return "OK"

        async def depin_input_has(self, keys: list[str]) -> list[str]:
            """Which of ``keys`` are held (and so need not be sent again); they count as just used."""
            held = [k for k in keys if k in self.inputs]
            for k in held:
                self.inputs.move_to_end(k)
            return held

        async def depin_input_get(self, key: str) -> bytes | None:
            data = self.inputs.get(key)
            if data is None:
                self.input_stats["misses"] += 1
                return None
            self.inputs.move_to_end(key)
            self.input_stats["gets"] += 1
            return data

        async def depin_input_stats(self) -> dict[str, int]:
            return {**self.input_stats, "held": len(self.inputs), "bytes": self.inputs_bytes}

        # --- reputation ---
        async def depin_identities(self) -> dict[str, str]:
            """Worker address -> the certificate name of the volunteer behind it."""
            return dict(self.worker_names)

        async def depin_reputation(self) -> dict[str, dict[str, int]]:
            return self.reputation

        def note_credit(self, key: str, name: str, kind: str, seconds: float, credit: float) -> None:
            self.key_credit[key] = (name, kind, seconds, credit)
            while len(self.key_credit) > 100_000:  # bounded: verdicts come within seconds of the work
                self.key_credit.pop(next(iter(self.key_credit)))

        async def depin_verdicts(self, verdicts: list[dict[str, Any]]) -> str:
            """Replica verdicts from a client: valid ones extend a volunteer's streak, an invalid one resets
            it and withholds that work's credit. (Clients are trusted to report honestly.)"""
            for v in verdicts or ():
                spent = self.key_credit.pop(str(v.get("key")), None)
                name = self.worker_names.get(str(v.get("address"))) or (spent[0] if spent else None)
                if name is None:
                    continue
                rep = self.reputation.setdefault(name, {"streak": 0, "valid": 0, "invalid": 0, "checked": 0})
                rep["checked"] += 1
                if v.get("valid"):
                    rep["valid"] += 1
                    rep["streak"] += 1
                else:
                    rep["invalid"] += 1
                    rep["streak"] = 0
                    if spent is not None and spent[0] == name:
                        _, kind, seconds, credit = spent
                        entry = self.credits.setdefault(name, {"gpu_seconds": 0.0, "cpu_seconds": 0.0, "tasks": 0})
                        entry[kind] = max(0.0, entry.get(kind, 0.0) - seconds)
                        if "credit" in entry:
                            entry["credit"] = max(0.0, entry["credit"] - credit)
                        entry["withheld_seconds"] = entry.get("withheld_seconds", 0.0) + seconds
                        entry["invalid_tasks"] = entry.get("invalid_tasks", 0) + 1
                        self.credits_dirty = True
                rep["agreement"] = round(rep["valid"] / rep["checked"], 4)
                self.reputation_dirty = True
            return "OK"

        # --- virtual labs (`lab.py`) ---
        async def add_client(self, comm: Any, client: str, versions: dict[str, Any]) -> None:
            ident = getattr(comm, "depin_identity", None)
            if ident is not None:
                self.lab.client_names[client] = ident[0]
            return await super().add_client(comm, client, versions)

        def remove_client(self, client: str, stimulus_id: str | None = None) -> None:
            self.lab.release_held(client)
            try:
                return super().remove_client(client, stimulus_id=stimulus_id)
            finally:
                self.lab.client_names.pop(client, None)

        async def update_graph(self, client: str, keys: Any = (), **kwargs: Any) -> None:
            return await self.lab.admit(client, keys, lambda: super(_DepinScheduler, self).update_graph(
                client=client, keys=keys, **kwargs))

        def client_releases_keys(self, keys: Any, client: str, stimulus_id: str | None = None) -> None:
            self.lab.release_held(client, keys)
            return super().client_releases_keys(keys=keys, client=client, stimulus_id=stimulus_id)

        async def depin_lab_status(self, comm: Any) -> dict[str, Any]:
            name, role = getattr(comm, "depin_identity", ("?", "?"))
            if not self.lab.is_educator(name, role):
                return {"error": f"{name!r} is not an educator of this lab (issue the token with --educator, "
                                 f"or list the name in depin.lab.educators on the coordinator)"}
            return self.lab.status()

        # --- credit and revocation ---
        async def depin_credits(self) -> dict[str, Any]:
            return self.credits

        def _housekeeping(self) -> None:
            if self.reputation_dirty:
                self.reputation_dirty = False
                try:
                    self.state.save_reputation(self.reputation)
                except OSError:
                    logger.exception("could not save reputations")
            if self.credits_dirty:
                self.credits_dirty = False
                try:
                    self.state.save_credits(self.credits)
                except OSError:
                    logger.exception("could not save credits")
            if self.lab.dirty:
                self.lab.dirty = False
                try:
                    _write_atomic(self.state.path / "lab-usage.json", json.dumps(self.lab.usage, indent=1))
                except OSError:
                    logger.exception("could not save lab usage")
            for client, name in list(self.lab.client_names.items()):  # a revoked student is disconnected
                if client in self.client_comms and self._revoked(name):
                    logger.warning("closing client %s: the token of %r was revoked", client, name)
                    self.lab.client_names.pop(client, None)
                    self.client_comms[client].abort()
            # Connections of identities revoked since they joined are closed too.
            for address, name in list(self.worker_names.items()):
                if address in self.workers and self._revoked(name):
                    logger.warning("closing worker %s: the token of %r was revoked", address, name)
                    self.worker_names.pop(address, None)
                    self._ongoing_background_tasks.call_soon(
                        self.remove_worker, address, stimulus_id=f"depin-revoked-{time.time()}", close=True)

        def _revoked(self, name: str) -> bool:
            certs = [c for c in self.state.registry()["certificates"] if c["name"] == name]
            return bool(certs) and all(c["revoked"] for c in certs)

        async def remove_worker(self, address: str, **kwargs: Any) -> Any:
            try:
                return await super().remove_worker(address, **kwargs)
            finally:
                self.worker_names.pop(address, None)
                self.worker_pools.pop(address, None)

        async def close(self, *args: Any, **kwargs: Any) -> Any:
            if self.credits_dirty:
                self.state.save_credits(self.credits)
                self.credits_dirty = False
            if self.lab.dirty:
                self.lab.dirty = False
                _write_atomic(self.state.path / "lab-usage.json", json.dumps(self.lab.usage, indent=1))
            return await super().close(*args, **kwargs)

    return _DepinScheduler


_scheduler_class: type | None = None


def scheduler_class() -> type:
    """The `DepinScheduler` class (built on first use so importing this module stays cheap)."""
    global _scheduler_class
    if _scheduler_class is None:
        _scheduler_class = _make_scheduler_class()
    return _scheduler_class


def public_address(host: str, port: int) -> str:
    """The address tokens carry: the host given, or this machine's name when listening on all interfaces."""
    import socket

    if host in ("", "0.0.0.0", "::"):
        host = socket.getfqdn()
    return f"tls://{host}:{port}"


async def serve(state: StateDir, host: str, port: int, advertise: str | None = None,
                dashboard_address: str | None = None) -> Any:
    """Start the coordinator's scheduler (state initialised on first use); returns the running scheduler."""
    import dask.config

    address = advertise or public_address(host, port)
    state.init(address, hosts=tuple(h for h in {host, address.split("://")[-1].rsplit(":", 1)[0]}
                                    if h and h not in ("0.0.0.0", "::")))
    cls = scheduler_class()
    with dask.config.set({"distributed.scheduler.allowed-failures": config.get("coordinator.allowed-failures")}):
        sched = cls(host=f"tls://{host}", port=port, security=state.scheduler_security(), state=state,
                    dashboard_address=dashboard_address or config.get("coordinator.dashboard-address"))
        await sched
    return sched
