"""Every Dask (and zarr/fsspec) internal depin relies on, named in one place and checked against what is installed.

The code that uses them lives in `network/_scheduler.py` (the coordinator's scheduler), `worker/_dask.py`
(the volunteer's worker), `kernel/_dask.py` (the notebook's client) and `store/_io.py` (zarr's wrapped
store, fsspec's exclusive create). A Dask upgrade
that renames or drops one of these fails here, with the name, instead of breaking a volunteer network at
run time. When this fails: adapt the module named in the failing case, then the line here.
"""

from __future__ import annotations

import inspect

import pytest

distributed = pytest.importorskip("distributed")


def _attr_path(root: object, dotted: str) -> object:
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


SCHEDULER_METHODS = {  # DepinScheduler overrides or calls these (network/_scheduler.py)
    "handle_comm": ("comm",),
    "add_client": ("comm", "client", "versions"),
    "remove_client": ("client", "stimulus_id"),
    "update_graph": ("client", "keys"),
    "client_releases_keys": ("keys", "client", "stimulus_id"),
    "remove_worker": ("address", "stimulus_id", "close"),
    "add_plugin": ("plugin",),
}


@pytest.mark.parametrize("name", sorted(SCHEDULER_METHODS))
def test_scheduler_methods_depin_overrides_keep_their_parameters(name):
    from distributed import Scheduler

    params = inspect.signature(getattr(Scheduler, name)).parameters
    missing = [p for p in SCHEDULER_METHODS[name] if p not in params]
    assert not missing, f"Scheduler.{name} lost parameter(s) {missing}: adapt network/_scheduler.py"


WORKER_ATTRIBUTES = [  # VolunteerWorker (worker/_dask.py)
    "Worker.status", "Worker.handle_comm", "Worker.handle_stimulus", "Worker.batched_send", "Worker.close",
    "Worker.get_current_task", "Worker.log_event",
]


@pytest.mark.parametrize("dotted", WORKER_ATTRIBUTES)
def test_worker_attributes_exist(dotted):
    import distributed as d

    _attr_path(d, dotted)


def test_worker_status_is_a_property_with_a_setter():
    """VolunteerWorker keeps itself paused by overriding the property (fget/fset of Dask's own)."""
    from distributed import Worker

    prop = inspect.getattr_static(Worker, "status")
    assert isinstance(prop, property) and prop.fget is not None and prop.fset is not None


def test_pause_event_and_worker_state_fields():
    from distributed.worker_state_machine import PauseEvent, TaskState, WorkerState

    assert "stimulus_id" in inspect.signature(PauseEvent).parameters
    for field in ("total_resources", "available_resources", "running", "executing_count", "tasks"):
        assert field in WorkerState.__dict__ or field in getattr(WorkerState, "__annotations__", {}) or \
            hasattr(WorkerState, field), f"WorkerState.{field}"
    for field in ("state", "run_spec", "key"):
        assert field in getattr(TaskState, "__annotations__", {}) or hasattr(TaskState, field), f"TaskState.{field}"


def test_scheduler_side_task_and_worker_state_fields():
    from distributed.scheduler import TaskState, WorkerState

    for cls, fields in ((TaskState, ("state", "processing_on")), (WorkerState, ("resources", "extra", "address"))):
        slots = set(getattr(cls, "__slots__", ())) | set(getattr(cls, "__annotations__", {}))
        missing = [f for f in fields if f not in slots and not hasattr(cls, f)]
        assert not missing, f"{cls.__module__}.{cls.__name__} lost {missing}"


def test_a_real_scheduler_has_the_ops_and_state_depin_uses():
    """Ops the role gate lets worker identities send, the refusal ops, and the scheduler state read."""
    import asyncio

    asyncio.run(_check_a_real_scheduler())


