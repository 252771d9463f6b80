"""Binder: what `binder/postBuild` installs works in a fresh environment.

A fresh virtual environment gets exactly what postBuild runs (`python -m pip install --no-cache-dir .`, the
script itself, run with the fresh environment first on PATH); then the JupyterLab extension must be listed
as enabled, and the quickstart notebook must execute in a kernel of that environment (its first cell is
`%load_ext depin_jupyter`; it uses the embedded CPU cluster, as on Binder). conda's part (environment.yml:
python 3.11 and node) is not rebuilt here: the extension ships prebuilt, so node is only needed when it is
not. Set DEPIN_SKIP_BINDER_TEST=1 to skip it (it takes about a minute, most of it pip).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from test_notebooks import SMALL

ROOT = pathlib.Path(__file__).parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600),
              pytest.mark.skipif(os.environ.get("DEPIN_SKIP_BINDER_TEST") == "1", reason="DEPIN_SKIP_BINDER_TEST=1")]

RUN_QUICKSTART = r"""
import json, pathlib, sys
import nbformat
from nbclient import NotebookClient
small = json.loads(sys.argv[2])
nb = nbformat.read(sys.argv[1], as_version=4)
assert any("%load_ext depin_jupyter" in c.source for c in nb.cells[:3])
for cell in nb.cells:  # small sizes, as tests/test_notebooks.py does
    if "parameters" in cell.get("metadata", {}).get("tags", []):
        cell.source = "\n".join(f"{ln.split('=')[0].strip()} = {small[ln.split('=')[0].strip()]}"
                                 if ln.split("=")[0].strip() in small else ln for ln in cell.source.splitlines())
NotebookClient(nb, timeout=300, kernel_name="python3",
               resources={"metadata": {"path": str(pathlib.Path(sys.argv[1]).parent)}}).execute()
out = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "")  # notes are on the progress line
              for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
import depin_jupyter
print(json.dumps({"module": depin_jupyter.__file__, "cached": "cached (run" in out}))
"""


def test_binder_postbuild_in_a_fresh_environment(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "JUPYTER_PATH")
           and not k.startswith("DASK_DEPIN")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv),
               JUPYTER_DATA_DIR=str(tmp_path / "jupyter-data"),  # no user kernelspec shadows the venv's
               JUPYTER_CONFIG_DIR=str(tmp_path / "jupyter-config"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    build = subprocess.run(["bash", str(ROOT / "binder" / "postBuild")], cwd=ROOT, env=env,
                           capture_output=True, check=False, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]

    ext = subprocess.run([str(venv / "bin" / "jupyter"), "labextension", "list"], env=env,
                         capture_output=True, check=False, text=True)
    listing = ext.stdout + ext.stderr
    line = next((ln for ln in listing.splitlines() if "depin-jupyter" in ln), "")
    assert "enabled" in line and "OK" in line, listing
    server = subprocess.run([str(venv / "bin" / "jupyter"), "server", "extension", "list"], env=env,
                            capture_output=True, text=True, check=False)
    assert "depin_jupyter" in server.stdout + server.stderr

    work = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", work)
    run = subprocess.run([str(venv / "bin" / "python"), "-c", RUN_QUICKSTART, str(work / "quickstart.ipynb"),
                          json.dumps(SMALL)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=400, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert str(venv) in result["module"], result  # the installed package, not the source tree
    assert result["cached"]
