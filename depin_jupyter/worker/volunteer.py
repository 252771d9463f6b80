"""A volunteer's worker: `depin worker TOKEN` joins a coordinator with mutual TLS and leaves gracefully.

With GPUs it starts one worker per GPU through dask-cuda (``resources={'GPU': 1}``), otherwise one CPU
worker; each runs under a nanny that restarts it if it dies. The worker advertises what it is (GPU model,
memory, driver, or CPU) so `%depin status` can show it. Ctrl-C or SIGTERM hands the work back: the
coordinator retires the workers (tasks running there are re-run elsewhere, not failed) before they close.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import signal
import time
from typing import Any, Callable

from distributed import Nanny, Worker

from depin_jupyter import config
from depin_jupyter.errors import ClusterConnectionError, DepinUsageError
from depin_jupyter.protocol.identity import Token
from depin_jupyter.protocol.reach import patient_timeout, tcp_probe
from depin_jupyter.worker import controls, early
from depin_jupyter.worker._dask import (
    VolunteerWorker,
    forkserver_preloaded,
    guard_nanny,
    hand_connection,
    start_worker_when,
)
from depin_jupyter.worker.early import advertised_versions

__all__ = ["VolunteerWorker", "advertised_versions", "run", "volunteer_info", "wait_for_scheduler"]

logger = logging.getLogger("depin.volunteer")

def volunteer_info(worker: Worker | None = None) -> dict[str, Any]:
    """What this worker advertises to the coordinator (shown by `%depin status`)."""
    from depin_jupyter.gpu import describe

    advert = config.get("volunteer.advert") or {}  # measured once by `depin worker` (`_main`)
    info: dict[str, Any] = {"host": platform.node(), "python": platform.python_version(), "pid": os.getpid(),
                            "versions": advert.get("versions") or advertised_versions()}
    # self-reported, like everything here: the coordinator turns it into a speed factor for credit
    info["benchmark"] = getattr(worker, "depin_benchmark", None) or controls.cached_benchmark(False)
    try:
        gpu = describe()
    except Exception:  # noqa: BLE001 - no GPU (or no NVML): a CPU volunteer
        gpu = None
    if isinstance(gpu, dict) and gpu.get("name"):
        info["gpu"] = {k: gpu.get(k) for k in ("name", "memory", "driver", "arch") if k in gpu}
    else:
        info["cpu"] = {"model": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    return info


def _pool_of(token: Token) -> str:
    from depin_jupyter.protocol.identity import cert_pool

    return cert_pool(token.cert)


async def wait_for_scheduler(token: Token, say: Callable[[str], None] = print) -> Any:
    """Once the coordinator answers this identity, the open connection it answered on (the first nanny
    registers over it: `worker._dask.hand_connection`); retry with backoff while it is unreachable.

    A refusal (revoked token, another coordinator's certificate) is final and raised at once.
    """
    import ssl

    from distributed.comm import connect
    from distributed.comm.core import CommClosedError

    args = token.security("worker").get_connection_args("worker")
    delay = config.seconds("volunteer.join-retry-initial") or 1.0
    longest = config.seconds("volunteer.join-retry-max") or 60.0
    tries = config.get("volunteer.join-tries")
    attempt = 0
    patience = 5.0  # for the TLS handshake; grows with the round trip of a slow link (`protocol.reach`)
    while True:
        attempt += 1
        try:
            comm = await connect(token.address, timeout=max(delay, patience), **args)
        except (OSError, TimeoutError, CommClosedError) as e:
            reason = _reason(e)
            if isinstance(e.__cause__ or e, ssl.SSLError) or "SSL" in reason or "certificate" in reason:
                raise ClusterConnectionError(
                    f"the coordinator at {token.address} refused this token's certificate ({reason}). It was "
                    f"issued by another coordinator or has expired: ask for a new worker token.") from None
            rtt, why = await asyncio.to_thread(tcp_probe, token.address)
            if tries is not None and attempt >= int(tries):
                state = "stayed unreachable" if rtt is None else "answered TCP but never finished the handshake"
                raise ClusterConnectionError(f"the coordinator at {token.address} {state} after "
                                             f"{attempt} tries ({reason}).") from None
            if rtt is not None and patient_timeout(patience, rtt) > patience:
                patience = patient_timeout(patience, rtt)
                say(f"depin worker: the link to {token.address} is slow (round trip {rtt * 1000:.0f} ms): "
                    f"waiting up to {patience:.0f}s for the handshake.")
                continue
            if rtt is None:
                say(f"depin worker: the coordinator at {token.address} is unreachable ({why}); "
                    f"retrying in {delay:g}s (try {attempt + 1}).")
            else:
                say(f"depin worker: the coordinator at {token.address} answers TCP but did not finish the "
                    f"handshake ({reason}): it may be busy; retrying in {delay:g}s (try {attempt + 1}).")
            await asyncio.sleep(delay)
            delay = min(longest, delay * 2)
            continue
        try:
            await comm.write({"op": "identity", "reply": True})
            await asyncio.wait_for(comm.read(), 10)
        except (OSError, CommClosedError, asyncio.TimeoutError):
            comm.abort()
            raise ClusterConnectionError(
                f"the coordinator at {token.address} closed the connection of {token.info.name!r}: the token "
                f"was revoked or is unknown there. Ask the coordinator for a new worker token.") from None
        except BaseException:
            comm.abort()
            raise
        return comm


def _reason(e: BaseException) -> str:
    root = e
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__  # type: ignore[assignment]
    text = f"{type(root).__name__}: {root}" if str(root) else type(root).__name__
    return text[:200]


async def _start(token: Token, gpus: str, memory_limit: str, name: str, nthreads: int,
                 contact_address: str | None, say: Callable[[str], None], ready: asyncio.Future[Any],
                 first: Any) -> list[Nanny]:
    """Start the nannies; each starts its worker process once ``ready`` (`_ready`) says what it is given.
    The first registers over ``first``, the connection the first contact opened (three round trips less)."""
    from depin_jupyter.gpu import detect
    from depin_jupyter.worker import controls

    security = token.security("worker")
    common: dict[str, Any] = dict(security=security, nthreads=nthreads, memory_limit=memory_limit,
                                  worker_class=VolunteerWorker, contact_address=contact_address,
                                  startup_information={"depin": volunteer_info}, dashboard=False,
                                  # Worker addresses must be unique on the coordinator, so each listens where
                                  # its machine can be named; only the coordinator may connect (guard_nanny,
                                  # VolunteerWorker.handle_comm), and nothing needs to (results are relayed).
                                  host=None if contact_address is None else "127.0.0.1")
    wanted = early.gpu_list(gpus)
    exclude = controls.parse_gpu_indices(config.get("volunteer.exclude-gpus"))
    n_gpus, why = (0, "--gpus none") if wanted is None else detect()
    settings = controls.Controls.from_config()
    for note in settings.check(gpu_worker=bool(n_gpus)):
        say(f"depin worker: {note}.")
    if n_gpus:
        from dask_cuda import CUDAWorker

        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # indices as nvidia-smi and NVML number them
        devices = controls.cuda_visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"), n_gpus, wanted, exclude)
        if wanted or exclude:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        if exclude:
            say(f"depin worker: GPU(s) {','.join(exclude)} excluded; sharing GPU(s) {','.join(devices)}.")
        power = config.get("volunteer.max-power")
        if power is not None:
            for line in controls.set_power_limits(devices, float(power)):
                say(f"depin worker: {line}.")
        cw = CUDAWorker(token.address, name=name, resources="GPU=1", **common)
        for nanny in cw.nannies:
            start_worker_when(guard_nanny(nanny), ready)
        hand_connection(cw.nannies[0], first)
        await cw
        say(f"depin worker: joined {token.address} as {name!r} (pool {_pool_of(token)}) with {len(cw.nannies)} GPU worker(s).")
        return list(cw.nannies)
    if wanted:
        raise DepinUsageError(f"--gpus {gpus}: no usable GPU here ({why}); use --gpus none for a CPU worker")
    if config.get("volunteer.max-power") is not None:
        say("depin worker: --max-power applies to GPUs; this CPU worker sets no power limit.")
    nanny = start_worker_when(guard_nanny(Nanny(token.address, name=name, **common)), ready)
    hand_connection(nanny, first)
    await nanny
    say(f"depin worker: joined {token.address} as {name!r} (pool {_pool_of(token)}) with a CPU worker ({why}); cells use numpy here.")
    return [nanny]


async def _leave(token: Token, nannies: list[Nanny], say: Callable[[str], None]) -> None:
    """Hand the work back: ask the coordinator to retire our workers, then close them."""
    from distributed.core import rpc

    addresses = [n.worker_address for n in nannies if n.worker_address]
    for n in nannies:
        n.close_gracefully(reason="volunteer-leaving")  # the nanny must not restart a worker we retire
    say(f"depin worker: leaving; handing {len(addresses)} worker(s) back to the coordinator...")
    timeout = config.seconds("volunteer.leave-timeout") or 20.0
    args = token.security("worker").get_connection_args("worker")
    async with rpc(token.address, connection_args=args) as sched:
        try:
            await asyncio.wait_for(sched.retire_workers(workers=addresses, close_workers=False, remove=True,
                                                        stimulus_id=f"depin-leave-{time.time()}"), timeout)
        except Exception as e:  # noqa: BLE001 - fall back to a plain, still expected, departure
            say(f"depin worker: retiring took too long or failed ({_reason(e)}); leaving anyway "
                f"(running cells are re-run elsewhere).")
            for a in addresses:
                try:
                    await asyncio.wait_for(sched.unregister(address=a, expected=True, close=False,
                                                            stimulus_id=f"depin-leave-{time.time()}"), 5)
                except Exception:  # noqa: BLE001, S110 - the scheduler notices the closed connection itself
                    pass
    await asyncio.gather(*(n.close(timeout=5, reason="volunteer-left") for n in nannies), return_exceptions=True)
    say("depin worker: left gracefully.")


async def _ready(probing: asyncio.Future[Any], warming: asyncio.Future[Any],
                 benching: asyncio.Future[Any]) -> dict[str, Any] | None:
    """The config a worker process is given on top of its nanny's, once the probe, the fork server and the
    benchmark are done; None when the probe refused this machine."""
    versions = await probing
    if versions is None:
        return None
    await warming
    forkserver_preloaded()
    advert: dict[str, Any] = {"versions": versions}
    benchmark = await benching
    if benchmark is not None:
        advert["benchmark"] = benchmark
    volunteer = {"unimportable": config.get("volunteer.unimportable"), "advert": advert}
    return {"depin": {"volunteer": volunteer}}


async def _main(token: Token, gpus: str, memory_limit: str, name: str, nthreads: int,
                contact_address: str | None, say: Callable[[str], None], started: early.Started) -> int:
    # Begun before this process imported Dask, and still running while the coordinator is first reached
    # (none waits on another): the sandbox probe, the process worker processes fork from, and the CPU
    # benchmark its workers advertise (`worker.early`).
    warming = asyncio.wrap_future(started.warming)
    probing: asyncio.Future[Any] = asyncio.wrap_future(started.probing)
    benching = asyncio.wrap_future(started.benching)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stopping = asyncio.ensure_future(stop.wait())
    joined = False
    while True:
        waiting = asyncio.ensure_future(wait_for_scheduler(token, say))
        await asyncio.wait([waiting, probing], return_when=asyncio.FIRST_COMPLETED)
        if probing.done() and probing.result() is None:
            waiting.cancel()
            return 1
        try:
            first = await waiting
        except ClusterConnectionError as e:  # refused (revoked, another coordinator): final
            say(f"depin worker: {e}")
            return 1
        ready = asyncio.ensure_future(_ready(probing, warming, benching))
        try:
            nannies = await _start(token, gpus, memory_limit, name, nthreads, contact_address, say, ready, first)
        except Exception:
            if ready.done() and ready.result() is None:  # the probe refused: said
                return 1
            raise
        if joined:
            say(f"depin worker: rejoined {token.address}.")
        joined = True
        finished = asyncio.ensure_future(asyncio.gather(*(n.finished() for n in nannies)))
        await asyncio.wait([finished, stopping], return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            await _leave(token, nannies, say)
            return 0
        # The coordinator went away (restarted, crashed, the network dropped): join it again when it is back.
        say("depin worker: lost the coordinator; rejoining when it answers again.")
        await asyncio.gather(*(n.close(timeout=5, reason="coordinator-lost") for n in nannies),
                             return_exceptions=True)


def run(token_text: str, gpus: str = "all", memory_limit: str = "auto", name: str | None = None,
        nthreads: int | None = None, contact_address: str | None = None, *, hours: str | None = None,
        when_idle: bool | None = None, exclude_gpus: str | None = None, max_gpu_util: float | None = None,
        max_power: float | None = None, started: early.Started | None = None) -> int:
    """Join the coordinator named in the token and work until stopped; the process exit code.

    The volunteer's controls (``hours`` ... ``max_power``) override config ``depin.volunteer.*``; the
    worker processes read them from the config this process hands them. ``started``: what `early.begin`
    started before this module was imported (`depin worker` does); begun here otherwise.
    """
    import dask.config

    from depin_jupyter.worker import controls

    token = Token.decode(token_text)
    token.check_valid("worker")

    say = early.say
    options = {"hours": hours, "when-idle": when_idle, "exclude-gpus": exclude_gpus,
               "max-gpu-util": max_gpu_util, "max-power": max_power}
    dask.config.set({f"depin.volunteer.{k}": v for k, v in options.items() if v is not None})
    if config.get("volunteer.hours"):
        controls.parse_hours(config.get("volunteer.hours"))  # a typo fails here, not in every worker
    util = config.get("volunteer.max-gpu-util")
    if util is not None and not 0 <= float(util) <= 100:
        raise DepinUsageError(f"--max-gpu-util {util}: give a percentage between 0 and 100")
    say(f"depin worker: `depin pause [--for 30m]` / `depin resume` control this worker (control directory "
        f"{controls.control_dir()}).")
    nthreads = nthreads or int(config.get("volunteer.nthreads"))
    started = started or early.begin(gpus, say)
    return asyncio.run(_main(token, gpus, memory_limit, name or token.info.name, nthreads, contact_address, say,
                             started))