async def _check_a_real_scheduler() -> None:
    from distributed import Scheduler

    from depin_jupyter.network.gate import WORKER_RPC_OPS, WORKER_STREAM_OPS

    async with Scheduler(dashboard_address=":0", host="127.0.0.1") as s:
        rpc_ops = set(s.handlers)
        stream_ops = set(s.stream_handlers)
        # "close" and "close-stream" are answered by distributed.core's comm loop itself
        import distributed.core

        comm_level = {op for op in ("close", "close-stream") if f'"{op}"' in inspect.getsource(distributed.core)}
        assert comm_level == {"close", "close-stream"}
        dask_rpc = WORKER_RPC_OPS - comm_level - {op for op in WORKER_RPC_OPS if op.startswith("depin_")}
        assert dask_rpc - rpc_ops == set(), f"worker RPC ops Dask no longer has: {dask_rpc - rpc_ops}"
        known_stream = stream_ops | rpc_ops | {"close-stream", "keep-alive"}
        assert WORKER_STREAM_OPS - known_stream == set(), \
            f"worker stream ops Dask no longer has: {WORKER_STREAM_OPS - known_stream}"
        assert "reschedule" in stream_ops  # VolunteerWorker hands queued tasks back with it
        for attr in ("periodic_callbacks", "workers", "tasks", "client_comms"):
            assert hasattr(s, attr), f"Scheduler.{attr}"
        assert hasattr(s._ongoing_background_tasks, "call_soon")  # DepinScheduler.in_background


def test_protocol_internals_the_unpickle_guard_and_stripper_rely_on():
    """The guard replaces `distributed.protocol.pickle.loads`; decoding must look it up at call time."""
    import importlib

    from distributed.protocol import pickle as dpickle

    core = importlib.import_module("distributed.protocol.core")
    serialize = importlib.import_module("distributed.protocol.serialize")
    from distributed.protocol.serialize import Pickled, Serialized, ToPickle  # noqa: F401 - stripped from messages

    assert callable(dpickle.loads)
    assert "pickle.loads(" in inspect.getsource(core) and "pickle.loads(" in inspect.getsource(serialize)
    assert core.pickle is dpickle and serialize.pickle is dpickle


def test_client_reads_the_refusal_the_gate_sends():
    """A refused client registration answers [{"op": "stream-start", "error": ...}]; the client raises it."""
    from distributed import client

    src = inspect.getsource(client.Client._ensure_connected)
    assert '"stream-start"' in src and 'msg[0].get("error")' in src


def test_tls_comms_carry_the_peer_certificate():
    from distributed.comm import tcp

    assert "peercert=" in inspect.getsource(tcp), "TLS comms no longer expose extra_info['peercert']"


def test_core_helpers():
    from distributed.core import Status
    from distributed.utils import NoOpAwaitable  # noqa: F401 - handle_comm's answer to a refused comm

    assert Status.dont_reply.value == "dont_reply"


def test_kernel_reads_killed_worker_and_lost_dependency_reasons():
    """submit.py reads `KilledWorker.last_worker` and matches the "lost dependencies" cancel reason."""
    from distributed.scheduler import KilledWorker

    assert isinstance(inspect.getattr_static(KilledWorker, "last_worker"), property)
    import distributed.scheduler as sched

    assert '"lost dependencies"' in inspect.getsource(sched)


def test_zarr_and_fsspec_internals_the_store_uses():
    """store/_io.py unwraps zarr's WrapperStore (``._store``) and uses fsspec's exclusive create."""
    from zarr.storage import WrapperStore

    assert "_store" in inspect.getsource(WrapperStore.__init__)
    fsspec = pytest.importorskip("fsspec")
    from fsspec.asyn import AsyncFileSystem

    assert hasattr(AsyncFileSystem, "_pipe_file")
    assert fsspec is not None


def test_client_reconnects_for_as_long_as_its_timeout_says():
    """kernel/_dask.py lengthens ``Client._timeout``, which `Client._reconnect` reads as how long to keep
    rejoining a lost scheduler before closing itself."""
    from distributed import Client

    from depin_jupyter.kernel._dask import keep_reconnecting

    source = inspect.getsource(Client._reconnect)
    assert "self._timeout" in source, "Client._reconnect no longer reads _timeout: adapt kernel/_dask.py"

    class Stub:
        _timeout = 10.0

    stub = Stub()
    keep_reconnecting(stub, 60)
    assert stub._timeout == 60.0
    keep_reconnecting(stub, 5)
    assert stub._timeout == 60.0  # never shorter than the connect timeout


def test_client_connect_calls_identity_before_registering():
    """kernel/_dask.py's client starts the identity call alongside `Client._ensure_connected` and skips the
    one that method makes while connecting: both names, and that order, must still be there."""
    from distributed import Client

    source = inspect.getsource(Client._ensure_connected)
    assert "self._update_scheduler_info()" in source, "Client._ensure_connected no longer asks for the identity"
    assert source.index("_update_scheduler_info") < source.index("register-client"), (
        "Client._ensure_connected no longer waits on the identity before registering: kernel/_dask.py can go")
    assert list(inspect.signature(Client._update_scheduler_info).parameters) == ["self", "n_workers"]


