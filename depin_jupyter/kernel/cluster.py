"""The notebook's connection to a cluster: the embedded default, or a scheduler address.

One `Session` per kernel holds the Dask client, the embedded cluster if we started one, the cache
of inputs already on the cluster and the live-output subscription.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

from depin_jupyter import config
from depin_jupyter.errors import ClusterConnectionError, DepinError, DepinUsageError

__all__ = ["Session", "WorkerInfo", "connect", "get_session", "close_session", "current_session",
           "failed_connect", "published_sessions"]

_session: Session | None = None
_failed: tuple[str, str] | None = None   # (target, why) of a failed connect that left no session
_session_lock = threading.Lock()
_STALE_OK_S = 60.0  # a volunteer network's worker list this old is used while a thread refreshes it


@dataclass(frozen=True)
class WorkerInfo:
    """One worker as `%depin status` shows it."""

    address: str
    name: str
    nthreads: int
    memory_limit: int
    gpus: int
    gpu_model: str | None
    gpu_memory: int | None
    executing: int
    pools: tuple[str, ...] = ()   # from Dask resources "pool:NAME" (on a volunteer network: granted by the coordinator)


class Session:
    """A live connection: client, optional embedded cluster, input cache, stream dispatcher."""

    def __init__(self, client: Any, cluster: Any | None, description: str, untrusted: bool = False,
                 token: str | None = None) -> None:
        from depin_jupyter.kernel.envcheck import EnvironmentCache
        from depin_jupyter.kernel.shipping import InputCache
        from depin_jupyter.kernel.stream import StreamDispatcher

        self.client = client
        self.cluster = cluster
        # A volunteer network: results come through the coordinator's relay, decoded without unpickling,
        # and nothing dials a worker (volunteers install the depin worker plugins themselves).
        self.untrusted = untrusted
        self.token = token  # the client token of a volunteer network (the Jupyter server's panel uses it)
        # the certificate name this session speaks as on a volunteer network (None elsewhere)
        self.identity: str | None = None
        if token:
            from depin_jupyter.protocol.identity import Token

            self.identity = Token.decode(token).info.name
        self.description = description
        self.inputs = InputCache()
        self.streams = StreamDispatcher(client)
        self.end_watcher: Any = None  # volunteer networks: one long poll for all cells' ends (`kernel.watch`)
        self.cpu_fallback_said = False
        self.few_volunteers_said = False
        self.deps_said: set[str] = set()  # files the notebook was told to declare with --deps
        self.last_energy: tuple[str, Any] | None = None  # (run id, energy) of the last run, for %depin status
        self.env = EnvironmentCache()
        self._gpus: dict[str, Any] = {}
        self.background: dict[str, Any] = {}   # name -> background.BackgroundRun
        self.last_workers: list[WorkerInfo] = []
        self._workers_at = 0.0
        self._info: dict[str, Any] = {}  # address -> the worker's record as last heard (volunteers' adverts)
        self._roster_at: tuple[str | None, int] = (None, 0)  # the coordinator's roster this `_info` reflects
        self._looking = threading.Lock()  # one look at the workers at a time (a refresh may run in a thread)
        self._refreshing = False
        self.session_file = _publish(self)
        if not untrusted:
            from depin_jupyter.worker.entry import cancel_on_release

            client.register_plugin(cancel_on_release())

    @property
    def address(self) -> str:
        return str(self.client.scheduler.address)

    def workers(self, max_age: float = 2.0, live: bool = False) -> list[WorkerInfo]:
        """The workers connected (as of at most ``max_age`` seconds ago), with GPU model and memory.

        Asking the scheduler costs a round trip, so a burst of cells shares one answer. On a volunteer network
        the coordinator answers with the joins and leaves since the last look (`network.roster`), so the
        bytes per cell do not grow with the number of volunteers, and a list up to `_STALE_OK_S` old is used
        while a thread brings it up to date (a cell does not wait a round trip for it; placement asks again
        with ``max_age=0`` when the list names no suitable worker); ``live`` asks for every worker's whole
        record instead (tasks executing now: `%depin status`).
        """
        import time

        if not live and self.last_workers:
            age = time.monotonic() - self._workers_at
            if age < max_age:
                return self.last_workers
            if self.untrusted and max_age > 0 and age < _STALE_OK_S:
                self._refresh_soon()
                return self.last_workers
        with self._looking:
            if not live and self.last_workers and time.monotonic() - self._workers_at < max_age:
                return self.last_workers  # a refresh in a thread finished while this waited for it
            return self._look(live)

    def _refresh_soon(self) -> None:
        """Bring the worker list up to date in a thread (one at a time)."""
        with self._looking:
            if self._refreshing:
                return
            self._refreshing = True

        def refresh() -> None:
            try:
                with self._looking:
                    self._look(False)
            except Exception:  # noqa: BLE001, S110 - the next cell looks again (and says why if it fails)
                pass
            finally:
                self._refreshing = False

        threading.Thread(target=refresh, name="depin-roster", daemon=True).start()

    def _look(self, live: bool) -> list[WorkerInfo]:
        """Ask the scheduler (or the coordinator's roster) for the workers now (caller holds ``_looking``)."""
        import time

        info = self._roster() if self.untrusted and not live else self._everything()
        self._workers_at = time.monotonic()
        out = []
        for addr, w in sorted(info.items()):
            gpu = w.get("gpu") or {}
            volunteer = (w.get("depin") or {}).get("gpu") if isinstance(w.get("depin"), dict) else None
            if not gpu.get("name") and isinstance(volunteer, dict):
                gpu = {"name": volunteer.get("name"), "memory-total": volunteer.get("memory")}
            out.append(WorkerInfo(
                address=addr,
                name=str(w.get("name", addr)),
                nthreads=int(w.get("nthreads", 0)),
                memory_limit=int(w.get("memory_limit") or 0),
                gpus=int((w.get("resources") or {}).get("GPU", 0)),
                gpu_model=gpu.get("name"),
                gpu_memory=gpu.get("memory-total"),
                executing=int((w.get("metrics") or {}).get("task_counts", {}).get("executing", 0)
                              if isinstance((w.get("metrics") or {}).get("task_counts"), dict) else 0),
                pools=tuple(sorted(str(r)[5:] for r in (w.get("resources") or {}) if str(r).startswith("pool:"))),
            ))
        self.last_workers = out
        return out

    def gpu_hardware(self, addresses: list[str]) -> dict[str, Any]:
        """GPU description (gpu.describe) of each worker, asked once per worker and cached."""
        from depin_jupyter.gpu import describe

        unknown = [a for a in addresses if a not in self._gpus]
        if unknown and self.untrusted:  # what volunteers advertised when they joined; never dial them
            info = self._advertised(unknown)
            self._gpus.update({a: ((info.get(a) or {}).get("depin") or {}).get("gpu") for a in unknown})
        elif unknown:
            self._gpus.update(self.client.run(describe, workers=unknown, on_error="return"))
        return {a: (self._gpus.get(a) if isinstance(self._gpus.get(a), dict) else None) for a in addresses}

    def worker_versions(self, workers: list[str], packages: list[str]) -> dict[str, dict[str, str | None]]:
        """Package versions on ``workers``: asked of each worker, or as volunteers advertised them."""
        if not self.untrusted:
            if self.env.unknown(workers, packages):
                # Workers not asked yet: new ones, or the list is from before a worker died (asking a dead one
                # waits for Dask's connect timeout). A fresh list first; it costs a round trip only then.
                live = {w.address for w in self.workers(max_age=0)}
                workers = [w for w in workers if w in live]
            return self.env.versions(self.client, workers, packages)
        info = self._advertised(workers)
        out = {}
        for w in workers:
            advertised = ((info.get(w) or {}).get("depin") or {}).get("versions")
            if isinstance(advertised, dict):
                out[w] = {p: advertised.get(p) for p in packages}
        return out

    def _advertised(self, workers: list[str]) -> dict[str, Any]:
        """What volunteers advertised when they joined (fixed for a worker's life): the roster this session
        holds when it names them all, else brought up to date first."""
        if not all(w in self._info for w in workers):
            with self._looking:
                self._roster()
        return self._info

    def _everything(self) -> dict[str, Any]:
        """Every worker's whole record, as Dask's scheduler has it (one round trip; bytes grow with workers)."""
        self._info = dict(self.client.scheduler_info(n_workers=-1)["workers"])
        return self._info

    def _roster(self) -> dict[str, Any]:
        """This session's roster of a volunteer network, brought up to date with the changes since it was
        last (`network.roster.Roster.since`): usually a few dozen bytes."""
        from depin_jupyter.protocol.rpc import Coordinator

        reply = Coordinator.of_client(self.client).roster(*self._roster_at)
        changed = {str(a): dict(e) for a, e in dict(reply.get("workers") or {}).items() if isinstance(e, dict)}
        if reply.get("full"):
            self._info = changed
        else:
            self._info.update(changed)
            for address in reply.get("removed") or ():
                self._info.pop(str(address), None)
        self._roster_at = (str(reply.get("generation")), int(reply.get("epoch") or 0))
        return self._info

    def close(self) -> None:
        if self.session_file is not None:
            self.session_file.unlink(missing_ok=True)
        self.inputs.clear()
        try:
            self.client.close(timeout=2 * (config.seconds("connect-timeout") or 10.0))
        finally:
            if self.end_watcher is not None:  # after the client: a map's batches stay on the coordinator
                self.end_watcher.close()
            if self.cluster is not None:
                self.cluster.close()


def _sessions_dir() -> Any:
    import pathlib

    from jupyter_core.paths import jupyter_runtime_dir

    return pathlib.Path(jupyter_runtime_dir()) / "depin-sessions"


def _publish(session: Session) -> Any:
    """Write this kernel's connection (scheduler address, description) where the Jupyter server finds it.

    The JupyterLab panel runs in the server process, not the kernel: it reads these files and asks the
    scheduler itself. Removed when the session closes; files of dead processes are ignored by readers.
    """
    import json
    import time

    try:
        d = _sessions_dir()
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        info = {"pid": os.getpid(), "scheduler": session.address, "description": session.description,
                "embedded": session.cluster is not None, "started": time.time(),
                "volunteer": session.untrusted}
        if session.token:  # same user only (0600 in the 0700 runtime dir): the panel joins as this client
            info["token"] = session.token
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(info))
        tmp.replace(path)
        return path
    except Exception:  # noqa: BLE001 - the panel is optional; never fail a connection over it
        return None


