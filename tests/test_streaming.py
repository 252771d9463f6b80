"""Big inputs and results stream through the coordinator in parts (real processes, a bandwidth-capped link):
the volunteer reads an input while the notebook still sends it, the notebook reads a result while the
volunteer still sends it, and the coordinator keeps nothing of either once it was handed over."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import free_port
from delay_proxy import DelayProxy
from volunteer_net import Network, wait_for_workers

from depin_jupyter.kernel import background, cluster, runner
from depin_jupyter.protocol.identity import Token


@pytest.fixture
def slow(tmp_path):
    """A coordinator whose notebook and volunteer both reach it through a 400 Mbit/s link."""
    net = Network(tmp_path, free_port())
    net.start_scheduler()
    proxy = DelayProxy(net.port)
    proxy.rtt, proxy.bandwidth = 0.01, 400e6
    via = f"tls://127.0.0.1:{proxy.port}"

    def through(role: str, name: str) -> str:
        return dataclasses.replace(Token.decode(net.token(role, name)), address=via).encode()

    net.start_worker(through("worker", "far-vol"))
    session = cluster._connect_token(through("client", "far-sci"))
    wait_for_workers(session, 1)
    try:
        yield net, session
    finally:
        session.close()
        cluster.close_session()
        net.close()


def _stats(session: cluster.Session) -> dict:
    return session.client.sync(session.client.scheduler.depin_input_stats)


def test_a_big_input_and_a_big_result_are_read_while_they_arrive(slow):
    _, s = slow
    one = runner.RunOptions(replicas=1, no_store=True)
    a = np.random.default_rng(1).random(4 * 2**20)  # 32 MiB: 0.7 s on the link, 9 parts
    ns = {"a": a}
    runner.run_cell(s, "t = float(a.sum())", ns, one)
    assert ns["t"] == float(a.sum())
    stats = _stats(s)
    assert stats["streamed"] >= 1, stats  # the volunteer had parts before the notebook had sent them all
    assert stats["uploading"] == 0 and stats["puts"] >= 1  # and the whole input is held for the next cell
    out = runner.run_cell(s, "b = a[::-1] * 2", ns, one)
    assert out.reused_inputs == ["a"] and np.array_equal(ns["b"], a[::-1] * 2)
    after = _stats(s)
    assert after["parts-read-arriving"] >= 1, after  # the notebook read the result while it arrived
    assert after["relay-bytes"] == 0 and after["result-parts-bytes"] == 0, after  # nothing left behind
    # a result read only after the run ended (a background run), all parts from what was handed over
    background.submit(s, "c = a * 3", ns, runner.RunOptions(replicas=1, no_store=True, name="tripled"))
    background.wait(s, ns, "tripled")
    assert np.array_equal(ns["c"], a * 3)
    final = _stats(s)
    assert final["relay-bytes"] == 0 and final["result-parts-bytes"] == 0, final