def test_quick_connect_client_runs_tasks_and_learns_the_scheduler():
    """The client that does not wait on the identity still gets it (rejoining a restarted coordinator: test_held)."""
    import time

    from distributed import LocalCluster

    from depin_jupyter.kernel._dask import client_class

    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as lc:
        client = client_class()(lc.scheduler_address, set_as_default=False, timeout=10)
        try:
            assert client.submit(lambda x: x + 1, 1).result(timeout=30) == 2
            deadline = time.monotonic() + 10
            while not client.scheduler_info().get("address") and time.monotonic() < deadline:
                time.sleep(0.02)
            assert client.scheduler_info()["address"] == lc.scheduler_address
        finally:
            client.close()


def test_nanny_gives_its_worker_process_its_config_in_instantiate():
    """worker/_dask.py's `start_worker_when` wraps ``Nanny.instantiate`` and adds to ``Nanny.config``, which
    instantiate hands the worker process; volunteer.py's fork server sets the start method Dask reads."""
    from distributed import Nanny
    from distributed.utils import get_mp_context

    assert "self.config = " in inspect.getsource(Nanny.__init__), "Nanny no longer keeps .config"
    assert "config=self.config" in inspect.getsource(Nanny.instantiate), (
        "Nanny.instantiate no longer hands .config to the worker: adapt start_worker_when")
    assert "distributed.worker.multiprocessing-method" in inspect.getsource(get_mp_context)


def test_messages_on_one_connection_without_reply_are_handled_in_order():
    """protocol/_comm.send_in_order: `PooledRPCCall.addr`/`.pool`, `ConnectionPool.connect`/`reuse`, and
    `send_recv(reply=False)` (no answer written; the next message handled after it)."""
    import asyncio

    from distributed.core import ConnectionPool, Server

    from depin_jupyter.protocol._comm import send_in_order

    async def main() -> None:
        seen: list[int] = []

        async def note(i: int) -> int:
            await asyncio.sleep(0.01 * (5 - i))  # the earlier, the slower: still handled in order
            seen.append(i)
            return len(seen)

        server = Server({"note": note})
        await server.listen("tcp://127.0.0.1:0")
        pool = await ConnectionPool()
        try:
            answer = await send_in_order(pool(server.address), "note", 5, lambda i: {"i": i})
            assert answer == 5 and seen == [0, 1, 2, 3, 4]
            assert pool.open == 1  # one connection, handed back to the pool
        finally:
            await pool.close()
            server.stop()

    asyncio.run(main())


def test_get_mp_context_keeps_a_preload_marked_as_set():
    """worker/_dask.forkserver_preloaded: `distributed.utils._forkserver_preload_set` stops `get_mp_context`
    from importing every package it knows of and replacing the fork server's preload."""
    import distributed.utils

    assert hasattr(distributed.utils, "_forkserver_preload_set")
    src = inspect.getsource(distributed.utils.get_mp_context)
    assert "_forkserver_preload_set" in src and "set_forkserver_preload" in src


def test_a_nanny_registers_over_an_idle_connection_of_its_pool():
    """worker/_dask.hand_connection: `Nanny.start_unsafe` registers over `self.rpc.connect(self.scheduler.addr)`,
    and `ConnectionPool.connect` hands out a connection found in `ConnectionPool.available` first."""
    import asyncio

    from distributed import Nanny
    from distributed.comm import connect
    from distributed.core import ConnectionPool, Server

    src = inspect.getsource(Nanny.start_unsafe)
    assert "self.rpc.connect(saddr)" in src and "saddr = self.scheduler.addr" in src and "register_nanny" in src

    async def main() -> None:
        server = Server({"ping": lambda: "pong"})
        await server.listen("tcp://127.0.0.1:0")
        pool = ConnectionPool()
        await pool.start()
        try:
            comm = await connect(server.address)
            pool.available[server.address].add(comm)
            assert await pool.connect(server.address) is comm  # the handed one, not a new connection
        finally:
            await pool.close()
            server.stop()

    asyncio.run(main())
