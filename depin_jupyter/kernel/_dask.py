"""The one Dask `Client` internal the kernel relies on, in one place (checked by tests/test_dask_contract.py).

Dask's client uses its connect timeout for two things: how long the first connection may take, and how
long it keeps trying to reconnect when its scheduler goes away before closing itself. On a volunteer
network the second must be longer (a coordinator restarting after a crash takes seconds; the runs it
holds outlive it) without making a wrong address take longer to report.
"""

from __future__ import annotations

from typing import Any

__all__ = ["keep_reconnecting"]


def keep_reconnecting(client: Any, seconds: float) -> None:
    """Let ``client`` retry a lost scheduler for ``seconds`` before it closes itself (`Client._reconnect`)."""
    client._timeout = max(float(client._timeout or 0.0), float(seconds))
