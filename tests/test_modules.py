"""The notebook's own modules travel to workers whose working directory is elsewhere."""

from __future__ import annotations

import os
import sys

import pytest
from conftest import run_ok

from depin_jupyter.kernel.modules import bundle_local_modules
from depin_jupyter.protocol.bundles import is_local


@pytest.fixture
def notebook_dir(tmp_path, monkeypatch):
    nb = tmp_path / "nb"
    (nb / "mylib" / "inner").mkdir(parents=True)
    (nb / "helpers.py").write_text("import mylib\n\ndef value():\n    return 1\n")
    (nb / "mylib" / "__init__.py").write_text("from .core import base\n")
    (nb / "mylib" / "core.py").write_text("def base():\n    return 10\n")
    (nb / "mylib" / "inner" / "__init__.py").write_text("")
    (nb / "mylib" / "inner" / "deep.py").write_text("from ..core import base\n\ndef deep():\n    return base() * 100\n")
    monkeypatch.chdir(nb)
    monkeypatch.syspath_prepend(str(nb))
    yield nb
    for name in [m for m in sys.modules if m.split(".")[0] in ("helpers", "mylib")]:
        del sys.modules[name]


def test_local_installed_and_stdlib_modules_are_told_apart(notebook_dir):
    assert is_local("helpers") and is_local("mylib")
    assert not is_local("numpy") and not is_local("json") and not is_local("depin_jupyter")
    bundle = bundle_local_modules(["helpers", "numpy"])
    assert bundle.names == ("helpers", "mylib")  # mylib comes along: helpers imports it
    assert set(bundle.files) == {"helpers.py", "mylib/__init__.py", "mylib/core.py",
                                 "mylib/inner/__init__.py", "mylib/inner/deep.py"}
    assert bundle_local_modules(["helpers"]).key == bundle.key  # same content, same key
    os.utime(notebook_dir / "helpers.py")  # touched, not changed
    assert bundle_local_modules(["helpers"]).key == bundle.key


def test_cell_imports_notebook_modules_on_a_worker(shell, notebook_dir, depin_session):
    worker_cwds = set(depin_session.client.run(os.getcwd).values())
    assert str(notebook_dir) not in worker_cwds  # the workers really run elsewhere
    run_ok(shell, "%%depin\nimport helpers\nfrom mylib.inner.deep import deep\n"
                  "r = helpers.value() + deep()\nwhere = helpers.__file__")
    assert shell.user_ns["r"] == 1001
    assert not shell.user_ns["where"].startswith(str(notebook_dir))  # the shipped copy ran
    sent = depin_session.inputs.total_sent
    run_ok(shell, "%%depin\nimport helpers\nr = helpers.value()")
    assert depin_session.inputs.total_sent == sent  # same source: not sent again

    (notebook_dir / "helpers.py").write_text("import mylib\n\ndef value():\n    return 2\n")
    run_ok(shell, "%%depin\nimport helpers\nr = helpers.value()")
    assert shell.user_ns["r"] == 2  # an edited file is picked up on the next run


def test_objects_from_notebook_modules_travel_as_inputs(shell, notebook_dir):
    run_ok(shell, "from helpers import value\nfrom mylib.core import base")
    run_ok(shell, "%%depin\ntotal = value() + base()")
    assert shell.user_ns["total"] == 11
