"""End to end in a real browser: JupyterLab with the extension, a %%depin cell on the embedded CPU
cluster, the DePIN sidebar and status bar, and "Run cell on DePIN" on a plain cell."""

from __future__ import annotations

import json
import pathlib
import re
import time
from typing import Any

import pytest

from depin_jupyter.worker.energy import rapl_domains

ARTIFACTS = pathlib.Path(__file__).parent / "artifacts"
Lab = Any  # tests/ui/conftest.py: the running `jupyter lab` (url, token, root, api(), log_tail())

pytestmark = pytest.mark.slow

DEPIN_CELL = ('%%depin --name pi\nimport numpy as np\nxy = np.random.default_rng(0).random((200_000, 2))\n'
              'pi = 4 * ((xy ** 2).sum(axis=1) < 1).mean()\nimport time; time.sleep(1.5)\nprint("pi is about", pi)')
CELLS = [
    "%load_ext depin_jupyter",
    DEPIN_CELL,
    "round(pi, 2)",
    'answer = 6 * 7\nprint("answer =", answer)',  # a plain cell: "Run cell on DePIN" runs it on the cluster
]


def _notebook(cells: list[str]) -> dict[str, Any]:
    return {
        "cells": [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [],
                   "source": src} for i, src in enumerate(cells)],
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
        "nbformat": 4, "nbformat_minor": 5,
    }


