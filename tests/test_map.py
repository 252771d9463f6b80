"""`depin_jupyter.map`: one function over many items in batches, on the embedded cluster and on a volunteer
network of real `depin scheduler`/`depin worker` processes; results read back with plain zarr."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest
import zarr
from conftest import free_port
from volunteer_net import Network, wait_for_workers

from depin_jupyter.errors import DepinUsageError, RemoteExecutionError
from depin_jupyter.kernel import cluster
from depin_jupyter.kernel.mapping import map_items
from depin_jupyter.kernel.records import RunOptions

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("no_store")]


def _notebook_function(source: str, name: str):
    """A function as a notebook defines it (module __main__: it travels by value)."""
    ns: dict = {"__name__": "__main__", "np": np}
    exec(source, ns)
    return ns[name]


SQUARE = _notebook_function("def square(x):\n    if x == 13:\n        raise ValueError('unlucky 13')\n"
                            "    return np.float64(x) ** 2\n", "square")


def test_a_map_on_the_embedded_cluster_streams_into_zarr_and_names_failed_items(depin_session, tmp_path):
    out = str(tmp_path / "squares.zarr")
    handle = map_items(depin_session, SQUARE, range(200), name="squares", retries=1, out=out)
    assert handle.finished.is_set() and handle.n_done == 199
    assert handle.errors == {13: "ValueError: unlucky 13"} and handle.attempts[13] == 2  # retried once
    assert handle.results[12] == 144.0 and handle.results[13] is None
    with pytest.raises(RuntimeError, match="1 of 200 item.*item 13: ValueError: unlucky 13"):
        handle.result()
    group = zarr.open_group(out, mode="r")  # plain zarr, nothing of depin
    values, done = group["values"][:], group["done"][:]
    expected = np.arange(200, dtype=np.float64) ** 2
    assert done.sum() == 199 and not done[13]
    assert np.array_equal(values[done], expected[done])
    assert group.attrs["depin_map"] == "squares" and group.attrs["items"] == 200


def _cell_function(source: str, name: str, cell: str):
    """A function defined in a notebook cell: its source is where IPython keeps it (linecache), so
    `inspect.getsource` finds it as it does in Jupyter."""
    import linecache

    linecache.cache[cell] = (len(source), None, source.splitlines(True), cell)
    ns: dict = {"__name__": "__main__", "np": np}
    exec(compile(source, cell, "exec"), ns)
    return ns[name]


def test_a_finished_map_is_one_run_in_the_provenance_store(depin_session, tmp_path):
    from depin_jupyter.store import open_store

    cube = _cell_function("def cube(x):\n    if x == 7:\n        raise ValueError('no sevens')\n"
                          "    return np.float64(x) ** 3\n", "cube", "<ipython-input-7-cube>")
    url = str(tmp_path / "store")
    handle = map_items(depin_session, cube, range(30), name="cubes", retries=0, batch=4,
                       options=RunOptions(store=url))
    assert handle.run_id is not None
    store = open_store(url)
    manifest = store.manifest(handle.run_id)
    assert manifest.name == "map cubes" and manifest.status == "error"  # one item failed
    assert "raise ValueError('no sevens')" in manifest.code and "depin_f(depin_x)" in manifest.code
    assert set(manifest.inputs) == {"depin_f", "depin_items"}
    assert manifest.extra["map"]["done"] == 29 and manifest.extra["map"]["failed"] == 1
    out = store.load(handle.run_id, lazy=False)
    done, values = np.asarray(out["done"]), np.asarray(out["values"])
    assert done.sum() == 29 and not done[7]
    assert np.array_equal(values[done], (np.arange(30, dtype=np.float64) ** 3)[done])
    assert out["errors"] == {"7": "ValueError: no sevens"}
    report = store.verify()  # chained into the ledger and digested like any cell's run
    assert report.ok and report.runs_checked == 1, report.problems
    # The same map over other items is another run with other input digests.
    again = map_items(depin_session, cube, range(1, 4), name="cubes", options=RunOptions(store=url))
    assert again.result() == [1.0, 8.0, 27.0]
    other = store.manifest(again.run_id)
    assert other.status == "ok" and other.inputs["depin_items"] != manifest.inputs["depin_items"]
    assert other.inputs["depin_f"] == manifest.inputs["depin_f"]
    assert map_items(depin_session, cube, range(3)).run_id is None  # the store is off here (no_store)


def test_a_map_of_non_numbers_keeps_them_in_the_handle_and_a_bad_function_is_refused(depin_session):
    label = _notebook_function("def label(x):\n    return {'n': x, 'name': f'item-{x}'}\n", "label")
    handle = map_items(depin_session, label, range(10), batch=3)
    assert handle.result() == [{"n": i, "name": f"item-{i}"} for i in range(10)]
    with pytest.raises(DepinUsageError, match="not callable"):
        map_items(depin_session, [1, 2], range(3))


def test_cancel_stops_the_batches_already_running_and_keeps_what_was_done(depin_session):
    from depin_jupyter.kernel.jobs import list_jobs

    # Short sleeps: the cancelled cell's thread stops between two (one long C call would have its worker
    # process restarted, and the next test would find the cluster restarting).
    nap = _notebook_function("def nap(x):\n    import time\n    if x >= 4:\n        for _ in range(1200):\n"
                             "            time.sleep(0.1)\n    return x\n", "nap")
    handle = map_items(depin_session, nap, range(8), name="naps", batch=1, retries=0, wait_done=False)
    deadline = time.monotonic() + 60
    while handle.n_done < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    while not [j for j in list_jobs(depin_session.client) if j.map_name == "naps"] and time.monotonic() < deadline:
        time.sleep(0.05)  # the sleepers are listed once their submission is registered
    assert handle.n_done == 4, handle.status()  # four done, the sleepers queued or running
    assert handle.cancel() >= 1
    assert handle.finished.wait(60), handle.status()  # the running ones were stopped, not waited for
    assert handle.results[:4] == [0, 1, 2, 3] and handle.n_done == 4
    assert set(handle.errors) == {4, 5, 6, 7} and all("cancelled" in e for e in handle.errors.values())
    assert not [j for j in list_jobs(depin_session.client) if j.map_name == "naps"]
    assert map_items(depin_session, nap, range(3), name="after").result(timeout=60) == [0, 1, 2]  # usable


def test_jobs_name_a_maps_batches_and_show_its_progress():
    from depin_jupyter.kernel.jobs import Job, format_jobs

    now = time.time()
    jobs = [Job("r1", "sq[0]", "ann@h", "k1", now, "running", "tls://w:1"),
            Job("r2", "sq[1]", "ann@h", "k2", now, "queued", None),
            Job("r3", "sq[2]", "ann@h", "k3", now, "finished", None),
            Job("r4", "cell", "ann@h", "k4", now, "running", "tls://w:2")]
    assert [j.map_name for j in jobs] == ["sq", "sq", "sq", None]
    assert jobs[0].matches("sq") and jobs[0].matches("r1") and not jobs[3].matches("sq")
    assert not jobs[3].matches(None) and not jobs[0].matches("")  # --all/--mine pass no target
    text = format_jobs(jobs)
    assert "map sq (ann@h): 3 batch(es) here: 1 running, 1 waiting, 1 ended" in text
    assert "depin cancel sq" in text and text.count("\nmap ") == 1


# ------------------------------------------------------------------ the cell form: %%depin --map NAME=ITEMS

def test_the_cell_form_runs_the_body_per_item_and_binds_lists_in_item_order(shell):
    from conftest import run, run_ok

    run_ok(shell, "offset = 100\nimport numpy as np")
    run_ok(shell, "%%depin --map seed=range(30) --name seeds\n"
                  "rng = np.random.default_rng(seed)\ndraw = float(rng.random())\nshifted = seed + offset\n")
    assert shell.user_ns["shifted"] == [i + 100 for i in range(30)]
    assert shell.user_ns["draw"] == [float(np.random.default_rng(i).random()) for i in range(30)]
    assert "seed" not in shell.user_ns and "rng" in shell.user_ns and len(shell.user_ns["rng"]) == 30

    res = run(shell, "%%depin --map \"x=[1, 0, 4]\"\ny = 12 // x\n")  # one item fails past its retries
    assert not res.success and isinstance(res.error_in_exec, RemoteExecutionError)
    assert "1 of 3 item(s) failed after their retries, e.g. item 1 (0): ZeroDivisionError" in str(res.error_in_exec)
    assert shell.user_ns["y"] == [12, None, 3]  # the others are usable
    assert run_ok(shell, "len(y)") == 3  # the kernel goes on


def test_the_cell_form_stores_each_name_it_binds_as_one_array(shell, tmp_path, capsys):
    from conftest import run_ok

    from depin_jupyter.store import open_store

    url = str(tmp_path / "store")
    run_ok(shell, "import numpy as np")
    run_ok(shell, f"%%depin --map x=range(6) --name rows --store {url}\n"
                  f"y = x * 2\nrow = np.full(3, x)\ndone = x > 2\n")  # `done`: the map's own mask moves aside
    printed = capsys.readouterr().out
    (summary,) = open_store(url).runs()
    assert f"stored as run {summary.run_id}" in printed and summary.name == "map rows" and summary.complete
    got = open_store(url).load(summary.run_id, lazy=False)
    assert np.array_equal(got["y"], np.arange(6) * 2) and bool(np.all(got["depin_done"]))
    assert np.array_equal(got["done"], np.arange(6) > 2)
    assert np.array_equal(got["row"], np.repeat(np.arange(6), 3).reshape(6, 3))


@pytest.mark.parametrize(("line", "message"), [
    ("--map x", "--map expects NAME=ITEMS"),
    ("--map 1x=range(3)", "--map expects NAME=ITEMS"),
    ("--map x=undefined_name", "could not evaluate 'undefined_name' to a list of items (NameError"),
    ("--map x=range(3) --background", "--map runs in the foreground"),
])
def test_the_cell_form_refuses_bad_lines_with_the_fix(shell, line, message):
    from conftest import run

    res = run(shell, f"%%depin {line}\ny = x\n")
    assert not res.success and message in str(res.error_in_exec or res.error_before_exec)
    res = run(shell, "%%depin --map x=range(3)\nprint(x)\n")
    assert not res.success and "the cell binds no name" in str(res.error_in_exec)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    n = Network(tmp_path_factory.mktemp("map-net"), free_port())
    n.start_scheduler()
    yield n
    n.close()


def test_a_map_over_two_volunteers_survives_one_killed_mid_map(net, tmp_path):
    slow = _notebook_function("def slow(x):\n    import time\n    time.sleep(0.02)\n    return np.float64(x) * 3\n",
                              "slow")
    w1, _ = net.start_worker(net.token("worker", "map-v1"))
    w2, _ = net.start_worker(net.token("worker", "map-v2"))
    session = cluster._connect_token(net.token("client", "map-sci"))
    out = str(tmp_path / "triples.zarr")
    try:
        wait_for_workers(session, 2)
        handle = map_items(session, slow, range(200), name="triples", batch=10, out=out,
                           options=RunOptions(replicas=1), wait_done=False)
        deadline = time.monotonic() + 120
        while handle.n_done < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert handle.n_done >= 40, handle.status()
        w2.send_signal(signal.SIGKILL)  # its in-flight batch is re-run elsewhere; nothing else is lost
        assert handle.result(timeout=240) == [3.0 * i for i in range(200)]
        assert handle.workers  # who ran them: volunteers
    finally:
        session.close()
        w1.terminate()
        w1.wait(60)
    group = zarr.open_group(out, mode="r")
    assert group["done"][:].all() and np.array_equal(group["values"][:], np.arange(200) * 3.0)


def test_the_cell_form_on_a_volunteer_network_runs_sandboxed_and_binds_lists(net, ip):
    from conftest import run_ok

    w, _ = net.start_worker(net.token("worker", "map-cell-v1"))
    session = cluster._connect_token(net.token("client", "map-cell-sci"))
    before, saved = set(ip.user_ns), cluster._session
    cluster._session = session
    try:
        wait_for_workers(session, 1)
        run_ok(ip, "scale = 2.5")
        run_ok(ip, "%%depin --map k=range(12) --replicas 1\nimport os\nv = k * scale\nwho = os.getuid()\n")
        assert ip.user_ns["v"] == [k * 2.5 for k in range(12)]
        assert len(set(ip.user_ns["who"])) == 1  # every item ran in the volunteer's sandbox, as one user
        assert "os" not in ip.user_ns  # a module the body imports stays on the volunteer
    finally:
        cluster._session = saved
        for name in set(ip.user_ns) - before:
            ip.user_ns.pop(name, None)
        session.close()
        w.terminate()
        w.wait(60)


# ------------------------------------------------------------------ background cells on a volunteer network

def test_a_background_cell_on_a_volunteer_network_binds_later_and_outlives_its_kernel(net):
    from depin_jupyter.kernel import background
    from depin_jupyter.protocol.rpc import Coordinator

    w, _ = net.start_worker(net.token("worker", "bg-v1"))
    token = net.token("client", "bg-sci")
    session = cluster._connect_token(token)
    try:
        wait_for_workers(session, 1)
        ns: dict = {"a": 20}
        run = background.submit(session, "import time\ntime.sleep(0.5)\nb = a + 1\nprint('half way')\n", ns,
                                RunOptions(replicas=1, no_store=True, name="bgv"))
        assert "b" not in ns  # returned at once
        background.wait(session, ns, "bgv", timeout=120)
        assert ns["b"] == 21 and run.bound and run.error is None
        # A second one, left running while its kernel's connection goes away: the coordinator keeps it.
        background.submit(session, "import time\ntime.sleep(4)\nc = 1\n", {}, RunOptions(replicas=1, no_store=True,
                                                                                         name="left"))
        session.close()
        again = cluster._connect_token(token)  # the same identity, from a new kernel
        try:
            names = {j["name"] for j in Coordinator.of_client(again.client).jobs()}
            assert "left" in names  # still queued or running: not cancelled with the old connection
            later: dict = {}
            background.wait(again, later, "left", timeout=120)  # the new kernel binds what the old one left
            assert later["c"] == 1
            with pytest.raises(DepinUsageError, match="no background run named 'gone'"):
                background.wait(again, later, "gone", timeout=5)
        finally:
            again.close()
    finally:
        w.terminate()
        w.wait(60)


# ------------------------------------------------------------------ a map outlives its kernel

_KERNEL = """\
import sys, time
from depin_jupyter.kernel import cluster
from depin_jupyter.kernel.mapping import map_items
from depin_jupyter.kernel.records import RunOptions

