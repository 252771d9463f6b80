"""Every %%depin run lands in the Zarr result store with its manifest; an unchanged cell is a cache hit."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import run, run_ok
from IPython.utils.capture import capture_output

from depin_jupyter.store import open_store


@pytest.fixture
def store_url(tmp_path):
    return str(tmp_path / "results.zarr")


def test_run_is_stored_with_its_manifest(shell, store_url):
    run_ok(shell, "import numpy as np\nbase = np.arange(12.0).reshape(3, 4)\nk = 2")
    run_ok(shell, f"%%depin --store {store_url} --name scale\nscaled = base * k\nlabel = 'x2'\nfloat(scaled.sum())")
    store = open_store(store_url, create=False)
    [summary] = store.runs()
    assert summary.complete and summary.name == "scale"
    manifest = store.manifest(summary.run_id)
    assert "scaled = base * k" in manifest.code
    assert set(manifest.inputs) == {"base", "k"}
    assert {"scaled", "label"} <= set(manifest.outputs)
    assert manifest.worker["address"].startswith("tcp://127.0.0.1")
    assert manifest.worker["cpu"] and "gpu" in manifest.worker
    np.testing.assert_array_equal(store.load(summary.run_id, ["scaled"])["scaled"], np.arange(12.0).reshape(3, 4) * 2)
    assert store.verify().ok


def test_unchanged_cell_is_served_from_the_cache(shell, store_url, tmp_path):
    marker = tmp_path / "ran"
    shell.user_ns.update(marker=str(marker), data=np.linspace(0, 1, 1000))
    cell = (f"%%depin --store {store_url}\nopen(marker, 'a').write('x')\n"
            "smooth = np.convolve(data, np.ones(5) / 5, mode='same')\nn = len(smooth)\nn")
    run_ok(shell, "import numpy as np")
    assert run_ok(shell, cell) == 1000
    first = shell.user_ns["smooth"]
    with capture_output() as cap:
        value = run_ok(shell, cell)
    assert "cached (run" in cap.stdout
    assert marker.read_text() == "x"  # the cell did not run again
    assert value == 1000
    np.testing.assert_allclose(np.asarray(shell.user_ns["smooth"]), first)
    assert len(open_store(store_url, create=False).runs()) == 1

    run_ok(shell, cell.replace("--store", "--no-cache --store"))
    assert marker.read_text() == "xx"  # --no-cache recomputes
    shell.user_ns["data"] = np.linspace(0, 2, 1000)
    run_ok(shell, cell)
    assert marker.read_text() == "xxx"  # a changed input is a miss


def test_mutated_input_is_replayed_on_a_hit(shell, store_url):
    run_ok(shell, "L = [3, 1, 2]")
    run_ok(shell, f"%%depin --store {store_url}\nL.sort()\nm = max(L)")
    run_ok(shell, "L = [3, 1, 2]\nalias = L")
    with capture_output() as cap:
        run_ok(shell, f"%%depin --store {store_url}\nL.sort()\nm = max(L)")
    assert "cached" in cap.stdout
    assert shell.user_ns["L"] == [1, 2, 3] and shell.user_ns["alias"] is shell.user_ns["L"]


def test_no_store_records_nothing(shell, store_url):
    run_ok(shell, f"%%depin --no-store --store {store_url}\nz = 1")
    assert not os.path.exists(store_url) or not open_store(store_url, create=False).runs()


def test_unwritable_store_fails_before_any_compute(shell, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    marker = tmp_path / "ran"
    shell.user_ns["marker"] = str(marker)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root): permissions cannot make it read-only")
        res = run(shell, f"%%depin --store {ro}/r.zarr\nopen(marker, 'w').write('x')")
        assert "not writable" in str(res.error_in_exec) or "cannot create" in str(res.error_in_exec)
        assert not marker.exists()
    finally:
        os.chmod(ro, 0o700)


def test_store_path_that_is_a_file_fails_before_any_compute(shell, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    marker = tmp_path / "ran"
    shell.user_ns["marker"] = str(marker)
    res = run(shell, f"%%depin --store {blocker}/r.zarr\nopen(marker, 'w').write('x')")
    assert res.error_in_exec is not None and str(blocker) in str(res.error_in_exec)
    assert not marker.exists()
    assert run_ok(shell, "%%depin --no-cache\nok = 1\nok") == 1


def test_unportable_output_is_named_and_the_run_is_not_cached(shell, store_url, tmp_path):
    marker = tmp_path / "ran"
    shell.user_ns["marker"] = str(marker)
    cell = f"%%depin --store {store_url}\nopen(marker, 'a').write('x')\nclass Thing:\n    pass\nt = Thing()\nok = 1"
    with capture_output() as cap:
        run_ok(shell, cell)
    assert "t (__main__.Thing)" in cap.stderr and "allow-pickle" in cap.stderr
    run_ok(shell, cell)
    assert marker.read_text() == "xx"  # not served from the cache: the stored run lacks `t`


def test_load_binds_a_stored_run_lazily(shell, store_url):
    run_ok(shell, f"%%depin --store {store_url}\nimport numpy as np\nbig = np.ones((400, 300))\nsmall = 3")
    run_id = open_store(store_url, create=False).runs()[0].run_id
    run_ok(shell, "del big, small")
    run_ok(shell, f"%depin load {run_id} big --store {store_url}")
    assert "small" not in shell.user_ns
    big = shell.user_ns["big"]
    assert hasattr(big, "dask") and float(big.sum().compute()) == 120000.0  # lazy: a dask array
    res = run(shell, f"%depin load 20000101T000000.000000Z-dead --store {store_url}")
    assert res.error_in_exec is not None and "20000101T000000.000000Z-dead" in str(res.error_in_exec)


def test_runs_line_magic_lists_the_store(shell, store_url, capsys):
    run_ok(shell, f"%%depin --store {store_url} --name listed\nq = 5")
    shell.run_line_magic("depin", f"runs {store_url}")
    out = capsys.readouterr().out
    assert "listed" in out and "yes" in out


def test_dask_array_output_is_written_by_workers_and_bound_as_a_stored_view(shell, store_url):
    run_ok(shell, f"%%depin --store {store_url}\nimport dask.array as da\narr = da.ones((800, 600), chunks=(200, 300)) * 3")
    arr = shell.user_ns["arr"]
    keys = [str(k) for k in arr.__dask_graph__().keys()]
    # a view over the stored chunks, not the cell's graph (which would recompute ones * 3)
    assert not any("ones" in k or "mul" in k for k in keys), keys[:5]
    assert float(arr.sum().compute()) == 800 * 600 * 3
    store = open_store(store_url, create=False)
    rec = store.manifest(store.runs()[-1].run_id).outputs["arr"]
    assert tuple(rec.shape) == (800, 600)


def test_functions_imported_from_packages_do_not_spoil_the_cache(shell, store_url, tmp_path):
    marker = tmp_path / "ran"
    shell.user_ns["marker"] = str(marker)
    cell = (f"%%depin --store {store_url}\nopen(marker, 'a').write('x')\nfrom json import dumps\n"
            "from depin_jupyter import xp\ns = dumps([1])")
    run_ok(shell, cell)
    shell.user_ns.pop("dumps")
    with capture_output() as cap:
        run_ok(shell, cell)
    assert "cached" in cap.stdout and marker.read_text() == "x"
    import json

    assert shell.user_ns["dumps"] is json.dumps  # rebound by import on the hit


def test_a_cache_hit_replays_printed_output_displays_and_figures(shell, store_url):
    cell = (f"%%depin --store {store_url}\nimport matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
            "from IPython.display import display, HTML\nprint('hello from the run')\ndisplay(HTML('<b>bold</b>'))\n"
            "plt.figure()\nplt.plot([3, 1, 2])\nkept = 1")
    with capture_output() as first:
        run_ok(shell, cell)
    with capture_output() as again:
        run_ok(shell, cell)
    assert "cached (run" in again.stdout
    assert "hello from the run" in again.stdout
    bundles = lambda cap: [sorted(o.data) for o in cap.outputs]  # noqa: E731
    assert bundles(again) == bundles(first) and any("image/png" in b for b in bundles(again))
    assert [o.data.get("text/html") for o in again.outputs] == [o.data.get("text/html") for o in first.outputs]


def test_declared_files_are_part_of_the_cache_key(shell, store_url, tmp_path):
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n1,2\n")
    marker = tmp_path / "ran"
    shell.user_ns.update(marker=str(marker), csv_path=str(csv))
    cell = (f"%%depin --store {store_url} --deps {csv}\nopen(marker, 'a').write('x')\n"
            "rows = open(csv_path).read().splitlines()")
    run_ok(shell, cell)
    run_ok(shell, cell)
    assert marker.read_text() == "x"  # unchanged file: a hit
    os.utime(csv)
    run_ok(shell, cell)
    assert marker.read_text() == "x"  # touched, same content: still a hit
    csv.write_text("a,b\n1,2\n3,4\n")
    run_ok(shell, cell)
    assert marker.read_text() == "xx" and len(shell.user_ns["rows"]) == 3  # changed content: a miss
    res = run(shell, f"%%depin --store {store_url} --deps {tmp_path}/nosuch.csv\nz = 1")
    from IPython.core.error import UsageError

    assert isinstance(res.error_in_exec, UsageError) and "nosuch.csv" in str(res.error_in_exec)


def test_an_undeclared_file_the_cell_reads_is_named_once(shell, store_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "table.csv").write_text("1,2\n")
    cell = f"%%depin --store {store_url} --no-cache\nwith open('{tmp_path}/table.csv') as f:\n    text = f.read()"
    with capture_output() as cap:
        run_ok(shell, cell)
    assert "read table.csv; add --deps table.csv" in cap.stderr
    with capture_output() as cap:
        run_ok(shell, cell)
    assert "--deps" not in cap.stderr  # said once
    with capture_output() as cap:
        run_ok(shell, cell.replace("--no-cache", f"--no-cache --deps {tmp_path}/table.csv").replace("text", "t2"))
    assert "--deps" not in cap.stderr


@pytest.mark.parametrize("shape, chunks", [
    ((1000,), (333,)),                       # a short last block
    ((97, 53), (10, 7)),                     # many small blocks, ragged edges
    ((64, 64), ((30, 34), (20, 44))),        # irregular blocks: rechunked before writing
    ((20, 30, 40), (7, 11, 13)),
])
def test_dask_arrays_written_by_two_workers_read_back_exactly(depin_session, tmp_path, shape, chunks):
    import dask.array as da

    store = open_store(str(tmp_path / "p.zarr"))
    expected = np.random.default_rng(sum(shape)).random(shape)
    writer = store.begin_run(code="x", inputs={}, options={}, cache_key=None)
    writer.write_output("x", da.from_array(expected, chunks=chunks),
                        compute_kwargs={"scheduler": depin_session.client})
    writer.finish()
    got = store.load(writer.run_id, ["x"], lazy=False)["x"]
    np.testing.assert_array_equal(got, expected)
    assert store.verify().ok


def test_a_chunk_changed_between_write_and_seal_leaves_the_run_incomplete(depin_session, tmp_path):
    import dask.array as da

    from depin_jupyter.store import RunIncompleteError, StoreIntegrityError

    store = open_store(str(tmp_path / "c.zarr"))
    writer = store.begin_run(code="x", inputs={}, options={}, cache_key="k")
    writer.write_output("x", da.ones((100, 100), chunks=50), compute_kwargs={"scheduler": depin_session.client})
    chunk = next(p for p in (tmp_path / "c.zarr" / "runs" / writer.run_id / "x" / "c").rglob("*") if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))  # another writer stepped on it after the digest was taken
    with pytest.raises(StoreIntegrityError, match="changed between its write"):
        writer.finish()
    [summary] = store.runs()
    assert not summary.complete
    with pytest.raises(RunIncompleteError):
        store.load(writer.run_id)
    assert store.lookup_cache("k") is None


# ---------------------------------------------------------------- a hit binds what the fresh run bound


def test_a_cache_hit_binds_the_types_the_fresh_run_bound(shell, store_url):
    xr = pytest.importorskip("xarray")
    cell = (f"%%depin --store {store_url}\nimport numpy as np\nimport xarray as xr\nsq = np.arange(5) ** 2\n"
            "rec = np.rec.array([(1, 2.0)], dtype=[('a', 'i4'), ('b', 'f8')])\nmat = np.asmatrix(np.eye(2))\n"
            "field = xr.DataArray(np.ones((2, 3)), dims=('y', 'x'), name='field')\nsq")
    fresh = run_ok(shell, cell)
    first = {n: type(shell.user_ns[n]) for n in ("sq", "rec", "mat", "field")}
    with capture_output() as cap:
        again = run_ok(shell, cell)
    assert "cached (run" in cap.stdout and "lazily" not in cap.stdout
    assert type(again) is type(fresh) is np.ndarray and again.tolist() == fresh.tolist()  # Out, not dask
    assert {n: type(shell.user_ns[n]) for n in first} == first == {
        "sq": np.ndarray, "rec": np.recarray, "mat": np.matrix, "field": xr.DataArray}
    assert shell.user_ns["field"].chunks is None  # loaded, as the fresh run's was
    assert shell.user_ns["rec"].b[0] == 2.0


def test_outputs_above_lazy_bytes_are_bound_lazily_and_named(shell, store_url):
    import dask

    cell = f"%%depin --store {store_url}\nimport numpy as np\nbig = np.ones((256, 256))\nsmall = np.zeros(3)"
    run_ok(shell, cell)
    with dask.config.set({"depin.store.lazy-bytes": "64KiB"}), capture_output() as cap:
        run_ok(shell, cell)
    assert hasattr(shell.user_ns["big"], "dask") and type(shell.user_ns["small"]) is np.ndarray
    assert "bound lazily" in cap.stdout and "big (512.00 kiB)" in cap.stdout and "small" not in cap.stdout


def test_a_view_made_in_a_cell_is_a_view_again_on_a_hit(shell, store_url):
    run_ok(shell, "import numpy as np\nx2 = np.arange(12).reshape(3, 4)")
    cell = f"%%depin --store {store_url}\nx2_sub = x2[:2, :2]"
    run_ok(shell, cell)
    run_ok(shell, "x2 = np.arange(12).reshape(3, 4)")  # a new array, the same content: a hit
    with capture_output() as cap:
        run_ok(shell, cell)
    assert "cached (run" in cap.stdout
    run_ok(shell, "x2_sub[0, 0] = 99")
    assert shell.user_ns["x2"][0, 0] == 99
    store = open_store(store_url, create=False)
    stored = store.load(store.runs()[-1].run_id, ["x2_sub"], lazy=False)["x2_sub"]
    assert stored.tolist() == [[0, 1], [4, 5]]  # the store holds its values, for plain zarr readers


def test_a_seeded_generator_drawn_from_in_a_cell_is_stored_and_replayed(shell, store_url, tmp_path):
    marker = tmp_path / "ran"
    shell.user_ns["marker"] = str(marker)
    setup = "import numpy as np\nrng = np.random.default_rng(42)"
    cell = (f"%%depin --store {store_url}\nopen(marker, 'a').write('x')\nsample = rng.normal(size=3)\n"
            "legacy = np.random.RandomState(7)\nfirst = legacy.randint(100)\ng = np.random.Generator(np.random.MT19937(3))")
    run_ok(shell, setup)
    with capture_output() as cap:
        run_ok(shell, cell)
    assert "not portable" not in cap.stderr, cap.stderr
    fresh = {n: shell.user_ns[n] for n in ("sample", "legacy", "g")}
    after = shell.user_ns["rng"].random()
    run_ok(shell, setup)  # the same seed again: the same inputs, a hit
    with capture_output() as cap:
        run_ok(shell, cell)
    assert "cached (run" in cap.stdout and marker.read_text() == "x"
    ns = shell.user_ns
    np.testing.assert_array_equal(ns["sample"], fresh["sample"])
    assert ns["rng"].random() == after  # advanced by the hit as by the run
    assert type(ns["legacy"]) is np.random.RandomState and ns["legacy"].randint(100) == fresh["legacy"].randint(100)
    assert type(ns["g"].bit_generator) is np.random.MT19937 and ns["g"].random() == fresh["g"].random()
    run_id = open_store(store_url, create=False).runs()[-1].run_id
    run_ok(shell, f"del g\n%depin load {run_id} g --store {store_url}")
    assert type(shell.user_ns["g"]) is np.random.Generator  # restored as the same type by a load


def test_the_main_job_stores_every_output_portably(tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, DASK_DEPIN__STORE__URL=str(tmp_path / "demo.zarr"))
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "depin"), "demo"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "not portable" not in proc.stdout + proc.stderr
    assert "started CPU LocalCluster" in proc.stdout and "started" not in proc.stderr
    assert all(r.complete for r in open_store(str(tmp_path / "demo.zarr"), create=False).runs())
