"""POST depin/reproduce end to end: a real notebook and its store, re-executed in a fresh kernel."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import nbformat
import pytest
from tornado.httpclient import HTTPClientError

pytestmark = pytest.mark.timeout(240)


def _notebook(path: Any) -> Any:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell("%load_ext depin_jupyter"),
        nbformat.v4.new_code_cell("import numpy as np\nx = np.linspace(0, 1, 1000)"),
        nbformat.v4.new_code_cell("%%depin --name double\ny = x * 2\ntotal = float(y.sum())"),
    ]
    nbformat.write(nb, path)
    return path


async def _execute(path: Any, store: Any, monkeypatch: Any) -> None:
    """Run the notebook once as its author did: its %%depin runs go to ``store`` beside it."""
    from nbclient import NotebookClient

    monkeypatch.setenv("DASK_DEPIN__STORE__URL", str(store))
    try:
        nb = nbformat.read(path, as_version=4)
        await NotebookClient(nb, timeout=120, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).async_execute()
    finally:
        monkeypatch.delenv("DASK_DEPIN__STORE__URL")


async def test_a_notebook_reproduces_from_the_panel_route(jp_fetch: Any, jp_root_dir: Any,
                                                          monkeypatch: Any) -> None:
    (jp_root_dir / "paper").mkdir()
    nb_path = _notebook(jp_root_dir / "paper" / "paper.ipynb")
    await _execute(nb_path, jp_root_dir / "paper" / "depin-results.zarr", monkeypatch)

    # No store given: depin-results.zarr beside the notebook, as the kernel stored it.
    r = await jp_fetch("depin", "reproduce", method="POST", body=json.dumps({"notebook": "paper/paper.ipynb"}))
    assert r.code == 202
    job = json.loads(r.body)
    assert job["state"] == "running" and job["notebook"] == "paper/paper.ipynb"
    assert job["store"].endswith("paper/depin-results.zarr")
    again = await jp_fetch("depin", "reproduce", method="POST", body=json.dumps({"notebook": "paper/paper.ipynb"}))
    assert json.loads(again.body)["job"] == job["job"]  # one job per notebook at a time

    deadline = time.monotonic() + 180
    while (state := json.loads((await jp_fetch("depin", "reproduce", job["job"])).body))["state"] == "running":
        assert time.monotonic() < deadline, "reproduce did not finish within 180 s"
        await asyncio.sleep(0.5)
    assert state["state"] == "done", state.get("error")
    report = state["report"]
    assert report["ok"] is True and report["verified"] is True
    (cell,) = report["cells"]
    assert cell["name"] == "double" and cell["verdict"] == "reproduced"
    assert {v["verdict"] for v in cell["variables"].values()} == {"identical"}

    # A finished job does not block the next one.
    r = await jp_fetch("depin", "reproduce", method="POST", body=json.dumps({"notebook": "paper/paper.ipynb"}))
    assert json.loads(r.body)["job"] != job["job"]
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch("depin", "reproduce", "no-such-job")
    assert err.value.code == 404
