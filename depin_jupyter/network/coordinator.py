"""The coordinator of a volunteer network: a Dask scheduler with mutual TLS, roles, a result relay and credit.

State lives in one directory (``depin scheduler --state-dir``, `network.state`): the certificate authority,
the registry of issued certificates, the advertised address and the credit ledger. The scheduler itself
(`network._scheduler`) checks every message against the sender's role (`network.gate`), relays results and
inputs (`network.relay`) and keeps credit (`network.credit`) and the virtual labs' quotas (`network.lab`).
"""

from __future__ import annotations

from typing import Any

from depin_jupyter import config
from depin_jupyter.network.state import StateDir, default_state_dir

__all__ = ["StateDir", "default_state_dir", "public_address", "scheduler_class", "serve"]


def scheduler_class() -> type:
    """The `DepinScheduler` class (imported on first use so importing this module stays cheap)."""
    from depin_jupyter.network._scheduler import DepinScheduler

    return DepinScheduler


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
    # A volunteer that sends nothing (not even heartbeats: stopped, frozen, cut off) is removed after the
    # silence timeout, and its cells run elsewhere.
    silence = max(10.0, config.seconds("volunteer.silence-timeout") or 60.0)
    with dask.config.set({"distributed.scheduler.allowed-failures": config.get("coordinator.allowed-failures"),
                          "distributed.scheduler.worker-ttl": f"{silence}s"}):
        sched = cls(host=f"tls://{host}", port=port, security=state.scheduler_security(), state=state,
                    dashboard_address=dashboard_address or config.get("coordinator.dashboard-address"))
        await sched
    return sched
