"""A real ipykernel (via jupyter_client): output reaches the running cell live, errors keep the kernel usable."""

from __future__ import annotations

import time

import pytest
from conftest import kernel_execute
from jupyter_client.manager import start_new_kernel


@pytest.fixture
def kernel_manager():
    """A fresh kernel per test: an interrupted cell or a closed session must not decide the next test."""
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


@pytest.fixture
def kernel(kernel_manager):
    return kernel_manager[1]


def execute(kc, code, timeout=120):
    return kernel_execute(kc, code, timeout)


def test_kernel_streams_displays_and_survives_errors(kernel):
    reply, _ = execute(kernel, "%load_ext depin_jupyter\n%depin connect local")
    assert reply["status"] == "ok"
    code = ("%%depin\nimport time\nfor i in range(3):\n    print('tick', i, flush=True)\n    time.sleep(0.4)\n"
            "from IPython.display import display, HTML\ndisplay(HTML('<i>hi</i>'))\n'done'")
    reply, msgs = execute(kernel, code)
    assert reply["status"] == "ok"
    streams = [(t, m["content"]["text"]) for t, m in msgs if m["msg_type"] == "stream"]
    text = "".join(s for _, s in streams)
    assert "tick 0" in text and "tick 2" in text
    ticks = [t for t, s in streams if "tick" in s]
    assert len(ticks) >= 2 and ticks[-1] > ticks[0]  # several messages, in the cell's order of printing
    assert any(m["msg_type"] == "display_data" and "text/html" in m["content"]["data"] for _, m in msgs)
    results = [m for _, m in msgs if m["msg_type"] == "execute_result"]
    assert results and results[0]["content"]["data"]["text/plain"] == "'done'"

    reply, msgs = execute(kernel, "%%depin\nraise ValueError('bad value 42')")
    assert reply["status"] == "error" and reply["ename"] == "ValueError" and "42" in reply["evalue"]
    reply, msgs = execute(kernel, "%%depin\nback = 7\nback")
    assert reply["status"] == "ok"
    execute(kernel, "%depin close")


def test_interrupt_cancels_the_remote_cell(kernel_manager, tmp_path):
    km, kc = kernel_manager
    beat = tmp_path / "beat"
    reply, _ = execute(kc, f"%load_ext depin_jupyter\n%depin connect local\nbeat = {str(beat)!r}")
    assert reply["status"] == "ok"
    msg_id = kc.execute("%%depin\nimport time\nn = 0\nwhile True:\n    n += 1\n"
                        "    open(beat, 'w').write(str(n))\n    time.sleep(0.01)")
    deadline = time.monotonic() + 60
    while not beat.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert beat.exists(), "the cell never started"
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=60)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
    # the worker stopped executing the cell: the heartbeat file stops changing
    time.sleep(1.0)
    first = beat.read_text()
    time.sleep(0.5)
    assert beat.read_text() == first
    reply, _ = execute(kc, "%%depin\nafter = 1\nafter")
    assert reply["status"] == "ok"
    execute(kc, "%depin close")


def test_interrupt_frees_the_cluster_from_a_cell_stuck_in_a_c_call(kernel_manager):
    """time.sleep(600) never returns to Python: the worker restarts itself; within 5 s nothing runs it."""
    from distributed import Client

    from depin_jupyter.kernel.cluster import published_sessions

    km, kc = kernel_manager
    reply, _ = execute(kc, "%load_ext depin_jupyter\n%depin connect local")
    assert reply["status"] == "ok"
    [mine] = [s for s in published_sessions() if s["pid"] == km.provisioner.pid]
    with Client(mine["scheduler"], timeout=30) as client:
        # stop_on_error=False: ipykernel would otherwise abort the next request if it arrives while the
        # interrupted one is still being torn down (a harness race, not what is tested here)
        msg_id = kc.execute("%%depin --no-store\nimport time\ntime.sleep(600)", stop_on_error=False)
        deadline = time.monotonic() + 60
        while not any(client.processing().values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(client.processing().values()), "the cell never started"
        km.interrupt_kernel()
        t0 = time.monotonic()
        reply = kc.get_shell_msg(timeout=60)
        assert reply["parent_header"]["msg_id"] == msg_id and reply["content"]["ename"] == "KeyboardInterrupt"
        while any(client.processing().values()) and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        # (how fast: benchmarks/longruns.py; a unit test asserts no wall-clock bound)
        assert not any(client.processing().values()), "the worker kept running the interrupted cell"
    reply, _ = execute(kc, "%%depin --no-store\nafter = 2\nafter")
    assert reply["status"] == "ok"
    execute(kc, "%depin close")


def _texts(msgs, kind):
    """Stream text of one kind, and the text/plain of displays (the progress line) of a cell's messages."""
    if kind in ("stdout", "stderr"):
        return "".join(m["content"]["text"] for _, m in msgs if m["msg_type"] == "stream" and m["content"]["name"] == kind)
    return "".join(m["content"]["data"].get("text/plain", "") for _, m in msgs
                   if m["msg_type"] in ("display_data", "update_display_data"))


def test_notes_are_not_errors_and_a_repr_with_the_notebooks_names_is_shown(kernel):
    reply, _ = execute(kernel, "%load_ext depin_jupyter\n%depin close")
    assert reply["status"] == "ok"
    reply, msgs = execute(kernel, "%%depin\nimport pandas as pd\ndf1 = pd.DataFrame({'A': [1, 2]})\n"
                                  "df2 = pd.DataFrame({'B': [30]})")
    assert reply["status"] == "ok"
    # "started ..." is information: on the progress line, never in the red stderr style
    assert "started CPU LocalCluster" in _texts(msgs, "display") and "started" not in _texts(msgs, "stderr")
    from test_as_if_local import HELPER

    reply, _ = execute(kernel, "%%depin --no-store\n" + HELPER)
    assert reply["status"] == "ok"
    reply, msgs = execute(kernel, "%%depin --no-store\ndisplay('df1', 'df2')")
    assert reply["status"] == "ok"
    [result] = [m["content"]["data"] for _, m in msgs if m["msg_type"] == "execute_result"]
    assert "<table" in result["text/html"] and "df2" in result["text/html"]  # formatted here, with df1 and df2
    assert "30" in result["text/plain"] and not _texts(msgs, "stderr")
    execute(kernel, "%depin close")


def test_a_failed_connect_is_not_followed_by_a_quiet_local_cluster(kernel):
    from conftest import free_port

    port = free_port()
    reply, _ = execute(kernel, "%load_ext depin_jupyter\n%depin close\nimport dask\n"
                               "dask.config.set({'depin.connect-timeout': '1s'})")
    assert reply["status"] == "ok"
    reply, _ = execute(kernel, f"%depin connect tcp://127.0.0.1:{port}")
    assert reply["status"] == "error" and reply["ename"] == "ClusterConnectionError"
    reply, _ = execute(kernel, "%%depin\nz = 1")
    assert reply["status"] == "error" and reply["ename"] == "ClusterConnectionError"
    assert f"127.0.0.1:{port}" in reply["evalue"] and "%depin connect local" in reply["evalue"]
    reply, msgs = execute(kernel, "from depin_jupyter.kernel.cluster import current_session\n"
                                  "print(current_session() is None)")
    assert _texts(msgs, "stdout").strip() == "True"
    reply, _ = execute(kernel, "%depin connect local\n%%depin\nz = 2")  # the way back that the error names
    execute(kernel, "%depin close")
