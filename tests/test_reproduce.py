"""`depin reproduce`: a published notebook is re-executed and judged cell by cell, variable by variable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from depin_jupyter.reproduce.rerun import reproduce


def _notebook(path, offset="0.0", second_cell="y = x * 2 + offset\ntotal = float(y.sum())"):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell("%load_ext depin_jupyter"),
        nbformat.v4.new_code_cell(f"import numpy as np\nx = np.linspace(0, 1, 1000)\noffset = {offset}"),
        nbformat.v4.new_code_cell("%%depin --name double\n" + second_cell),
        nbformat.v4.new_code_cell("%%depin --name count\nn = int((x > 0.5).sum())\nlabel = 'half'"),
    ]
    nbformat.write(nb, path)
    return path


@pytest.fixture
def published(tmp_path, monkeypatch):
    """A notebook executed once, its runs in a store beside it: what a reviewer receives."""
    nb_path = _notebook(tmp_path / "paper.ipynb")
    store = tmp_path / "published.zarr"
    monkeypatch.setenv("DASK_DEPIN__STORE__URL", str(store))
    nb = nbformat.read(nb_path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    monkeypatch.delenv("DASK_DEPIN__STORE__URL")
    return nb_path, store


def test_an_unchanged_notebook_reproduces(published, tmp_path):
    nb_path, store = published
    report_file = tmp_path / "report.json"
    depin = os.path.join(os.path.dirname(sys.executable), "depin")
    proc = subprocess.run([depin, "reproduce", str(nb_path),
                           "--store", str(store), "--report", str(report_file)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "REPRODUCED" in proc.stdout
    report = json.loads(report_file.read_text())
    assert report["ok"] and [c["verdict"] for c in report["cells"]] == ["reproduced", "reproduced"]
    assert report["cells"][0]["variables"]["y"]["verdict"] == "identical"


def test_changed_numbers_code_and_failures_are_named(published):
    nb_path, store = published
    _notebook(nb_path, offset="1e-3")  # same code, an input that changed: the values differ
    report = reproduce(str(nb_path), str(store))
    assert not report.ok
    double = report.cells[0]
    assert double.verdict == "differs" and double.variables["y"]["verdict"] == "differs"
    assert "max abs error 0.001" in double.variables["y"]["detail"]
    assert report.cells[1].verdict == "reproduced"

    _notebook(nb_path, second_cell="y = x * 3\ntotal = float(y.sum())")
    assert reproduce(str(nb_path), str(store)).cells[0].verdict == "code changed"


def test_a_cell_that_now_raises_is_failed(published, monkeypatch):
    nb_path, store = published
    nb = nbformat.read(nb_path, as_version=4)
    nb.cells[1].source = "import numpy as np\nx = 'not an array'\noffset = 0.0"  # same %%depin code, it fails now
    nbformat.write(nb, nb_path)
    report = reproduce(str(nb_path), str(store))
    assert report.cells[0].verdict == "failed" and "TypeError" in report.cells[0].detail


def test_a_tampered_store_stops_before_re_execution(published):
    nb_path, store = published
    chunk = next(p for p in store.rglob("*") if p.is_file() and "/c/" in str(p) and "runs" in str(p))
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0xFF
    chunk.write_bytes(bytes(data))
    report = reproduce(str(nb_path), str(store))
    assert not report.verified and "does not verify" in report.error and not report.cells


def test_report_matches_its_schema_and_renders_as_html(published, shell):
    import jsonschema

    from depin_jupyter.reproduce.rerun import REPORT_SCHEMA

    nb_path, store = published
    report = shell.run_line_magic("depin", f"reproduce {nb_path} --store {store}")
    with open(REPORT_SCHEMA) as f:
        jsonschema.validate(json.loads(json.dumps(report.to_json(), default=str)), json.load(f))
    html = report._repr_html_()
    assert "REPRODUCED" in html and "double" in html and "identical" in html
