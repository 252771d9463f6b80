"""`depin reproduce` cannot be fooled into reading the answers, keeps the author's code off the reviewer's files
with --sandbox, and judges floats by hardware class (bit-identical within one with --exact-same-class)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import nbformat
import numpy as np
import pytest
from test_reproduce import _notebook, published  # noqa: F401  (the fixture: a notebook run into a store)

from depin_jupyter.reproduce.publish import STORE_DIR, publish
from depin_jupyter.reproduce.rerun import reproduce
from depin_jupyter.store import open_store

DEPIN = os.path.join(os.path.dirname(sys.executable), "depin")
DOUBLE = "y = x * 2 + offset\ntotal = float(y.sum())"


def _fabricate(store):
    """The author's forgery: a run of the `double` cell's exact code whose y never came out of that code, written
    with depin's own API (so every digest and the ledger are in order)."""
    rs = open_store(str(store), create=False)
    honest = next(rs.manifest(s.run_id) for s in rs.runs() if s.name == "double")
    w = rs.begin_run(code=honest.code, inputs=dict(honest.inputs), options=dict(honest.options), cache_key=None,
                     name="double")
    w.write_output("total", 42000.0)
    w.write_output("y", np.full(1000, 42.0))
    w.finish(worker=dict(honest.worker), environment=dict(honest.environment))


def _add_cell(nb_path, source):
    nb = nbformat.read(nb_path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(source))
    nbformat.write(nb, nb_path)
    return len(nb.cells) - 1


