"""The frontend's pure TypeScript logic (src/format.ts), tested with node's built-in test runner."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_frontend_logic_with_node() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (it is only needed to build the extension from source)")
    if not (ROOT / "lib" / "format.js").exists():
        pytest.fail("lib/format.js is missing: build the TypeScript first (`pip install -e .` or `jlpm build:lib`)")
    r = subprocess.run([node, "--no-warnings", "--test", str(ROOT / "tests" / "ui" / "frontend.test.mjs")],
                       check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "# fail 0" in r.stdout
