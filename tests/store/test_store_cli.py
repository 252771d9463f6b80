"""`depin runs / show / verify` through click's CliRunner and as a real `depin` process."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from depin_jupyter.cli import main


@pytest.fixture
def populated(store, write_run, small_chunks):
    """A store with two complete runs and one incomplete run: (store, [complete ids], incomplete id)."""
    a = write_run(store, {"x": np.arange(600.0), "note": "hello"}, name="first")
    b = write_run(store, {"y": np.ones((10, 10))}, name="second", cache_key="k")
    w = store.begin_run(code="z = 1", inputs={}, options={}, cache_key=None, name="third")
    return store, [a, b], w.run_id


def test_runs_lists_complete_and_incomplete(populated):
    store, (a, b), c = populated
    res = CliRunner().invoke(main, ["runs", store.url])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split() == ["RUN", "NAME", "STATUS", "COMPLETE", "OUTPUTS", "CREATED"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows[a][1:5] == ["first", "ok", "yes", "note,x"]
    assert rows[b][1:5] == ["second", "ok", "yes", "y"]
    assert rows[c][1:5] == ["third", "incomplete", "no", "-"]


def test_show_prints_the_manifest(populated):
    store, (a, _), c = populated
    res = CliRunner().invoke(main, ["show", a, "--store", store.url])
    assert res.exit_code == 0, res.output
    doc = yaml.safe_load(res.output)
    assert doc["run_id"] == a and doc["outputs"]["x"]["shape"] == [600]
    assert doc["outputs"]["x"]["chunk_digests"].startswith("<5 chunk digests")
    res = CliRunner().invoke(main, ["show", a[:-4], "--store", store.url, "--format", "json", "--full"])
    assert json.loads(res.output) == store.manifest(a).to_json()
    res = CliRunner().invoke(main, ["show", c, "--store", store.url])
    assert res.exit_code == 1 and "incomplete" in res.output
    res = CliRunner().invoke(main, ["show", "20200101T000000.000000Z-ffff", "--store", store.url])
    assert res.exit_code == 2 and "no run" in res.output


def test_verify_exit_codes_and_names(populated):
    store, (a, _), c = populated
    res = CliRunner().invoke(main, ["verify", store.url])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[-1] == "OK" and f"incomplete {c} (incomplete)" in res.output
    chunk = sorted(glob.glob(os.path.join(store.url, "runs", a, "x", "c", "*")))[1]
    with open(chunk, "r+b") as f:
        f.write(b"\x00\x01")
    res = CliRunner().invoke(main, ["verify", store.url])
    assert res.exit_code == 1
    assert f"MISMATCH run {a} / output x / chunk c/1: chunk bytes differ" in res.output
    res = CliRunner().invoke(main, ["verify", os.path.join(store.url, "nope")])
    assert res.exit_code == 2 and "no depin store" in res.output


def test_depin_verify_as_a_real_process(populated):
    store, (_, b), _ = populated
    depin = os.path.join(os.path.dirname(sys.executable), "depin")
    ok = subprocess.run([depin, "verify", store.url], check=False, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[-1] == "OK"
    manifest = os.path.join(store.url, "runs", b, "zarr.json")
    with open(manifest) as f:
        text = f.read()
    with open(manifest, "w") as f:
        f.write(text.replace('"name": "second"', '"name": "edited"'))
    bad = subprocess.run([depin, "verify", store.url], check=False, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert f"MISMATCH run {b}: manifest (zarr.json) does not match ledger entry 2" in bad.stderr
    assert "FAILED: 1 problem(s)" in bad.stdout
