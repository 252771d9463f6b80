"""Environments are checked before a cell runs: a different numpy minor version on a worker is refused."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import free_port, run, run_ok

from depin_jupyter.errors import EnvironmentMismatchError
from depin_jupyter.kernel.envcheck import Mismatch, compare, local_version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compare_major_minor_and_missing():
    local = {"numpy": "2.4.6", "dask": "2026.7.1", "onlyhere": None}
    remote = {"tcp://a:1": {"numpy": "2.4.1", "dask": "2026.7.0"},
              "tcp://b:2": {"numpy": "2.3.5", "dask": None}}
    assert compare(local, remote) == [Mismatch("numpy", "2.4.6", "2.3.5", "tcp://b:2"),
                                      Mismatch("dask", "2026.7.1", None, "tcp://b:2")]
    assert "2.3.5 on worker tcp://b:2" in str(compare(local, remote)[0])
    assert "not installed on worker" in str(compare(local, remote)[1])


def test_local_versions():
    assert local_version("numpy") == np.__version__
    assert local_version("json") is None  # stdlib: never compared


@pytest.fixture(scope="module")
def old_numpy_venv(tmp_path_factory):
    """A venv whose numpy is one minor version older, seeing everything else from the test venv."""
    major, minor = (int(x) for x in np.__version__.split(".")[:2])
    if minor == 0:
        pytest.skip("no older minor version of numpy to compare with")
    venv = tmp_path_factory.mktemp("oldnp") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    target = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    # The test venv's packages (and this repo) come after the new venv's own site-packages.
    with open(os.path.join(target, "zz_parent.pth"), "w") as f:
        f.write("\n".join([*site.getsitepackages(), REPO]) + "\n")
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--only-binary=:all:",
                          "--target", target, f"numpy=={major}.{minor - 1}.*"], capture_output=True, text=True)
    if pip.returncode != 0:
        pytest.skip(f"cannot download an older numpy here: {pip.stderr.strip()[-300:]}")
    return py


def test_worker_with_older_numpy_is_refused(shell, depin_session, old_numpy_venv):
    from depin_jupyter.kernel import cluster

    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    time.sleep(1.0)
    procs.append(subprocess.Popen([str(old_numpy_venv), "-m", "distributed.cli.dask_worker", addr,
                                   "--nthreads", "1", "--no-dashboard", "--name", "old-numpy"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    cluster._session = None  # keep the suite's cluster open
    try:
        run_ok(shell, f"%depin connect {addr}")
        cluster.current_session().client.wait_for_workers(1, timeout=60)
        remote_np = cluster.current_session().client.run(lambda: __import__("numpy").__version__)
        assert list(remote_np.values())[0] != np.__version__
        res = run(shell, "%%depin\nimport numpy as np\nx = np.ones(3).sum()")
        err = res.error_in_exec
        assert isinstance(err, EnvironmentMismatchError), err
        assert "numpy" in str(err) and np.__version__ in str(err) and list(remote_np.values())[0] in str(err)
        assert list(remote_np)[0] in str(err)  # the worker's own address
        import dask

        with dask.config.set({"depin.env-check": "warn"}):
            assert run_ok(shell, "%%depin\nimport numpy as np\nfloat(np.ones(3).sum())") == 3.0
    finally:
        cluster.close_session()
        cluster._session = depin_session
        for p in procs[::-1]:
            p.terminate()
            p.wait(10)
    assert run_ok(shell, "%%depin\nok = 1\nok") == 1


def test_a_cell_right_after_its_workers_died_is_not_refused_as_missing_packages(shell, depin_session):
    """Workers that died since the kernel last listed them cannot say what they have: that is not "not
    installed" (a cell importing matplotlib was refused right after both workers restarted)."""
    from conftest import run, run_ok

    for name in ("0", "1"):  # both embedded workers die (their nannies start new ones)
        res = run(shell, f"%%depin --worker {name} --retries 0\nimport os\nos._exit(1)")
        assert not res.success
    assert run_ok(shell, "%%depin\nimport matplotlib\nv = matplotlib.__version__\nv") == \
        __import__("matplotlib").__version__
