"""Background runs outlive their kernel: results reach the store from the worker; --max-runtime still applies."""

from __future__ import annotations

import os
import signal
import time

import pytest
from jupyter_client.manager import start_new_kernel

from depin_jupyter.store import open_store


def _sigkill(km):
    os.kill(km.provisioner.pid, signal.SIGKILL)
    km.provisioner.process.wait(10) if hasattr(km.provisioner, "process") and km.provisioner.process else None


def _execute(kc, code, timeout=120):
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=lambda msg: None)
    return reply["content"]


@pytest.fixture
def kernel():
    started = []

    def start():
        km, kc = start_new_kernel(kernel_name="python3")
        started.append((km, kc))
        return km, kc

    yield start
    for km, kc in started:
        kc.stop_channels()
        if km.is_alive():
            km.shutdown_kernel(now=True)


def test_results_of_a_background_run_survive_a_killed_kernel(kernel, scheduler_process, tmp_path):
    url = str(tmp_path / "r.zarr")
    km, kc = kernel()
    assert _execute(kc, f"%load_ext depin_jupyter\n%depin connect {scheduler_process}")["status"] == "ok"
    reply = _execute(kc, f"%%depin --background --name survivor --store {url}\nimport time\n"
                         "time.sleep(3)\nanswer = 41 + 1")
    assert reply["status"] == "ok"
    _sigkill(km)  # no goodbye to the cluster
    deadline = time.monotonic() + 60
    done = []
    while time.monotonic() < deadline and not done:
        time.sleep(0.5)
        try:
            done = [r for r in open_store(url, create=False).runs() if r.name == "survivor" and r.complete]
        except Exception:
            pass
    assert done, "the run never reached the store after its kernel died"

    km2, kc2 = kernel()
    assert _execute(kc2, f"%load_ext depin_jupyter\n%depin load survivor --store {url}")["status"] == "ok"
    texts: list[str] = []
    reply = kc2.execute_interactive("print(answer)", timeout=60,
                                    output_hook=lambda m: texts.append(m["content"].get("text", "")))
    assert reply["content"]["status"] == "ok" and "42" in "".join(texts)


def test_max_runtime_stops_a_background_run_whose_kernel_died(kernel, scheduler_process, tmp_path):
    beat = tmp_path / "beat"
    km, kc = kernel()
    _execute(kc, f"%load_ext depin_jupyter\n%depin connect {scheduler_process}\nbeat = {str(beat)!r}")
    reply = _execute(kc, f"%%depin --background --max-runtime 3 --store {tmp_path / 'r.zarr'}\nimport time\n"
                         "import os\nn = 0\nwhile True:\n    n += 1\n    open(beat + '.tmp', 'w').write(str(n))\n"
                         "    os.replace(beat + '.tmp', beat)\n    time.sleep(0.01)")
    assert reply["status"] == "ok"
    deadline = time.monotonic() + 60
    while not beat.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    _sigkill(km)
    time.sleep(1.0)
    first = _beat(beat)
    time.sleep(0.5)
    assert _beat(beat) != first  # still running: the kernel's death did not stop it
    time.sleep(4.0)  # past --max-runtime 3
    stopped = _beat(beat)
    time.sleep(0.5)
    assert _beat(beat) == stopped, "--max-runtime did not stop the orphaned run"


def _beat(path):
    """The heartbeat count (the writer truncates then writes: retry an empty read)."""
    for _ in range(100):
        text = path.read_text()
        if text:
            return int(text)
        time.sleep(0.005)
    raise AssertionError("heartbeat file stayed empty")