def _wait_kernel_connected(lab: Lab, timeout: float = 60) -> None:
    """Toolbar 'idle' is not enough (RECIPES §3): wait until the server sees the page's websocket."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            kernels = lab.api("api/kernels")
        except OSError:  # jupyter_server answers 500 while a kernel is still starting (no last_activity)
            kernels = []
        if kernels and kernels[0]["execution_state"] == "idle" and kernels[0]["connections"] > 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"the notebook's kernel never connected: {lab.api('api/kernels')}")


def test_lab_sidebar_status_bar_and_run_on_depin(lab: Lab, page: Any) -> None:
    cells = CELLS
    (lab.root / "e2e.ipynb").write_text(json.dumps(_notebook(cells)))
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        _scenario(lab, page, cells)
    except BaseException:
        page.screenshot(path=str(ARTIFACTS / "failure.png"))
        print(f"--- jupyter lab log ---\n{lab.log_tail(80)}")
        raise


def _scenario(lab: Lab, page: Any, cells: list[str]) -> None:
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{lab.url}/lab/tree/e2e.ipynb?token={lab.token}")
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
    _wait_kernel_connected(lab)
    cell = page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell")
    output = page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell .jp-OutputArea")

    # Run every cell but the last with Shift+Enter (each run moves to the next cell).
    cell.nth(0).locator(".cm-content").click()
    for _ in cells[:-1]:
        page.keyboard.press("Shift+Enter")
    cell.nth(1).locator(".jp-OutputArea-output", has_text="pi is about 3.1").wait_for(timeout=90_000)
    cell.nth(2).locator(".jp-OutputArea-output", has_text="3.14").wait_for(timeout=30_000)
    progress_cell = cell.nth(1)
    done = progress_cell.locator(".depin-progress[data-stage='done']")
    done.wait_for(timeout=30_000)
    assert "done on" in done.inner_text()

    # The sidebar: connection, the worker of the embedded cluster, the run history beside the notebook.
    page.click(".lm-TabBar-tab[data-id='depin-panel']")
    panel = page.locator("#depin-panel")
    panel.locator(".depin-conn[data-state='connected']").wait_for(timeout=20_000)
    assert panel.locator(".depin-badge-this").is_visible()  # this notebook's kernel holds the connection
    assert "embedded local cluster" in panel.locator(".depin-conn").first.inner_text()
    panel.locator(".depin-worker").first.wait_for(timeout=10_000)
    assert panel.locator(".depin-worker").count() == 1
    assert panel.locator(".depin-worker-gpu").first.inner_text().strip()  # "CPU", or the GPU model
    assert panel.locator(".depin-workers-table th", has_text="Volunteer").count() == 0  # not a volunteer network
    # The %%depin run, stored by the kernel in depin-results.zarr beside the notebook, with its worker.
    run = panel.locator(".depin-run", has_text="pi")
    run.wait_for(timeout=10_000)
    assert run.locator(".depin-status-ok").is_visible() and run.locator(".depin-badge-sealed").is_visible()
    worker_name = panel.locator(".depin-worker-name b").first.inner_text()
    assert worker_name in run.locator(".depin-run-worker").inner_text()
    # Its energy as the worker measured it: CPU package joules where RAPL is readable, else "not measured"
    # with the reason and the whole summary (CPU seconds) in the tooltip.
    energy_cell = run.locator(".depin-run-energy")
    domains, why = rapl_domains()
    if domains:
        assert re.fullmatch(r"\d+\.\d+ (J|Wh)", energy_cell.inner_text()), energy_cell.inner_text()
        assert "(rapl)" in energy_cell.get_attribute("title")
    else:
        assert energy_cell.inner_text() == "not measured"
        title = energy_cell.get_attribute("title")
        assert title.startswith(f"energy not measured: {why}") and "; CPU " in title, title

    # The status bar item.
    status = page.locator(".depin-statusbar")
    page.wait_for_function(
        "document.querySelector('.depin-statusbar')?.textContent.includes('connected · 1 worker')",
        timeout=10_000)
    assert status.get_attribute("data-state") == "connected"

    # "Run cell on DePIN" on the plain last cell, by its keyboard shortcut.
    last = cell.nth(len(cells) - 1)
    last.locator(".cm-content").click()
    assert last.locator(".jp-cell-toolbar [data-command='depin:run-cell']").count() == 1  # cell toolbar button
    page.keyboard.press("Control+Shift+Enter")
    last.locator(".jp-OutputArea-output", has_text="answer = 42").wait_for(timeout=30_000)
    assert last.locator(".cm-content").inner_text().splitlines()[0] == "%%depin"

    # ... and it is in the command palette.
    page.keyboard.press("Control+Shift+C")
    page.keyboard.type("Run cell on DePIN")
    assert page.locator(".lm-CommandPalette-item", has_text="Run cell on DePIN").count() >= 1
    page.keyboard.press("Escape")

    # Verify re-hashes the stored bytes: both runs get the badge.
    panel.locator(".depin-verify").click()
    panel.locator(".depin-note-info", has_text="Verified: 2 runs").wait_for(timeout=20_000)
    assert panel.locator(".depin-run .depin-badge-verified").count() == 2

    # Reproduce re-executes this notebook's saved file in a fresh kernel and compares every %%depin run.
    run.locator(".depin-reproduce").click()
    run.locator(".depin-note-pending", has_text="reproducing").wait_for(timeout=5_000)
    run.locator(".depin-note-info", has_text="(pi): reproduced").wait_for(timeout=90_000)
    summary = panel.locator(".depin-reproduction[data-ok='true']")
    assert summary.locator(".depin-repro-headline").inner_text() == "REPRODUCED"
    summary.locator("summary").click()
    assert summary.locator(".depin-repro-cell[data-verdict='reproduced']").count() == 2  # pi and answer
    assert summary.locator(".depin-repro-var", has_text="pi").first.is_visible()
    # The fresh kernel's own connection (badged "reproducing" while it ran) is gone again.
    page.wait_for_function("document.querySelectorAll('#depin-panel .depin-conn').length === 1", timeout=15_000)
    assert summary.locator(".depin-repro-details").get_attribute("open") is not None  # stays open across polls
    page.screenshot(path=str(ARTIFACTS / "sidebar.png"))
    assert output.count() >= len(cells)

    # Disconnect from the panel: `%depin close` runs in this notebook's kernel; the panel shows its answer.
    panel.locator(".depin-disconnect").click()
    panel.locator(".depin-note-info", has_text="depin: closed").wait_for(timeout=20_000)
    panel.locator(".depin-conn[data-state='disconnected']").wait_for(timeout=10_000)
    assert status.inner_text() == "DePIN: not connected"
    assert not errors, errors  # no uncaught exception in the page