def slow(x):
    import time
    time.sleep(0.05)
    return x * 3.0

session = cluster._connect_token(sys.argv[1])
deadline = time.monotonic() + 60
while len(session.workers(max_age=0)) < 2 and time.monotonic() < deadline:
    time.sleep(0.2)
handle = map_items(session, slow, range(200), name="killed", batch=10, retries=0,
                   options=RunOptions(replicas=1), wait_done=False)
while handle.n_done < 30:
    time.sleep(0.05)
print("mid-map", handle.n_done, flush=True)
time.sleep(600)
"""


def test_a_map_survives_a_sigkilled_kernel_process_and_a_sigkilled_volunteer(net, tmp_path, ip):
    """Acceptance: the kernel process (a real one, SIGKILLed: no goodbye) and one of the two volunteers die
    mid-map; a new kernel of the same identity gets all 200 items by name (`%depin wait NAME`)."""
    import subprocess
    import sys

    from conftest import run_ok
    from volunteer_net import _env, wait_for_text

    w1, _ = net.start_worker(net.token("worker", "sigkill-v1"))
    w2, _ = net.start_worker(net.token("worker", "sigkill-v2"))
    token = net.token("client", "sigkill-sci")
    log = tmp_path / "kernel.log"
    kernel = subprocess.Popen([sys.executable, "-c", _KERNEL, token], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                              env=_env({"DASK_DEPIN__STORE__ENABLED": "False"}))
    try:
        wait_for_text(log, "mid-map", kernel, timeout=180)
        kernel.send_signal(signal.SIGKILL)
        w2.send_signal(signal.SIGKILL)  # its batch in flight is run again on the other volunteer
        kernel.wait(10)
        again = cluster._connect_token(token)
        saved, cluster._session = cluster._session, again
        try:
            run_ok(ip, "%depin wait killed")  # no background run of that name: the map is attached
            got = ip.user_ns.pop("killed")
            assert got.n == 200 and got.n_done == 200 and not got.errors, got.status()
            assert got.results == [i * 3.0 for i in range(200)]
            with pytest.raises(Exception, match="no background run named 'killed'.*nor is there a map"):
                run_ok(ip, "%depin wait killed")  # attached once: released on the coordinator
        finally:
            cluster._session = saved
            again.close()
    finally:
        if kernel.poll() is None:
            kernel.kill()
        w1.terminate()
        w1.wait(60)

def test_a_map_outlives_its_kernel_and_a_new_one_attaches_by_name(net):
    from depin_jupyter.kernel.mapping import attach
    from depin_jupyter.protocol.rpc import Coordinator

    slow = _notebook_function("def slow(x):\n    import time\n    time.sleep(0.05)\n    return x * 3.0\n", "slow")
    ws = [net.start_worker(net.token("worker", f"outlive-v{i}"), wait=False)[0] for i in range(2)]
    token = net.token("client", "outlive-sci")
    session = cluster._connect_token(token)
    try:
        wait_for_workers(session, 2)
        handle = map_items(session, slow, range(200), name="outlive", batch=10, retries=0, wait_done=False)
        deadline = time.monotonic() + 120
        while handle.n_done < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 30 <= handle.n_done < 200, handle.status()  # mid-map, some results already in this kernel
        session.close()  # the kernel goes, as a killed one's connection does (nothing cancels the map)
        thief = cluster._connect_token(net.token("client", "outlive-thief"))
        try:  # another identity neither sees the map nor can make the coordinator drop it
            with pytest.raises(DepinUsageError, match="no map named 'outlive'"):
                attach(thief, "outlive", timeout=5)
            assert Coordinator.of_client(thief.client).release_cells([f"outlive[{i}]" for i in range(20)]) == 0
        finally:
            thief.close()
        again = cluster._connect_token(token)
        try:
            got = attach(again, "outlive", timeout=120)
            assert got.n == 200 and got.n_done == 200 and not got.errors, got.status()
            assert got.results == [i * 3.0 for i in range(200)]
            with pytest.raises(DepinUsageError, match="no map named 'outlive'"):
                attach(again, "outlive", timeout=5)  # released once attached: nothing left behind
            with pytest.raises(DepinUsageError, match="no map named 'never'"):
                attach(again, "never", timeout=5)
        finally:
            again.close()
    finally:
        for w in ws:
            w.terminate()
            w.wait(60)


def test_cancelling_a_map_on_a_volunteer_network_stops_its_batches_on_the_coordinator(net):
    from depin_jupyter.protocol.rpc import Coordinator

    nap = _notebook_function("def nap(x):\n    import time\n    time.sleep(120)\n    return x\n", "nap")
    w, _ = net.start_worker(net.token("worker", "cancel-v1"))
    session = cluster._connect_token(net.token("client", "cancel-sci"))
    try:
        wait_for_workers(session, 1)
        handle = map_items(session, nap, range(12), name="naps", batch=2, retries=0,
                           options=RunOptions(replicas=1), wait_done=False)
        coordinator = Coordinator.of_client(session.client)
        deadline = time.monotonic() + 60
        while not any(j["state"] == "running" for j in coordinator.jobs()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert handle.cancel() >= 1
        assert handle.finished.wait(60), handle.status()  # stopped on the volunteer, not waited for
        assert len(handle.errors) == 12 and all("cancelled" in e for e in handle.errors.values())
        left = [j for j in coordinator.jobs() if j["state"] in ("queued", "pending", "running")]
        assert not left, left
    finally:
        session.close()
        w.terminate()
        w.wait(60)
