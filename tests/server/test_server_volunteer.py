"""GET depin/status on a real volunteer network: the panel joins with the kernel's published client
token (mutual TLS) and shows each volunteer, what it advertised, and its credit from the coordinator."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import socket
import time
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(180)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def net(tmp_path: pathlib.Path) -> Any:
    from volunteer_net import Network

    n = Network(tmp_path, _free_port())
    n.start_scheduler()
    try:
        n.start_worker(n.token("worker", "carol"))
        yield n
    finally:
        n.close()


async def test_status_shows_volunteers_and_credit(net: Any, jp_fetch: Any, jp_environ: Any) -> None:
    import dask

    from depin_jupyter.kernel import cluster, runner

    # As `%depin connect TOKEN` in a kernel: the session publishes {"volunteer": true, "token": ...}.
    session = await asyncio.to_thread(cluster._connect_token, net.token("client", "dana"))
    try:
        assert session.session_file is not None
        published = json.loads(session.session_file.read_text())
        assert published["volunteer"] is True and published["token"]
        assert oct(os.stat(session.session_file).st_mode & 0o777) == "0o600"

        deadline = time.monotonic() + 30
        while not (s := json.loads((await jp_fetch("depin", "status")).body))["workers"]:
            assert time.monotonic() < deadline, s
            await asyncio.sleep(0.3)
        (conn,) = s["connections"]
        assert conn["ok"] and conn["volunteer"] is True and conn["scheduler"] == net.address
        (w,) = conn["workers"]
        assert w["volunteer"] == "carol" and w["gpu_model"] is None and w["cpu_cores"] == os.cpu_count()
        assert w["trust"] == {"streak": 0, "valid": 0, "invalid": 0, "checked": 0, "trusted": False}
        assert w["cpu_model"] and w["advertised_host"]
        assert w["credit"] in ({}, None) or w["credit"].get("tasks", 0) == 0

        with dask.config.set({"depin.store.enabled": False}):
            await asyncio.to_thread(runner.run_cell, session, "y = 1", {})
        deadline = time.monotonic() + 15
        while True:
            (w,) = json.loads((await jp_fetch("depin", "status")).body)["connections"][0]["workers"]
            if (w["credit"] or {}).get("tasks"):
                break
            assert time.monotonic() < deadline, w
            await asyncio.sleep(0.3)
        assert w["credit"]["tasks"] == 1 and w["credit"]["cpu_seconds"] >= 0
    finally:
        await asyncio.to_thread(session.close)
