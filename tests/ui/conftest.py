"""Browser fixtures: a real `jupyter lab` on a free port with a token, and Playwright driving Debian's
chromium (Playwright's own browser download is unreachable here; see RECIPES §3)."""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

CHROMIUM = os.environ.get("DEPIN_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = pathlib.Path(__file__).parent / "artifacts"


@dataclass
class Lab:
    url: str
    token: str
    root: pathlib.Path
    log: pathlib.Path

    def api(self, path: str) -> Any:
        req = urllib.request.Request(f"{self.url}/{path}", headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def lab(tmp_path_factory: Any) -> Iterator[Lab]:
    """`jupyter lab` with a token, its own settings/workspace/runtime dirs, serving a temp root."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no browser at {CHROMIUM}: `apt-get install chromium` (as .ci/run does)")
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "root"
    root.mkdir()
    settings = tmp / "settings"
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    # No "get notified about Jupyter news?" toast over the page (and in the screenshot).
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false"}))
    port, token = _free_port(), secrets.token_hex(16)
    # The suite's DASK_DEPIN__STORE__URL is dropped: the kernel stores runs beside the notebook, as a
    # user's would, and the panel reads them there.
    env = {k: v for k, v in os.environ.items() if k != "DASK_DEPIN__STORE__URL"}
    env.update(
        JUPYTERLAB_SETTINGS_DIR=str(settings),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"),
        # Kernels publish their cluster connection here; only this lab's kernels are seen.
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
        DASK_DEPIN__LOCAL_CLUSTER__N_WORKERS="1",
        # Another cluster on this machine may hold port 8787: its fallback warning is noise here.
        PYTHONWARNINGS="ignore:Port 8787 is already in use:UserWarning",
    )
    log = tmp / "lab.log"
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=root)
    server = Lab(f"http://127.0.0.1:{port}", token, root, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited ({proc.returncode}):\n{server.log_tail()}")
            try:
                server.api("api/status")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not answer within 60 s:\n{server.log_tail()}")
                time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def page() -> Iterator[Any]:
    """A chromium page (function-scoped: pytest-jupyter's loop fixtures must not outlive it)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            yield browser.new_page(viewport={"width": 1440, "height": 900})
        finally:
            browser.close()