def published_sessions() -> list[dict[str, Any]]:
    """Connections published by live kernels on this machine (for the Jupyter server extension)."""
    import json

    out = []
    d = _sessions_dir()
    for path in sorted(d.glob("*.json")) if d.exists() else []:
        try:
            info = json.loads(path.read_text())
            os.kill(int(info["pid"]), 0)  # still alive?
        except (OSError, ValueError, KeyError):
            continue
        out.append(info)
    return out


def _start_local() -> Session:
    """The embedded default: LocalCUDACluster when GPUs are usable, else a CPU LocalCluster."""
    import dask.config
    from distributed import Client, LocalCluster

    from depin_jupyter.gpu import detect

    n_gpus, why = detect()
    lc = "local-cluster."
    common: dict[str, Any] = dict(
        threads_per_worker=config.get(lc + "threads-per-worker"),
        # null: a free port, so a second cluster never warns that 8787 is taken
        dashboard_address=config.get(lc + "dashboard-address") or ":0",
        memory_limit=config.get(lc + "memory-limit"),
    )
    n_workers = config.get(lc + "n-workers")
    # Our own cluster reports a dead worker at once, so `--retries` (not the scheduler) decides re-runs.
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        if n_gpus:
            from dask_cuda import LocalCUDACluster

            cluster = LocalCUDACluster(n_workers=n_workers or n_gpus, resources={"GPU": 1}, **common)
            what = f"LocalCUDACluster with {n_workers or n_gpus} GPU worker(s) ({why})"
        else:
            n = n_workers or max(1, min(2, os.cpu_count() or 1))
            cluster = LocalCluster(n_workers=n, processes=config.get(lc + "processes"), **common)
            what = f"CPU LocalCluster with {n} worker process(es) (no GPU: {why}; cells use numpy)"
    client = Client(cluster, set_as_default=False)
    from depin_jupyter.worker.entry import ignore_interrupt

    client.register_plugin(ignore_interrupt())
    return Session(client, cluster, what)


