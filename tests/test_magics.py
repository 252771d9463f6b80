"""`%%depin` end to end on a real LocalCluster with worker processes: the cell runs remotely as if local."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from conftest import run, run_ok
from IPython.utils.capture import capture_output


def test_help_lists_every_option(ip):
    doc = ip.find_cell_magic("depin").__doc__
    for opt in ("--gpu", "--cpu", "--timeout", "--retries", "--name", "--worker", "--inputs", "--outputs"):
        assert opt in doc
    assert "connect" in ip.find_line_magic("depin").__doc__


def test_cell_runs_on_a_worker_and_binds_outputs(shell, depin_session):
    run_ok(shell, "import os\nimport numpy as np\na = np.arange(6.0)\nscale = 3")
    value = run_ok(shell, "%%depin\nb = a * scale\npid = os.getpid()\ntotal = float(b.sum())\ntotal")
    assert value == 45.0
    ns = shell.user_ns
    np.testing.assert_array_equal(ns["b"], np.arange(6.0) * 3)
    assert ns["pid"] != os.getpid()  # it really ran in a worker process
    worker_pids = depin_session.client.run(os.getpid)
    assert ns["pid"] in worker_pids.values()


def test_modules_are_reimported_and_notebook_functions_travel_by_value(shell):
    run_ok(shell, "import math\nk = 10\ndef f(v):\n    return math.sqrt(v) * k\n"
                  "class Point:\n    def __init__(self, x):\n        self.x = x\n    def norm(self):\n        return abs(self.x)")
    run_ok(shell, "%%depin\nr = f(16)\np = Point(-3)\nn = p.norm()")
    assert shell.user_ns["r"] == 40.0 and shell.user_ns["n"] == 3
    assert type(shell.user_ns["p"]).__name__ == "Point"


def test_functions_defined_remotely_see_the_notebook_namespace(shell):
    run_ok(shell, "%%depin\nbase = 2\ndef twice(v):\n    return v * base")
    run_ok(shell, "base = 5")
    assert run_ok(shell, "twice(3)") == 15  # it reads the notebook's current `base`, as a local def would


def test_output_kinds(shell):
    run_ok(shell, "import os\ncount = 1\nold = 'x'\npairs = [(1, 2), (3, 4)]")
    run_ok(shell, "%%depin\ncount += 41\ndel old\nfor i, (p, q) in enumerate(pairs):\n    last = p + q\n"
                  "import json as js\nwith open(os.devnull) as fh:\n    closed = fh.closed\n")
    ns = shell.user_ns
    assert ns["count"] == 42 and "old" not in ns
    assert (ns["i"], ns["p"], ns["q"], ns["last"]) == (1, 3, 4, 7)
    assert ns["js"] is sys.modules["json"]


def test_inputs_and_outputs_overrides(shell):
    run_ok(shell, "u = 1\nv = 2")
    run_ok(shell, "%%depin --inputs u --outputs w\nw = globals().get('v', 'missing')\nz = 3")
    assert shell.user_ns["w"] == "missing"  # v was not sent
    assert "z" not in shell.user_ns           # z was not brought back


def test_exception_keeps_type_message_and_cell_line_numbers(shell):
    run_ok(shell, "d = {'a': 1}")
    res = run(shell, "%%depin\nx = 1\ny = 2\nz = d['missing']\n")
    err = res.error_in_exec
    assert type(err) is KeyError and err.args == ("missing",)
    note = "\n".join(err.__notes__)
    assert 'line 3, in <module>' in note and "z = d['missing']" in note
    assert shell.user_ns["y"] == 2  # bindings made before the error stay, as they would locally
    assert run_ok(shell, "%%depin\nok = 1\nok") == 1


def test_exception_class_defined_in_the_cell(shell):
    res = run(shell, "%%depin\nclass Oops(Exception):\n    pass\nraise Oops('custom')")
    assert type(res.error_in_exec).__name__ == "Oops" and str(res.error_in_exec) == "custom"


def test_last_expression_display_and_figures_come_back_as_rich_output(shell):
    code = (
        "%%depin\n"
        "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
        "class Card:\n    def _repr_html_(self):\n        return '<b>card</b>'\n"
        "from IPython.display import display\n"
        "display(Card())\n"
        "fig, ax = plt.subplots()\nax.plot([1, 2, 3])\n"
        "Card()\n"
    )
    with capture_output() as cap:
        res = run(shell, code)
    assert res.success, res.error_in_exec
    kinds = [list(o.data) for o in cap.outputs]
    assert any("text/html" in k for k in kinds), kinds
    assert any("image/png" in k for k in kinds), kinds
    png = next(o.data["image/png"] for o in cap.outputs if "image/png" in o.data)
    import base64

    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
    assert type(res.result).__name__ == "Card"


def test_output_streams_live_while_the_cell_runs(shell, tmp_path):
    """The cell waits for a file that the notebook side creates only after it has seen 'ready'."""
    signal = tmp_path / "go"
    seen: list[str] = []

    class Watcher:
        def write(self, s):
            seen.append(s)
            if "ready" in "".join(seen):
                signal.touch()
            return len(s)

        def flush(self):
            pass

    shell.user_ns["signal_path"] = str(signal)
    old = sys.stdout
    sys.stdout = Watcher()
    try:
        res = run(shell, "%%depin --timeout 60\nimport os, time\nprint('ready', flush=True)\n"
                         "while not os.path.exists(signal_path):\n    time.sleep(0.05)\nprint('done')")
    finally:
        sys.stdout = old
    assert res.success, res.error_in_exec
    out = "".join(seen)
    assert out.index("ready") < out.index("done")


def test_stderr_streams_to_stderr(shell, capfd):
    run_ok(shell, "%%depin\nimport sys\nprint('to-err', file=sys.stderr)")
    assert "to-err" in capfd.readouterr().err


def test_reused_input_ships_no_bytes(shell, depin_session):
    run_ok(shell, "import numpy as np\nbig = np.ones(2**27, dtype=np.float64)")  # 1 GiB
    cache = depin_session.inputs
    sent0 = cache.total_sent
    run_ok(shell, "%%depin\ns1 = float(big.sum())")
    first = cache.total_sent - sent0
    assert first >= 2**30
    run_ok(shell, "%%depin\ns2 = float(big[::2].sum())")
    assert cache.total_sent - sent0 == first  # second use: nothing sent
    assert shell.user_ns["s1"] == 2**27 and shell.user_ns["s2"] == 2**26
    run_ok(shell, "big[0] = 5.0")  # changed locally: new content, sent again
    run_ok(shell, "%%depin\ns3 = float(big.sum())")
    assert cache.total_sent - sent0 >= 2 * first
    assert shell.user_ns["s3"] == 2**27 + 4
    run_ok(shell, "del big")


def test_in_place_mutation_reaches_local_objects_views_and_aliases(shell):
    run_ok(shell, "import numpy as np\nx = np.zeros(5)\nview = x[:2]\nalias = x\nL = [3, 1, 2]\nd = {}\n"
                  "rng = np.random.default_rng(7)\nrec = np.rec.array([(1, 2.0)], dtype=[('a', 'i4'), ('b', 'f8')])\n"
                  "m = np.matrix([[1, 2], [3, 4]])")
    run_ok(shell, "%%depin\nx[0] = 9\nL.sort()\nd['k'] = 'v'\ndraw = rng.random()\nrec.b[0] = 7.5\nm2 = m * 2\nB = L")
    ns = shell.user_ns
    assert ns["view"][0] == 9 and ns["alias"] is ns["x"] and ns["x"][0] == 9
    assert ns["L"] == [1, 2, 3] and ns["d"] == {"k": "v"}
    assert ns["B"] is ns["L"]  # an alias made in the cell stays an alias
    assert ns["draw"] == np.random.default_rng(7).random()
    assert ns["rng"].random() == _second_draw(7)  # the local generator advanced like a local run
    assert isinstance(ns["rec"], np.recarray) and ns["rec"].b[0] == 7.5
    assert isinstance(ns["m2"], np.matrix) and (ns["m2"] == np.matrix([[2, 4], [6, 8]])).all()


def _second_draw(seed):
    g = np.random.default_rng(seed)
    g.random()
    return g.random()


def test_same_namespace_and_stdout_as_a_plain_run(shell, capsys):
    cells = ["acc = []\nfor i in range(4):\n    acc.append(i * i)\nprint(sum(acc))",
             "import numpy as np\narr = np.linspace(0, 1, 5)\narr *= 2\nmean = arr.mean()\nprint(round(float(mean), 3))",
             "names = {'a': 1}\nnames.update(b=2)\nkeys = sorted(names)"]
    plain: dict = {}
    for c in cells:
        run_ok(shell, c)
    for k in ("acc", "i", "arr", "mean", "names", "keys"):
        plain[k] = shell.user_ns.pop(k)
    local_out = capsys.readouterr().out
    for c in cells:
        run_ok(shell, "%%depin\n" + c)
    remote_out = capsys.readouterr().out
    assert remote_out == local_out
    for k, v in plain.items():
        np.testing.assert_equal(shell.user_ns[k], v)


# ---------------------------------------------------------------- bad input: clear errors, kernel keeps working

def _assert_kernel_still_works(shell):
    assert run_ok(shell, "%%depin --no-cache\nalive = 1 + 1\nalive") == 2


@pytest.mark.parametrize("line, words", [
    ("--bogus", "--bogus"),
    ("--timeout abc", "--timeout"),
    ("--retries -1", "--retries"),
    ("--gpu x", "--gpu"),
    ("--cpu --gpu 1", "--cpu"),
    ("--inputs 1bad", "1bad"),
])
def test_bad_options_are_usage_errors_naming_the_option(shell, line, words):
    res = run(shell, f"%%depin {line}\nz = 1")
    err = res.error_in_exec or res.error_before_exec
    from IPython.core.error import UsageError

    assert isinstance(err, UsageError), err
    assert words in str(err)
    _assert_kernel_still_works(shell)


def test_undefined_name_is_a_name_error_before_anything_is_shipped(shell, depin_session):
    run_ok(shell, "import numpy as np\npresent = np.ones(1000)")
    sent = depin_session.inputs.total_sent
    res = run(shell, "%%depin\nq = present + not_defined_anywhere")
    assert isinstance(res.error_in_exec, NameError)
    assert "not_defined_anywhere" in str(res.error_in_exec)
    assert depin_session.inputs.total_sent == sent
    _assert_kernel_still_works(shell)


def test_unserializable_input_names_the_variable_and_type(shell):
    run_ok(shell, "import threading\nlock = threading.Lock()")
    res = run(shell, "%%depin\nwith lock:\n    pass")
    from depin_jupyter.errors import CellInputError

    assert isinstance(res.error_in_exec, CellInputError)
    assert "'lock'" in str(res.error_in_exec) and "lock" in str(res.error_in_exec).lower()
    assert "_thread" in str(res.error_in_exec)  # the type's module and name
    _assert_kernel_still_works(shell)


def test_unserializable_output_is_reported_and_others_still_bound(shell, capfd):
    run_ok(shell, "%%depin\nimport threading\nlk = threading.Lock()\nfine = 5")
    assert shell.user_ns["fine"] == 5 and "lk" not in shell.user_ns
    assert "'lk'" in capfd.readouterr().err


def test_unreachable_scheduler_names_the_address(shell, depin_session):
    import dask
    from conftest import free_port

    port = free_port()
    with dask.config.set({"depin.connect-timeout": "1s"}):
        res = run(shell, f"%depin connect tcp://127.0.0.1:{port}")
    err = res.error_in_exec
    from depin_jupyter.errors import ClusterConnectionError

    assert isinstance(err, ClusterConnectionError)
    assert f"127.0.0.1:{port}" in str(err) and "dask scheduler" in str(err)
    from depin_jupyter.kernel import cluster

    assert cluster.current_session() is depin_session  # a failed connect keeps the working session
    assert "Still connected to CPU LocalCluster" in str(err)  # ...and says so: cells keep running there
    _assert_kernel_still_works(shell)


def test_a_failed_connect_leaves_the_kernel_not_connected(shell, depin_session, capsys):
    """With no session to fall back on, the next cell must not quietly start a cluster on this machine."""
    import dask
    from conftest import free_port
    from IPython.core.error import UsageError

    from depin_jupyter.errors import ClusterConnectionError
    from depin_jupyter.kernel import cluster

    port = free_port()
    cluster._session = None  # keep the suite's cluster out of it
    try:
        with dask.config.set({"depin.connect-timeout": "1s"}):
            assert isinstance(run(shell, f"%depin connect tcp://127.0.0.1:{port}").error_in_exec, ClusterConnectionError)
        err = run(shell, "%%depin\nz = 1").error_in_exec
        assert isinstance(err, ClusterConnectionError) and cluster.current_session() is None  # nothing started
        assert f"%depin connect tcp://127.0.0.1:{port}` failed" in str(err) and "%depin connect local" in str(err)
        shell.run_line_magic("depin", "status")
        assert "not connected" in capsys.readouterr().out
        assert isinstance(run(shell, "%depin connect depin1-notatoken-at-all").error_in_exec, UsageError)
        err = run(shell, "%%depin\nz = 1").error_in_exec
        assert isinstance(err, ClusterConnectionError) and "depin1-notato... (a client token)" in str(err)
        assert "notatoken-at-all" not in str(err)  # a token is a secret: not repeated in full
    finally:
        cluster.close_session()  # forgets the failed connect
        cluster._session = depin_session
    _assert_kernel_still_works(shell)


def test_a_misspelt_setting_stops_the_cell_and_names_the_right_key(shell, monkeypatch, tmp_path):
    from IPython.core.error import UsageError

    from depin_jupyter import config

    marker = tmp_path / "ran"
    shell.user_ns["marker"] = str(marker)
    monkeypatch.setenv("DASK_DEPIN__STORE", str(tmp_path / "mine.zarr"))  # meant: DASK_DEPIN__STORE__URL
    monkeypatch.setattr(config, "_sources_checked", False)  # as in a kernel started with it
    res = run(shell, "%%depin\nopen(marker, 'w').write('x')")
    assert isinstance(res.error_in_exec, UsageError) and not marker.exists()
    assert f"DASK_DEPIN__STORE__URL={tmp_path / 'mine.zarr'}" in str(res.error_in_exec)
    monkeypatch.delenv("DASK_DEPIN__STORE")
    monkeypatch.setattr(config, "_sources_checked", False)
    _assert_kernel_still_works(shell)


def test_dead_worker_is_retried_then_explained(shell, tmp_path):
    marker = tmp_path / "died-once"
    shell.user_ns["marker"] = str(marker)
    kill_once = ("%%depin --retries 1\nimport os\nif not os.path.exists(marker):\n"
                 "    open(marker, 'w').close()\n    os._exit(1)\nsurvived = True")
    with capture_output() as cap:
        res = run(shell, kill_once)
    assert res.success, res.error_in_exec
    assert shell.user_ns["survived"] is True
    assert "retrying on another worker" in cap.stderr.lower()

    res = run(shell, "%%depin --retries 0\nimport os\nos._exit(1)")
    from depin_jupyter.errors import WorkerLostError

    assert isinstance(res.error_in_exec, WorkerLostError)
    assert "exited with status 1" in str(res.error_in_exec) and "--retries" in str(res.error_in_exec)
    _assert_kernel_still_works(shell)


def test_timeout_cancels_the_remote_cell(shell, tmp_path, depin_session):
    beat = tmp_path / "beat"
    shell.user_ns["beat"] = str(beat)
    res = run(shell, "%%depin --timeout 1\nimport time\nn = 0\nwhile True:\n    n += 1\n"
                     "    open(beat, 'w').write(str(n))\n    time.sleep(0.01)")
    from depin_jupyter.errors import CellTimeoutError

    assert isinstance(res.error_in_exec, CellTimeoutError)
    assert "timeout" in str(res.error_in_exec) and "cancelled" in str(res.error_in_exec)
    # The worker really stopped: the heartbeat file no longer changes.
    import time

    first = beat.read_text()
    time.sleep(0.5)
    assert beat.read_text() == first
    _assert_kernel_still_works(shell)


def test_gpu_cell_on_cpu_cluster_fails_clearly_or_falls_back(shell):
    from depin_jupyter.errors import NoSuitableWorkerError

    res = run(shell, "%%depin --gpu\ny = 1")
    assert isinstance(res.error_in_exec, NoSuitableWorkerError)
    assert "GPU" in str(res.error_in_exec) and "--cpu" in str(res.error_in_exec)
    import dask

    with dask.config.set({"depin.gpu-fallback": "cpu"}):
        with capture_output() as cap:
            run_ok(shell, "%%depin --gpu\nfrom depin_jupyter import xp\nmod = xp().__name__")
    assert shell.user_ns["mod"] == "numpy"
    assert "numpy" in cap.stderr


def test_unknown_worker_pin_lists_the_connected_workers(shell, depin_session):
    from depin_jupyter.errors import NoSuitableWorkerError

    res = run(shell, "%%depin --worker nosuch\ny = 1")
    assert isinstance(res.error_in_exec, NoSuitableWorkerError) and "nosuch" in str(res.error_in_exec)
    addr = sorted(depin_session.client.scheduler_info()["workers"])[0]
    run_ok(shell, f"%%depin --worker {addr}\nfrom distributed import get_worker\nwhere = get_worker().address")
    assert shell.user_ns["where"] == addr


def test_line_magic_status_config_and_close(ip, depin_session, capsys):
    from depin_jupyter.kernel import cluster

    saved = depin_session  # (not whatever an earlier test left: this one may run first)
    cluster._session = None
    try:
        ip.run_line_magic("depin", "status")
        assert "not connected" in capsys.readouterr().out
        ip.run_line_magic("depin", "config")
        assert "gpu-fallback" in capsys.readouterr().out
        ip.run_line_magic("depin", "close")
        assert "nothing to close" in capsys.readouterr().out
    finally:
        cluster._session = saved
    ip.run_line_magic("depin", "status")
    out = capsys.readouterr().out
    assert "LocalCluster" in out and "tcp://127.0.0.1" in out


def test_connect_to_a_scheduler_in_another_process(shell, depin_session, scheduler_process, capsys):
    from depin_jupyter.kernel import cluster

    cluster._session = None  # keep the suite's cluster: connect would close the session it replaces
    try:
        run_ok(shell, f"%depin connect {scheduler_process}")
        assert scheduler_process in capsys.readouterr().out
        cluster.current_session().client.wait_for_workers(1, timeout=30)
        run_ok(shell, "%%depin\nfrom distributed import get_worker\nwname = get_worker().name")
        assert shell.user_ns["wname"] == "external-0"
    finally:
        cluster.close_session()
        cluster._session = depin_session


@pytest.mark.gpu
def test_cupy_stays_on_the_gpu(shell):
    run_ok(shell, "import cupy as cp\ng = cp.arange(10, dtype=cp.float32)")
    run_ok(shell, "%%depin --gpu\ng2 = g * 2\non_device = type(g2).__module__")
    assert type(shell.user_ns["g2"]).__module__.startswith("cupy")
    assert shell.user_ns["on_device"].startswith("cupy")


@pytest.mark.gpu
def test_gpu_cell_energy_is_measured_by_nvml(shell, depin_session):
    """On a real GPU worker the board's power is sampled through NVML while the cell runs."""
    run_ok(shell, "%%depin --gpu\nimport cupy as cp\na = cp.random.default_rng(0).standard_normal((4096, 4096), "
                  "dtype=cp.float32)\nfor _ in range(200):\n    a = cp.tanh(a @ a / 4096.0)\ns = float(a.sum())")
    run_id, e = depin_session.last_energy
    assert e["source"].startswith("nvml") and e["gpu_energy_j"] > 0 and e["gpu_samples"] >= 2, e
    assert 0 < e["gpu_power_mean_w"] <= e["gpu_power_peak_w"] < 2000