def _reproduce_cli(*args):
    proc = subprocess.run([DEPIN, "reproduce", *map(str, args)], capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


COPY_RELATIVE = ("import os, shutil\nscratch = os.environ['DASK_DEPIN__STORE__URL']\n"
                 "shutil.rmtree(scratch, ignore_errors=True)\nshutil.copytree('results.zarr', scratch)\n")


def test_a_cell_that_copies_the_published_store_is_refused_before_anything_runs(published, author, tmp_path):  # noqa: F811
    nb_path, store = published
    _fabricate(store)
    index = _add_cell(nb_path, COPY_RELATIVE)  # innocent-looking: "refresh the local copy of the results"
    publish(str(nb_path), str(store), str(tmp_path / "bundle"))
    rc, out = _reproduce_cli(tmp_path / "bundle")
    assert rc == 1 and "NOT REPRODUCED" in out
    assert f"cell {index}: names the published store ('results.zarr')" in out and "nothing was executed" in out


def _search_and_copy(root):
    # No store name in the code: the path is found at run time, as an attacker guessing the download location would.
    return ("import glob, os, shutil\nname = 'results' + '.zarr'\n"
            f"found = sorted(glob.glob({str(root)!r} + '/**/' + name, recursive=True))\n"
            "scratch = os.environ['DASK_DEPIN__STORE__URL']\n"
            "if found:\n    shutil.rmtree(scratch, ignore_errors=True)\n    shutil.copytree(found[0], scratch)\n")


@pytest.fixture
def forged_bundle(published, author, tmp_path):  # noqa: F811
    """A bundle with a fabricated published value and a cell that finds the published store at run time and
    copies it over the reviewer's scratch store."""
    nb_path, store = published
    _fabricate(store)
    index = _add_cell(nb_path, _search_and_copy(tmp_path))
    publish(str(nb_path), str(store), str(tmp_path / "bundle"))
    return tmp_path / "bundle", index


def test_a_cell_that_finds_the_published_store_at_run_time_is_stopped_and_named(forged_bundle):
    bundle, index = forged_bundle
    rc, out = _reproduce_cli(bundle)
    assert rc == 1 and "NOT REPRODUCED" in out
    assert f"cell {index}: opened the published store while the notebook was re-executed (refused by the guard)" in out


@pytest.mark.skipif(not shutil.which("bwrap"), reason="bubblewrap is not installed (without it the store is "
                    "there, and the guard stops the cell: the test above)")
def test_in_the_sandbox_the_published_store_is_not_even_there(forged_bundle):
    bundle, _ = forged_bundle
    rc, out = _reproduce_cli(bundle, "--sandbox")
    assert rc == 1 and "NOT REPRODUCED" in out
    assert "cell 2 (double): differs" in out  # the honest re-computation, against the fabricated value
    assert "re-executed: bubblewrap" in out or "re-executed: child process" in out


def test_a_run_written_into_the_scratch_store_by_another_cell_is_caught(published):  # noqa: F811
    nb_path, store = published
    _fabricate(store)
    _add_cell(nb_path, "import os\nimport numpy as np\nfrom depin_jupyter.store import open_store\n"
                       "w = open_store(os.environ['DASK_DEPIN__STORE__URL']).begin_run(\n"
                       f"    code={DOUBLE!r}, inputs={{}}, options={{}}, cache_key=None, name='double')\n"
                       "w.write_output('total', 42000.0)\nw.write_output('y', np.full(1000, 42.0))\nw.finish()\n")
    report = reproduce(str(nb_path), str(store))
    assert not report.ok and "was not made by any %%depin cell while it ran: another cell wrote it" in report.error


@pytest.fixture
def canary_notebook(published, tmp_path, monkeypatch):  # noqa: F811
    """The published notebook plus a cell that tries to write into the reviewer's files and to read a secret."""
    nb_path, store = published
    canary = tmp_path / "reviewer" / "notes.txt"
    canary.parent.mkdir()
    canary.write_text("the reviewer's notes\n")
    monkeypatch.setenv("REVIEWER_TOKEN", "s3cr3t")
    _add_cell(nb_path, f"import os\ntry:\n    with open({str(canary)!r}, 'a') as f:\n"
                       "        f.write(f\"touched, token={os.environ.get('REVIEWER_TOKEN')}\\n\")\n"
                       "except OSError:\n    pass\n")
    return nb_path, store, canary


def test_without_the_sandbox_the_notebook_runs_with_the_reviewers_rights(canary_notebook):
    nb_path, store, canary = canary_notebook
    report = reproduce(str(nb_path), str(store))
    assert report.ok and report.isolation["mode"] == "plain"
    assert "touched, token=s3cr3t" in canary.read_text()  # the control: what --sandbox is for


@pytest.mark.skipif(not shutil.which("bwrap"), reason="bubblewrap is not installed")
def test_in_bubblewrap_the_notebook_cannot_touch_the_reviewers_files_or_secrets(canary_notebook):
    nb_path, store, canary = canary_notebook
    report = reproduce(str(nb_path), str(store), sandbox="bubblewrap")
    assert report.ok, report.format()
    assert report.isolation["mode"] == "bubblewrap"
    assert canary.read_text() == "the reviewer's notes\n"


def test_a_child_sandbox_without_bubblewrap_still_keeps_the_reviewers_environment(canary_notebook):
    nb_path, store, canary = canary_notebook
    report = reproduce(str(nb_path), str(store), sandbox="child")
    assert report.ok and report.isolation["mode"] == "child process"
    assert "token=None" in canary.read_text() and "s3cr3t" not in canary.read_text()
    assert any("user rights" in line for line in report.isolation["not_protected"])  # said plainly


def test_one_hardware_class_demands_bit_identical_values_and_another_a_tolerance(published, tmp_path):  # noqa: F811
    nb_path, store = published
    nb = nbformat.read(nb_path, as_version=4)  # the same code, inputs that differ in their last bits
    nb.cells[1].source = "import numpy as np\nx = np.linspace(0, 1, 1000) * (1 + 1e-14)\noffset = 0.0"
    nbformat.write(nb, nb_path)
    loose = reproduce(str(nb_path), str(store))
    double = loose.cells[0]
    assert loose.ok, loose.format()
    assert double.variables["y"]["verdict"] == "within tolerance" and double.same_class
    for side in (double.published_hardware, double.reproduced_hardware):
        assert side["cpu"] and side["python"] and "numpy" in side["libraries"] and "numpy=" in side["class"]
    strict = reproduce(str(nb_path), str(store), exact_same_class=True)
    assert not strict.ok and strict.cells[0].verdict == "differs"
    assert "bit-identical required: both runs are of one hardware class" in strict.cells[0].detail
    assert strict.cells[1].verdict == "reproduced"  # integers and strings: identical anyway

    # The same published runs as recorded by a worker of another hardware class: a tolerance again.
    src, other = open_store(str(store), create=False), open_store(str(tmp_path / "other.zarr"))
    for s in [s for s in src.runs() if s.complete]:
        m = src.manifest(s.run_id)
        w = other.begin_run(code=m.code, inputs=dict(m.inputs), options=dict(m.options), cache_key=None, name=m.name)
        for k, v in src.load(s.run_id, lazy=False).items():
            w.write_output(k, v)
        w.finish(worker={**m.worker, "cpu": "Imaginary CPU 9000"}, environment=dict(m.environment))
    across = reproduce(str(nb_path), str(tmp_path / "other.zarr"), exact_same_class=True)
    assert across.ok and across.cells[0].same_class is False
    assert "CPU Imaginary CPU 9000" in across.cells[0].published_hardware["class"]
    assert "(another hardware class)" in across.format() and "within rtol" in across.cells[0].comparison


def test_a_bundle_ships_its_declared_files_and_the_re_execution_reads_only_those(published, author, tmp_path):  # noqa: F811
    nb_path, store = published
    (nb_path.parent / "scale.txt").write_text("3\n")
    (nb_path.parent / "private-notes.txt").write_text("not shipped\n")
    nb = nbformat.read(nb_path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("%%depin --name scaled --deps scale.txt\n"
                                              "k = float(open('scale.txt').read())\nz = x * k"))
    nbformat.write(nb, nb_path)
    from nbclient import NotebookClient

    os.environ["DASK_DEPIN__STORE__URL"], saved = str(store), os.environ.get("DASK_DEPIN__STORE__URL")
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(nb_path.parent)}}
                       ).execute()
    finally:
        os.environ["DASK_DEPIN__STORE__URL"] = saved or ""
    publish(str(nb_path), str(store), str(tmp_path / "bundle"))
    assert (tmp_path / "bundle" / "scale.txt").read_text() == "3\n"
    assert not (tmp_path / "bundle" / "private-notes.txt").exists() and (tmp_path / "bundle" / STORE_DIR).is_dir()
    rc, out = _reproduce_cli(tmp_path / "bundle")
    assert rc == 0 and "cell 4 (scaled): reproduced" in out, out