def _connect_address(address: str) -> Session:
    from depin_jupyter.kernel._dask import client_class

    timeout = config.seconds("connect-timeout")
    try:
        client = client_class()(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as e:
        raise ClusterConnectionError(
            f"no Dask scheduler answered at {address} within {timeout:g}s ({type(e).__name__}: {e}). "
            f"Start one there (`dask scheduler`, or `depin scheduler` for a volunteer network), check "
            f"the address and port, or use `%depin connect local` for a cluster on this machine."
        ) from None
    return Session(client, None, f"scheduler at {address}")


def _connect_token(text: str) -> Session:
    """Join a volunteer network with a client token (mutual TLS; results relayed, never unpickled)."""
    from depin_jupyter.kernel._dask import client_class
    from depin_jupyter.protocol.identity import Token

    token = Token.decode(text)
    token.check_valid("client")
    from depin_jupyter.protocol.reach import patient_timeout, tcp_probe

    timeout = config.seconds("connect-timeout") or 10.0
    who = token.info.name
    tried = timeout
    while True:
        try:
            client = client_class()(token.address, security=token.security("client"), timeout=tried,
                                    set_as_default=False)
            break
        except ImportError as e:  # the coordinator's refusal arrives this way (stream-start error)
            raise ClusterConnectionError(f"{e}. Ask the coordinator for a client token "
                                         f"(`depin token issue --role client --name {who}`).") from None
        except (OSError, TimeoutError) as e:
            text_e = f"{type(e).__name__}: {e}"
            if "SSL" in text_e or "closed" in text_e.lower():
                raise ClusterConnectionError(
                    f"could not join the volunteer network at {token.address} as {who!r} ({text_e}): the "
                    f"coordinator refused this certificate (revoked, expired or from another coordinator): ask "
                    f"for a new client token.") from None
            rtt, why = tcp_probe(token.address)
            if rtt is None:
                raise ClusterConnectionError(
                    f"could not join the volunteer network at {token.address} as {who!r}: nothing answers "
                    f"there ({why}); check that `depin scheduler` runs there and that its port is reachable "
                    f"from here.") from None
            longer = patient_timeout(timeout, rtt)
            if tried >= longer:  # waited as long as this link warrants: a busy or stuck coordinator
                raise ClusterConnectionError(
                    f"could not join the volunteer network at {token.address} as {who!r} within {tried:g}s: "
                    f"it is reachable (round trip {rtt * 1000:.0f} ms) but did not finish the join "
                    f"({text_e}); the coordinator may be overloaded, or raise depin.connect-timeout.") from None
            print(f"depin: the link to {token.address} is slow (round trip {rtt * 1000:.0f} ms): "
                  f"waiting up to {longer:.0f}s to join.")  # a note, not an error: stdout
            tried = longer
    from depin_jupyter.kernel._dask import keep_reconnecting

    # A coordinator restarting (after a crash) keeps the background runs and maps it holds: wait for it.
    keep_reconnecting(client, config.seconds("reconnect-timeout") or timeout)
    return Session(client, None, f"volunteer network at {token.address} as {who!r} (results relayed, "
                                 f"decoded without pickle)", untrusted=True, token=token.encode())


def connect(target: str | None = None) -> Session:
    """Connect this kernel to ``target`` (None/"local": embedded default; an address).

    The previous session is closed only once the new one is up, so a failed connect loses nothing; with
    no previous session, a failed connect leaves the kernel not connected (`get_session` then refuses to
    start the embedded cluster behind the user's back).
    """
    global _session, _failed
    config.check()
    target = target if target is not None else config.get("scheduler-address")
    try:
        new = _open(target)
    except DepinError as e:
        old = _session
        if old is None:
            _failed = (_shown_target(target), str(e))
            raise
        try:
            still = type(e)(f"{e} Still connected to {old.description}: cells run there until a connect succeeds.")
        except TypeError:  # an error type with other arguments: keep it as it is
            raise e from None
        raise still from None
    with _session_lock:
        old, _session, _failed = _session, new, None
    if old is not None:
        old.close()
    return new


def _open(target: str | None) -> Session:
    from depin_jupyter.protocol.identity import TOKEN_PREFIX

    if target in (None, "", "local"):
        return _start_local()
    assert target is not None
    if target.startswith(TOKEN_PREFIX) or (os.path.isfile(os.path.expanduser(target)) and "://" not in target):
        return _connect_token(target)
    if "://" in target or ":" in target:
        return _connect_address(target if "://" in target else f"tcp://{target}")
    raise DepinUsageError(
        f"cannot connect to {target!r}: give nothing or 'local' for a cluster on this machine, or "
        f"a scheduler address such as tcp://host:8786, or a volunteer network's client token (or a "
        f"file holding it)."
    )


def _shown_target(target: str | None) -> str:
    """The target as error messages may show it: a token's secret part is cut."""
    from depin_jupyter.protocol.identity import TOKEN_PREFIX

    if target in (None, "", "local"):
        return "local"
    assert target is not None
    return f"{target[:len(TOKEN_PREFIX) + 6]}... (a client token)" if target.startswith(TOKEN_PREFIX) else target


def current_session() -> Session | None:
    """The session if one is connected (never starts one)."""
    return _session


def failed_connect() -> tuple[str, str] | None:
    """(target, why) of the connect that failed and left the kernel not connected, else None."""
    return _failed


def get_session() -> Session:
    """The session, starting the embedded default on first use (as the first `%%depin` does).

    After a failed connect with no session to fall back on, this raises instead: the user asked for
    another cluster, and quietly running cells on this machine would be a surprise.
    """
    if _session is None:
        if _failed is not None:
            target, why = _failed
            raise ClusterConnectionError(
                f"not connected: `%depin connect {target}` failed ({why.rstrip('.')}). Connect again once "
                f"that is fixed, or run `%depin connect local` for the embedded cluster on this machine.")
        return connect()
    return _session


def close_session() -> bool:
    """Close the session's client and any embedded cluster; True if there was one. Forgets a failed connect."""
    global _session, _failed
    with _session_lock:
        _failed = None
        if _session is None:
            return False
        _session.close()
        _session = None
        return True
