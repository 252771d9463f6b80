"""benchmarks/gpu_proof.sh, the one-run GPU proof (issue #23): its plumbing, proven without a GPU.

The GPU run itself happens on a GPU machine; these keep the script from rotting in between: the step
runner's limits and clean-up, the pass/fail/skipped rules, the summary, and a dry run of the cheap steps
through the bash entry point.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_proof.sh"

_spec = importlib.util.spec_from_file_location("gpu_proof", ROOT / "benchmarks" / "gpu_proof.py")
gp = importlib.util.module_from_spec(_spec)
sys.modules["gpu_proof"] = gp  # dataclasses look their module up
_spec.loader.exec_module(gp)


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_a_step_past_its_limit_is_stopped_with_its_children(tmp_path):
    pidfile = tmp_path / "child.pid"
    t0 = time.monotonic()
    run = gp.run_step(["bash", "-c", f"sleep 300 & echo $! > {pidfile}; wait"], 1.0, tmp_path / "s.log")
    assert run.timed_out and run.rc != 0
    assert time.monotonic() - t0 < 15
    assert _gone(int(pidfile.read_text()))
    assert "time limit 1s" in (tmp_path / "s.log").read_text()


def test_a_step_that_exits_reports_its_status_and_leaves_nothing_running(tmp_path):
    pidfile = tmp_path / "child.pid"
    run = gp.run_step(["bash", "-c", f"sleep 300 & echo $! > {pidfile}; echo hello; exit 3"], 30,
                      tmp_path / "s.log")
    assert not run.timed_out and run.rc == 3
    assert "hello" in (tmp_path / "s.log").read_text()
    assert _gone(int(pidfile.read_text()))


def _run(rc: int = 0, timed_out: bool = False):
    return gp.StepRun(rc=rc, duration_s=1.0, timed_out=timed_out)


def _checks(*oks):
    return {"checks": [{"name": f"c{i}", "ok": ok, "detail": "why"} for i, ok in enumerate(oks)]}


@pytest.mark.parametrize("run, result, dry, status", [
    (_run(), _checks(True, True), False, "pass"),
    (_run(), _checks(True, None), True, gp.SKIPPED),      # a dry run: GPU checks are skipped, not failed
    (_run(), _checks(True, None), False, "fail"),         # a GPU run: a skipped check fails the proof
    (_run(), _checks(True, False, None), True, "fail"),   # a failed check fails a dry run too
    (_run(1), _checks(True), False, "fail"),              # a crashed driver fails even with good checks
    (_run(0, timed_out=True), _checks(True), True, "fail"),
    (_run(), _checks(), True, "fail"),                    # nothing checked proves nothing
    (_run(), None, True, "fail"),
])
def test_judge(run, result, dry, status):
    assert gp.judge(run, result, dry, 10)[0] == status


def test_the_summary_holds_only_when_every_step_does(tmp_path):
    gpu = gp.Summary(tmp_path / "s.json", dry=False, budget_s=540)
    assert not gpu.ok  # no step yet
    gpu.add({"name": "a", "status": "pass"})
    assert gpu.ok
    gpu.add({"name": "b", "status": gp.SKIPPED})
    assert not gpu.ok
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["ok"] is False and doc["mode"] == "gpu" and doc["skipped_no_gpu"] == ["b"]
    dry = gp.Summary(tmp_path / "d.json", dry=True, budget_s=540)
    dry.add({"name": "b", "status": gp.SKIPPED})
    assert dry.ok
    dry.add({"name": "c", "status": "fail"})
    assert not dry.ok and json.loads((tmp_path / "d.json").read_text())["failed"] == ["c"]


def test_the_gpu_run_fits_one_device_command():
    """The device runs one command for at most 600 s: the limits must sum below the budget, and it below that."""
    assert sum(s.timeout_gpu for s in gp.STEPS) <= gp.DEFAULT_BUDGET < 600
    assert {s.name for s in gp.STEPS} == {"install", *gp.DRIVERS}


def test_other_users_can_read_only_what_is_open_to_them(tmp_path):
    shut = tmp_path / "shut"
    (shut / "inner").mkdir(parents=True)
    (shut / "inner").chmod(0o755)
    shut.chmod(0o700)
    assert not gp._readable_by_others(shut / "inner")  # a folder above it is closed
    assert gp._readable_by_others(Path("/usr/bin/env"))


def test_the_script_header_states_the_limits_it_runs_with():
    head = SCRIPT.read_text()
    for step in gp.STEPS:
        assert re.search(rf"#   {re.escape(step.name)}\s+{step.timeout_gpu} s ", head), step.name
    assert f"sum to {sum(s.timeout_gpu for s in gp.STEPS)} s" in head
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_requirements_for_the_device_image_and_for_a_full_install():
    pins = [r for r in gp.requirements("full") if r.startswith("dask[")]
    image = gp.requirements("image")
    assert pins and pins[0] in image  # the same dask pin as the project's
    assert not any(r.split(">")[0].split("[")[0] in ("jupyterlab", "jupyter_server") for r in image)
    assert {"dask-cuda", "ipykernel>=6", "nbclient", "hatchling>=1.5"} <= set(image)
    full = gp.requirements("full")
    assert "dask-cuda[cu12]" in full and "cupy-cuda12x[ctk]" in full


def _has_gpu() -> bool:
    from depin_jupyter.gpu import detect

    return detect()[0] > 0


def _proof(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict, str]:
    out = tmp_path / "out"
    p = subprocess.run(["bash", str(SCRIPT), "--install", "none", "--venv", sys.prefix, "--out", str(out),
                        "--work", str(tmp_path / "work"), *args], check=False, capture_output=True, text=True,
                       timeout=240, env={**os.environ, "DEPIN_GPU_PROOF_PYTHON": sys.executable, **(env or {})})
    return p.returncode, json.loads((out / "summary.json").read_text()), p.stdout + p.stderr


@pytest.mark.slow
@pytest.mark.skipif(_has_gpu(), reason="the dry run is for a machine without a GPU")
def test_a_dry_run_through_the_script(tmp_path):
    """Every step but the notebooks (tests/test_notebooks.py runs those on the CPU): about 30 s here."""
    steps = "install,gpu-env,pytest-gpu,embedded,volunteer,benchmark"
    rc, doc, text = _proof(tmp_path, "--steps", steps, env={"DEPIN_GPU_PROOF_DRY": "1"})  # = --dry-run
    assert rc == 0, text
    assert doc["ok"] and doc["mode"].startswith("dry-run")
    status = {s["name"]: s["status"] for s in doc["steps"]}
    assert status == {"install": "pass", **{n: gp.SKIPPED for n in steps.split(",")[1:]}}
    checks = {c["name"]: c["ok"] for s in doc["steps"] for c in s["checks"]}
    # the plumbing ran for real: a kernel drove %%depin, a scheduler and a worker came and went
    assert checks["without a GPU the embedded default is a CPU LocalCluster and says so"] is True
    assert checks["--gpu-mem too large gives the clear error"] is True
    assert checks["it ran in the sandbox (a child process with DEPIN_SANDBOX_RUN)"] is True
    assert checks["SIGTERM: the worker hands its work back and leaves (exit 0)"] is True
    assert checks["SIGTERM: the scheduler stops (exit 0)"] is True
    assert checks["NVML energy in the manifest is a real number of joules"] is None  # skipped: no GPU
    pytest_step = next(s for s in doc["steps"] if s["name"] == "pytest-gpu")
    counts = pytest_step["figures"]["pytest"]
    assert counts["collected"] >= 3 and counts["skipped"] == counts["collected"]
    assert all(s["duration_s"] <= s["timeout_s"] for s in doc["steps"])
    out = tmp_path / "out"
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8  # what the device tool brings back
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/pytest-gpu.log" in names and "results/gpu-env.json" in names


@pytest.mark.skipif(_has_gpu(), reason="on a GPU machine these checks run")
def test_without_dry_run_a_machine_without_gpu_fails_the_proof(tmp_path):
    rc, doc, text = _proof(tmp_path, "--steps", "gpu-env")
    assert rc == 1, text
    step = doc["steps"][-1]  # without --dry-run the GPU checks run, and fail here
    assert step["name"] == "gpu-env" and step["status"] == "fail" and "cupy sees a CUDA device" in step["why"]
    assert doc["ok"] is False and "PROOF FAILED" in text