def test_a_cell_whose_kernel_dies_is_stopped_on_the_worker(depin_session, tmp_path):
    """The client process goes away mid-cell: Dask releases the task and the worker stops the cell."""
    import subprocess
    import textwrap
    import time

    beat = tmp_path / "beat"
    script = textwrap.dedent(f"""
        import os, threading, time
        from depin_jupyter.kernel import cluster
        from depin_jupyter.kernel.runner import run_cell
        s = cluster.connect({depin_session.address!r})
        def die():
            while not os.path.exists({str(beat)!r}):
                time.sleep(0.02)
            os._exit(0)
        threading.Thread(target=die, daemon=True).start()
        run_cell(s, "import time\\nn = 0\\nwhile True:\\n    n += 1\\n    open(beat, 'w').write(str(n))\\n"
                    "    time.sleep(0.01)", {{"beat": {str(beat)!r}}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], timeout=120, capture_output=True, text=True)
    assert beat.exists(), proc.stderr[-2000:]
    time.sleep(2.0)  # the scheduler notices the client is gone and releases its task
    first = beat.read_text()
    time.sleep(0.5)
    assert beat.read_text() == first, "the cell kept running after its kernel died"


def test_gpu_memory_and_arch_requirements_without_such_gpu(shell):
    from depin_jupyter.errors import NoSuitableWorkerError

    res = run(shell, "%%depin --gpu-mem 1000\ny = 1")
    err = res.error_in_exec
    assert isinstance(err, NoSuitableWorkerError)
    assert "--gpu-mem" in str(err) and "1000" in str(err)
    res = run(shell, "%%depin --gpu-arch 9.0\ny = 1")
    assert isinstance(res.error_in_exec, NoSuitableWorkerError) and "--gpu-arch" in str(res.error_in_exec)
    res = run(shell, "%%depin --cpu --gpu-mem 8\ny = 1")
    from IPython.core.error import UsageError

    assert isinstance(res.error_in_exec, UsageError)
    _assert_kernel_still_works(shell)


def test_max_runtime_is_enforced_by_the_worker(shell):
    from depin_jupyter.errors import CellTimeoutError

    res = run(shell, "%%depin --max-runtime 1\nimport time\nwhile True:\n    time.sleep(0.01)")
    assert isinstance(res.error_in_exec, CellTimeoutError)
    assert "--max-runtime 1s" in str(res.error_in_exec)
    _assert_kernel_still_works(shell)


@pytest.mark.gpu
def test_gpu_memory_routing_on_a_gpu(shell, depin_session):
    from depin_jupyter.gpu import describe

    gpu = describe()
    have = gpu["memory"] / 2**30
    run_ok(shell, f"%%depin --gpu-mem {have * 0.5:.1f} --gpu-arch {gpu['arch']}\n"
                  "from distributed import get_worker\nwhere = get_worker().address")
    assert shell.user_ns["where"] in depin_session.client.scheduler_info()["workers"]
    res = run(shell, f"%%depin --gpu-mem {have * 4:.0f}\ny = 1")
    assert "no connected worker has a GPU" in str(res.error_in_exec)


def test_dask_collections_inside_a_cell_use_the_whole_cluster(shell, depin_session):
    code = (
        "%%depin\n"
        "import time\nimport dask\nimport dask.array as da\nimport numpy as np\n"
        "def where(i):\n    from distributed import get_worker\n    time.sleep(0.05)\n    return get_worker().address\n"
        "used = set(dask.compute(*[dask.delayed(where)(i) for i in range(40)]))\n"
        "arr = np.arange(1_000_000, dtype=np.float64).reshape(1000, 1000)\n"
        "total = float(da.from_array(arr, chunks=250).sum().compute())\n"
    )
    run_ok(shell, code)
    assert len(shell.user_ns["used"]) == 2  # both workers ran the cell's tasks
    assert shell.user_ns["total"] == float(np.arange(1_000_000, dtype=np.float64).sum())


def test_cluster_scheduler_outside_a_cell_does_what_dask_would():
    """A worker living in another program's process (LocalCluster(processes=False)) sets the process's dask
    scheduler to the cell's one; outside a cell, and with no client to use, that computes locally."""
    import threading

    import dask
    import dask.array as da

    from depin_jupyter.worker.in_cell import cluster_get

    out: dict = {}

    def compute() -> None:  # a fresh thread: no worker and no current client there
        from distributed.client import _current_client

        token = _current_client.set(None)
        try:
            with dask.config.set(scheduler=cluster_get), dask.config.set({"distributed.client": None}):
                out["v"] = float(da.arange(100, chunks=10).sum().compute())
        except Exception as e:
            out["e"] = e
        finally:
            _current_client.reset(token)

    t = threading.Thread(target=compute)
    t.start()
    t.join(60)
    assert out.get("v") == 4950.0, out


def test_a_cells_time_counts_its_routing_and_environment_check(shell, depin_session, monkeypatch):
    """The progress line's time is the whole cell's: it once started after the scheduler was asked where to run."""
    import time

    from depin_jupyter.kernel import runner

    real = runner.route

    def slow_route(session, options):
        time.sleep(0.4)  # a slow link to the scheduler
        return real(session, options)

    monkeypatch.setattr(runner, "route", slow_route)
    outcome = runner.run_cell(depin_session, "y = 1", {}, runner.RunOptions(no_store=True))
    assert outcome.timings["total"] >= 0.4
