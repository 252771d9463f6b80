"""depin_jupyter.kernel.widgets on its own: the text fallback, and the live widget in a real ipykernel."""

from __future__ import annotations

import io
import time

import pytest
from conftest import kernel_execute

from depin_jupyter.kernel import widgets
from depin_jupyter.kernel.records import Progress


def test_auto_outside_a_kernel_is_text_and_modes_are_checked() -> None:
    assert not widgets.widgets_available()
    assert isinstance(widgets.make_progress("cell"), widgets.TextProgress)
    assert type(widgets.make_progress("cell", mode="off")) is Progress
    with pytest.raises(ValueError, match="progress mode"):
        widgets.make_progress("cell", mode="loud")


def test_text_says_nothing_for_a_quick_run() -> None:
    out = io.StringIO()
    p = widgets.TextProgress("quick", quiet_s=0.5, stream=out)
    for stage, detail in [("shipping", "1 input(s)"), ("queued", "sent 8 B"), ("running", "on w0 (tcp://x)"),
                          ("done", "on w0 in 0.01s")]:
        p.update(stage, detail)
    time.sleep(0.7)  # the pending first line was cancelled by "done"
    assert out.getvalue() == ""


def test_text_speaks_once_a_run_is_slow() -> None:
    out = io.StringIO()
    p = widgets.TextProgress("slow", quiet_s=0.2, stream=out)
    p.update("shipping", "2 input(s)")
    p.update("running", "on worker-1 (tcp://127.0.0.1:1)")
    time.sleep(0.4)  # past quiet_s: the stage the run is in is printed, once
    p.update("storing")
    p.update("done", "on worker-1 in 0.41s")
    p.update("failed", "late")  # nothing after a terminal stage
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("depin [slow]: running on worker-1 (tcp://127.0.0.1:1) (")
    assert lines[1].startswith("depin [slow]: storing results (")
    assert lines[2].startswith("depin [slow]: done on worker-1 in 0.41s (")


def test_many_runs_share_one_clock_thread() -> None:
    """No thread per run: the first lines of 50 overlapping slow runs all come from one clock thread."""
    import threading

    out = io.StringIO()
    runs = [widgets.TextProgress(f"r{i}", quiet_s=0.2 + i * 0.002, stream=out) for i in range(50)]
    before = threading.active_count()
    for p in runs:
        p.update("running", "on w")
    assert threading.active_count() <= before + 1
    for p in runs[::2]:
        p.update("done", "early")  # half finish early: their pending lines are cancelled
    deadline = time.monotonic() + 10  # a loaded CI machine may run the clock late, never early
    while len(out.getvalue().splitlines()) < 25 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # and nothing more comes
    lines = out.getvalue().splitlines()
    assert sorted(ln.split("]")[0] for ln in lines) == sorted(f"depin [r{i}" for i in range(1, 50, 2))


@pytest.fixture(scope="module")
def kernel():
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    try:
        yield kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def _execute(kc, code: str, timeout: float = 60) -> tuple[dict, list[dict]]:
    reply, msgs = kernel_execute(kc, code, timeout)
    return reply, [m for _, m in msgs]


def test_widget_in_a_kernel_updates_live_and_leaves_a_text_fallback(kernel) -> None:
    code = (
        "import time\n"
        "from depin_jupyter.kernel.widgets import make_progress, WidgetProgress\n"
        "p = make_progress('demo')\n"
        "assert isinstance(p, WidgetProgress), type(p)\n"
        "p.update('shipping', '1 input(s)')\n"
        "p.update('running', 'on worker-0 (tcp://127.0.0.1:1)')\n"
        "time.sleep(0.8)\n"
        "p.update('done', 'on worker-0 in 0.80s')\n"
    )
    reply, msgs = _execute(kernel, code)
    assert reply["status"] == "ok", reply
    opened = [m for m in msgs if m["msg_type"] == "comm_open"
              and m["content"]["data"]["state"].get("_model_name") == "HTMLModel"]
    assert len(opened) == 1
    model_id = opened[0]["content"]["comm_id"]
    (shown,) = [m for m in msgs if m["msg_type"] == "display_data"]
    data = shown["content"]["data"]
    assert data["application/vnd.jupyter.widget-view+json"]["model_id"] == model_id
    assert data["text/plain"].startswith("depin [demo]: shipping inputs 1 input(s)")
    display_id = shown["content"]["transient"]["display_id"]
    updates = [m["content"] for m in msgs if m["msg_type"] == "update_display_data"]
    assert updates and all(u["transient"]["display_id"] == display_id for u in updates)
    assert updates[-1]["data"]["text/plain"].startswith("depin [demo]: done on worker-0 in 0.80s · ")
    values = [m["content"]["data"]["state"]["value"] for m in msgs if m["msg_type"] == "comm_msg"
              and m["content"]["comm_id"] == model_id and "value" in m["content"]["data"].get("state", {})]
    # live: the stage changes, and the elapsed time ticks while running (at least one tick in 0.8 s)
    assert any('data-stage="running"' in v for v in values) and 'data-stage="done"' in values[-1]
    running = [v for v in values if 'data-stage="running"' in v]
    assert len(set(running)) >= 2, "the elapsed time did not tick"
