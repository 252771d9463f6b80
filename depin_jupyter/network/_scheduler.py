"""The coordinator's Dask scheduler: every Dask internal the network side relies on lives in this module.

`DepinScheduler` extends Dask's `Scheduler` where no public hook exists: it admits each connection by its
certificate and wraps the connection's reads with the role gate (`network.gate`), refuses to unpickle what
worker identities send, answers the depin RPCs (`protocol.rpc.OPS`), and binds worker identities at
registration. tests/test_dask_contract.py names each private attribute, op and message field used here, so
a Dask upgrade that changes one fails that test, not the volunteer network at run time.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from typing import Any

from distributed import Scheduler
from distributed.core import Status
from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.utils import NoOpAwaitable

from depin_jupyter import config
from depin_jupyter.errors import TrustError
from depin_jupyter.network.credit import Ledger
from depin_jupyter.network.gate import RoleGate, normalized_address
from depin_jupyter.network.relay import InputStore, ResultRelay
from depin_jupyter.network.results import ResultParts
from depin_jupyter.network.state import StateDir, write_atomic
from depin_jupyter.network.uploads import InputDesk
from depin_jupyter.protocol.constants import STREAM_TOPIC, pools_of
from depin_jupyter.protocol.identity import peer_identity, peer_pool

__all__ = ["DepinScheduler", "install_unpickle_guard"]

logger = logging.getLogger("depin.coordinator")

# Set while the scheduler reads a message from a worker identity: unpickling is refused there.
_UNTRUSTED: contextvars.ContextVar[str | None] = contextvars.ContextVar("depin_untrusted_peer", default=None)
_guard_installed = False

# Dask internals used below (named by tests/test_dask_contract.py):
#   Scheduler.handle_comm, .handlers, .periodic_callbacks, .workers, .tasks, .client_comms, .add_client,
#   .remove_client, .update_graph, .client_releases_keys, .remove_worker, ._ongoing_background_tasks;
#   TaskState.state / .processing_on; WorkerState.resources / .extra; comm.read / .extra_info["peercert"];
#   distributed.protocol.pickle.loads (guarded); the stream op "stream-start" and its "error" field.


def install_unpickle_guard() -> None:
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
            raise TrustError(f"refused to unpickle data sent by {peer!r} (not the coordinator's own identity)")
        return original(x, *args, **kwargs)

    dpickle.loads = loads
    _guard_installed = True


def _upload_stall() -> float:
    """Seconds an input upload may go without a part before it is dropped (`depin.coordinator.upload-stall`)."""
    return config.seconds("coordinator.upload-stall") or 60.0


def _strip_serialized(obj: Any, depth: int = 0) -> Any:
    """``obj`` with every serialized (pickled) sub-object replaced by None."""
    from distributed.protocol.serialize import Pickled, Serialized, ToPickle

    if isinstance(obj, (Serialized, Pickled, ToPickle)) or depth > 50:
        return None
    if isinstance(obj, dict):
        return {k: _strip_serialized(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_strip_serialized(v, depth + 1) for v in obj)
    return obj


class _Bindings(SchedulerPlugin):
    """Binds a worker to its identity the moment Dask accepted its registration."""

    name = "depin-bindings"

    def __init__(self, sched: DepinScheduler) -> None:
        self.sched = sched

    def add_worker(self, scheduler: Any, worker: str) -> None:
        self.sched.bind_worker(worker)


class DepinScheduler(Scheduler):
    """Dask scheduler enforcing certificate roles and revocation, relaying results, keeping credit."""

    def __init__(self, *args: Any, state: StateDir, **kwargs: Any) -> None:
        install_unpickle_guard()
        super().__init__(*args, **kwargs)
        self.state = state
        self.worker_names: dict[str, str] = {}          # worker address -> certificate name
        self.worker_pools: dict[str, str | None] = {}   # worker address -> pool granted (None: no pool)
        self.credits: dict[str, dict[str, Any]] = state.credits()
        self.credits_dirty = False
        self.relay = ResultRelay()
        self.results = ResultParts()  # big results in parts: arriving, and handed over (`network.results`)
        self.inputs = InputDesk(InputStore(config.nbytes("coordinator.input-cache-bytes"), state.path / "inputs"))
        self.reputation: dict[str, dict[str, Any]] = state.reputation()
        self.reputation_dirty = False
        # task key -> (volunteer, kind, raw seconds, normalized credit) of recent work, so a replica
        # found invalid can have its credit withheld
        self.key_credit: dict[str, tuple[str, str, float, float]] = {}
        from depin_jupyter.protocol.rpc import OPS

        self.handlers.update({op: getattr(self, op) for op in OPS})
        self.handlers.update({"depin_refused": self.depin_refused, "depin_refuse_worker": self.depin_refuse_worker,
                              "depin_refuse_client": self.depin_refuse_client})
        self._registering: dict[str, str] = {}  # address -> identity, while Dask registers it
        self.add_plugin(_Bindings(self))
        self.add_plugin(Ledger(self))
        from depin_jupyter.network.roster import Roster

        self.roster = Roster(self)  # who is connected, as changes since a notebook's last look (`network.roster`)
        self.add_plugin(self.roster)
        from depin_jupyter.network.gateway import CellGateway

        self.gateway = CellGateway(self)  # cells submitted by client identities (`network.gateway`)
        from depin_jupyter.network.lab import LabGate, make_plugin

        self.lab = LabGate(self)  # virtual labs: quotas per student, fair share (`network.lab`)
        self.add_plugin(make_plugin(self.lab))
        from tornado.ioloop import PeriodicCallback

        self.periodic_callbacks["depin-housekeeping"] = PeriodicCallback(self._housekeeping, 1000)

    # --- admission ---
    def handle_comm(self, comm: Any) -> Any:
        peercert = comm.extra_info.get("peercert")
        name, roles, serial = peer_identity(peercert)
        why = self.state.admit(name, roles, serial) if peercert else "no client certificate"
        if why is not None:
            logger.warning("refused connection from %s: %s", comm.peer_address, why)
            comm.abort()
            return NoOpAwaitable()
        role = next(iter(roles))
        gate = RoleGate(self, name, role, pool=peer_pool(peercert) if role == "worker" else "")
        read = comm.read

        async def gated_read(deserializers: Any = None) -> Any:
            token = _UNTRUSTED.set(name) if role != "scheduler" else None  # workers and clients: no pickles
            try:
                msg = await read(deserializers)
            finally:
                if token is not None:
                    _UNTRUSTED.reset(token)
            return gate.check(msg)

        comm.read = gated_read
        comm.depin_identity = (name, role)
        return super().handle_comm(comm)

    # --- what the gate and the ledger ask of Dask's state ---
    def strip_serialized(self, msg: Any) -> Any:
        """A worker identity's message with every serialized (pickled) part replaced by None."""
        return _strip_serialized(msg)

    def addresses_of(self, name: str) -> set[str]:
        return {a for a, n in self.worker_names.items() if n == name}

    def is_connected(self, address: str) -> bool:
        return address in self.workers

    def is_processing_on(self, key: Any, address: Any) -> bool:
        """Whether task ``key`` is processing on the worker at ``address`` right now."""
        ts = self.tasks.get(key)
        return (ts is not None and ts.state == "processing" and ts.processing_on is not None
                and ts.processing_on.address == address)

    def worker_profile(self, address: Any) -> tuple[bool, Any]:
        """(whether the worker has a GPU, the benchmark it advertised) for credit."""
        ws = self.workers.get(address)
        if ws is None:
            return False, None
        return bool(ws.resources.get("GPU")), ((ws.extra or {}).get("depin") or {}).get("benchmark")

    def in_background(self, func: Any, *args: Any, **kwargs: Any) -> None:
        """Run coroutine function ``func`` as a task the scheduler waits for when it closes."""
        self._ongoing_background_tasks.call_soon(func, *args, **kwargs)

    def workers_for(self, placement: dict[str, Any]) -> list[str]:
        """Connected workers a cell placed so may run on: its worker list, and the resources it needs."""
        wanted = placement.get("resources") or {}
        listed = set(placement.get("workers") or ())
        return sorted(a for a, ws in self.workers.items()
                      if (not listed or a in listed) and all(ws.resources.get(r, 0) >= v for r, v in wanted.items()))

    def note_worker(self, address: str, name: str) -> None:
        self.worker_names[normalized_address(address)] = name

    def note_pool(self, address: str, pool: str | None) -> None:
        self.worker_pools[normalized_address(address)] = pool

    def note_credit(self, key: str, name: str, kind: str, seconds: float, credit: float) -> None:
        self.key_credit[key] = (name, kind, seconds, credit)
        while len(self.key_credit) > 100_000:  # bounded: verdicts come within seconds of the work
            self.key_credit.pop(next(iter(self.key_credit)))

    # --- refusals the gate turns messages into ---
    async def depin_refused(self, message: str, reply: bool = True, **_: Any) -> None:
        raise TrustError(f"refused by the coordinator: {message}")

    async def depin_refuse_worker(self, comm: Any, message: str, **_: Any) -> Any:
        await comm.write({"status": "error", "time": time.time(), "message": f"refused by the coordinator: {message}"})
        return Status.dont_reply

    async def depin_refuse_client(self, comm: Any, message: str, **_: Any) -> Any:
        await comm.write([{"op": "stream-start", "error": f"refused by the coordinator: {message}"}])
        return Status.dont_reply

    # --- the depin RPCs (`protocol.rpc.OPS`) ---
    async def depin_pools(self) -> dict[str, str | None]:
        """Worker address -> the pool its certificate put it in (None: in no pool), connected ones."""
        return {a: p for a, p in self.worker_pools.items() if a in self.workers}

    async def depin_input_offer(self, comm: Any, sizes: dict[str, int]) -> dict[str, list[str]]:
        """Of the caller's inputs (content key -> serialized bytes): those held, those to stream in parts now."""
        sizes = {str(k): int(n) for k, n in dict(sizes).items()}
        return self.inputs.offer(self._who(comm), sizes, config.nbytes("coordinator.input-cache-bytes"),
                                 _upload_stall())

    async def depin_input_put(self, comm: Any, key: str, data: bytes, index: int | None = None,
                              total: int = -1) -> str:
        """Hold a serialized input of the caller under its content key ("too-large" if it cannot fit at all),
        or one part (``index``) of an offered upload of ``total`` bytes."""
        return await self.inputs.put(self._who(comm), str(key), bytes(data), None if index is None else int(index),
                                     config.nbytes("coordinator.input-cache-bytes"), int(total))

    async def depin_input_has(self, comm: Any, keys: list[str]) -> list[str]:
        return self.inputs.has(self._who(comm), [str(k) for k in keys])

    async def depin_input_get(self, comm: Any, key: str, task: str = "", index: int = 0) -> dict[str, Any] | None:
        """Part ``index`` of an input of the run ``task`` a worker of the caller's identity is running (a
        volunteer reads only the inputs of its own cells, and only while it runs them)."""
        self._running_for(comm, task, "input reads")
        run = self.gateway.runs.get(task)
        owner = run.owner if run is not None else self.lab.key_owner.get(task, "")
        return await self.inputs.read(owner, str(key), int(index), _upload_stall())

    async def depin_input_stats(self) -> dict[str, int]:
        return {**self.inputs.store.summary(), "uploading": len(self.inputs.uploads), **self.results.stats,
                "relay-bytes": self.relay.nbytes, "result-parts-bytes": self.results.nbytes}

    async def depin_identities(self) -> dict[str, str]:
        """Worker address -> the certificate name of the volunteer behind it."""
        return dict(self.worker_names)

    async def depin_reputation(self) -> dict[str, dict[str, Any]]:
        return self.reputation

    async def depin_credits(self) -> dict[str, Any]:
        return self.credits

    async def depin_roster(self, generation: str | None = None, epoch: int = 0) -> dict[str, Any]:
        return self.roster.since(generation if isinstance(generation, str) else None, int(epoch))

    async def depin_hello(self) -> dict[str, Any]:
        """This coordinator's wall clock and the versions a worker or notebook should match."""
        from depin_jupyter.protocol.versions import stack_versions

        return {"time": time.time(), "versions": stack_versions()}

    @staticmethod
    def _who(comm: Any) -> str:
        return str(getattr(comm, "depin_identity", ("?", "?"))[0])

    async def depin_submit_cell(self, comm: Any, key: str, spec: bytes, inputs: bytes, blob: bytes | None = None,
                                placement: Any = None, client: str | None = None, detached: bool = False,
                                replication: Any = None, wait: Any = 0.0) -> Any:
        """Submit a cell; with ``wait`` (seconds, at most 1) the reply carries its end's answer when it ended
        by then (a short cell costs its kernel one round trip, not a submission and then a wait)."""
        name = self._who(comm)
        ok = await self.gateway.submit(name, client, key, spec, inputs, blob, placement or {}, detached, replication)
        if detached or isinstance(wait, bool) or not isinstance(wait, (int, float)) or not wait > 0:
            return ok
        answers = await self.gateway.wait_many(name, [key], min(float(wait), 1.0), connected=lambda: not comm.closed())
        return {"answer": answers[key]} if key in answers else ok

    async def depin_wait_cell(self, comm: Any, key: str, timeout: float = 10.0, keep: bool = False) -> dict[str, Any]:
        return await self.gateway.wait(self._who(comm), key, timeout, connected=lambda: not comm.closed(),
                                       keep=keep is True)

    async def depin_wait_cells(self, comm: Any, keys: list[str], timeout: float = 10.0, keep: Any = (),
                               pending: Any = ()) -> dict[str, dict[str, Any]]:
        return await self.gateway.wait_many(self._who(comm), keys, timeout, connected=lambda: not comm.closed(),
                                            keep=keep, pending=pending)

    async def depin_release_cells(self, comm: Any, names: list[str]) -> int:
        return self.gateway.release(self._who(comm), list(names) if isinstance(names, (list, tuple)) else [])

    async def depin_cancel_cell(self, comm: Any, key: str) -> bool:
        return await self.gateway.cancel(self._who(comm), key)

    async def depin_jobs(self, comm: Any) -> list[dict[str, Any]]:
        return self.gateway.jobs(self._who(comm))

    # --- live output goes to the run's own client only ---
    def log_worker_event(self, worker: str, topic: Any, msg: Any) -> None:
        if topic != STREAM_TOPIC:
            return super().log_worker_event(worker, topic, msg)
        if isinstance(msg, dict) and msg.get("kind") == "result-parts":
            return None  # the coordinator's own word to a client (`_announce_parts`): no worker may say it
        run = self.gateway.run_of(str(msg.get("run"))) if isinstance(msg, dict) else None
        if run is None or run.client_id is None or not self.is_processing_on(run.key, worker):
            return None  # not a run this worker is running (or no client to show it to): dropped
        msg["worker"] = worker
        self.send_all({run.client_id: [{"op": "event", "topic": STREAM_TOPIC, "event": (time.time(), msg)}]},
                      worker_msgs={})
        return None

    async def depin_lab_status(self, comm: Any) -> dict[str, Any]:
        name, role = getattr(comm, "depin_identity", ("?", "?"))
        if not self.lab.is_educator(name, role):
            return {"error": f"{name!r} is not an educator of this lab (issue the token with --educator, "
                             f"or list the name in depin.lab.educators on the coordinator)"}
        return self.lab.status()

    # --- virtual labs (`network.lab`): who submits, quotas, fair share ---
    async def add_client(self, comm: Any, client: str, versions: dict[str, Any]) -> None:
        ident = getattr(comm, "depin_identity", None)
        if ident is not None:
            self.lab.client_names[client] = ident[0]
        return await super().add_client(comm, client, versions)

    def remove_client(self, client: str, stimulus_id: str | None = None) -> None:
        self.lab.release_held(client)
        self.in_background(self.gateway.client_gone, client)
        try:
            return super().remove_client(client, stimulus_id=stimulus_id)
        finally:
            self.lab.client_names.pop(client, None)

    async def update_graph(self, client: str, keys: Any = (), **kwargs: Any) -> None:  # type: ignore[override]
        return await self.lab.admit(client, keys, lambda: super(DepinScheduler, self).update_graph(
            client=client, keys=keys, **kwargs))

    def client_releases_keys(self, keys: Any, client: str, stimulus_id: str | None = None) -> None:
        self.lab.release_held(client, keys)
        return super().client_releases_keys(keys=keys, client=client, stimulus_id=stimulus_id)

    # --- persistence and revocation ---
    def _save(self) -> None:
        """Write what changed (reputations, credit, lab usage) to the state dir."""
        for flag, what, save in (("reputation_dirty", "reputations", lambda: self.state.save_reputation(self.reputation)),
                                 ("credits_dirty", "credits", lambda: self.state.save_credits(self.credits))):
            if getattr(self, flag):
                setattr(self, flag, False)
                try:
                    save()
                except OSError:
                    logger.exception("could not save %s", what)
        if self.lab.dirty:
            self.lab.dirty = False
            try:
                write_atomic(self.state.path / "lab-usage.json", json.dumps(self.lab.usage, indent=1))
            except OSError:
                logger.exception("could not save lab usage")

    def _housekeeping(self) -> None:
        self._save()
        self.gateway.resume()  # background runs a killed coordinator process was running: run again
        self.gateway.expire()
        for client, name in list(self.lab.client_names.items()):  # a revoked student is disconnected
            if client in self.client_comms and self.state.revoked(name):
                logger.warning("closing client %s: the token of %r was revoked", client, name)
                self.lab.client_names.pop(client, None)
                self.client_comms[client].abort()
        # Connections of identities revoked since they joined are closed too.
        for address, name in list(self.worker_names.items()):
            if address in self.workers and self.state.revoked(name):
                logger.warning("closing worker %s: the token of %r was revoked", address, name)
                self.worker_names.pop(address, None)
                self.in_background(self.remove_worker, address, stimulus_id=f"depin-revoked-{time.time()}", close=True)

    async def add_worker(self, comm: Any = None, *, address: str, **kwargs: Any) -> None:  # type: ignore[override]
        """Register a worker; it is bound to the identity that registered it (and its pool) only once Dask
        has accepted the address (`_Bindings.add_worker`): nobody can relabel a worker someone else holds."""
        address = normalized_address(address)
        ident = getattr(comm, "depin_identity", None)
        if address in self.workers or address in self._registering:
            raise ValueError(f"Worker already exists {address}")
        if ident is not None and ident[1] == "worker":
            self._registering[address] = str(ident[0])
        try:
            await super().add_worker(comm, address=address, **kwargs)  # returns when the worker leaves
        finally:
            self._registering.pop(address, None)

    def bind_worker(self, address: str) -> None:
        """The worker at ``address`` was just accepted: record whose it is, and its pool."""
        name = self._registering.get(address)
        if name is not None and address in self.workers:
            self.note_worker(address, name)
            pools = pools_of(self.workers[address].resources)
            self.note_pool(address, pools[0] if pools else None)

    def _running_for(self, comm: Any, key: str, what: str) -> tuple[str, str]:
        """(the caller's identity, the address of its worker) if a worker of it is running task ``key``;
        TrustError otherwise."""
        name = self._who(comm)
        ts = self.tasks.get(key)
        running_on = ts.processing_on.address if ts is not None and ts.processing_on is not None else None
        if ts is None or ts.state != "processing" or running_on is None or self.worker_names.get(running_on) != name:
            raise TrustError(f"refused {what} for {key!r} from {name!r}: no worker of {name!r} is running it")
        return name, running_on

    async def depin_relay_put(self, comm: Any, key: str, payload: bytes, index: int | None = None,
                              total: int = -1) -> str:
        """A relayed result (whole, or part ``index`` of ``total`` bytes), accepted once, and only from a worker
        of the identity the task is running on. The first part of a big result tells the run's client, which
        reads the parts while they arrive (`network.results`)."""
        name, sender = self._running_for(comm, key, "a result")
        if key in self.relay:
            raise TrustError(f"refused a second result for {key!r} from {name!r}")
        limit = config.nbytes("coordinator.relay-max-bytes")
        if index is None:
            self.relay.put(key, payload, limit)
            return "OK"
        whole, began = self.results.receive(key, sender, int(index), bytes(payload), int(total),
                                            limit - self.relay.nbytes, limit, _upload_stall())
        if began:
            self._announce_parts(key, int(total))
        if whole is None:
            return "OK"
        self.relay.put(key, whole, limit)
        return "whole"

    def _announce_parts(self, key: str, total: int) -> None:
        """Tell the client of an unreplicated run that its result is arriving in parts (a stream event)."""
        from depin_jupyter.protocol.constants import part_count

        run = self.gateway.runs.get(key)
        if run is None or run.client_id is None or run.done is not None:
            return  # no client to tell, or a replicated run (read once judged)
        msg = {"run": run.run_id, "kind": "result-parts", "key": key, "count": part_count(total)}
        self.send_all({run.client_id: [{"op": "event", "topic": STREAM_TOPIC, "event": (time.time(), msg)}]},
                      worker_msgs={})

    async def depin_relay_get(self, comm: Any, key: str, index: int = 0) -> dict[str, Any] | None:
        """Part ``index`` of the result of the caller's run ``key``: handed over in parts, or still arriving
        (unreplicated runs only), waiting for a part on its way; None when there is none."""
        from depin_jupyter.network.uploads import part_of

        name, index = self._who(comm), int(index)
        handed = self.results.handed(key, name)
        if handed is None:
            run = self.gateway.owned(name, key)
            if run.done is not None:
                return None  # replicated: only the judged result, once handed over
            got = await self.results.arriving.read(key, index, _upload_stall())
            if got is not None:
                self.results.served(key, index, got[0])
                return {"count": got[0], "data": got[1], "gen": got[2]}
            handed = self.results.handed(key, name) or self.relay.get(key, pop=False)
            if handed is None:
                return None
        answer = {**part_of(handed, index), "gen": self.results.gens.get(key, "")}
        self.results.served(key, index, answer["count"])
        return answer

    async def remove_worker(self, address: str, **kwargs: Any) -> Any:
        try:
            return await super().remove_worker(address, **kwargs)
        finally:
            self.worker_names.pop(address, None)
            self.worker_pools.pop(address, None)

    async def close(self, *args: Any, **kwargs: Any) -> Any:
        self._save()
        await self.gateway.close()
        return await super().close(*args, **kwargs)
