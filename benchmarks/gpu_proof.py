"""The GPU path proven in one prepared run (issue #23): step runner, step drivers, JSON summary.

`benchmarks/gpu_proof.sh` is the entry point (its header says how to run it on the GPU machine). It calls

    python3 benchmarks/gpu_proof.py run [--dry-run] [--out DIR] [--install MODE] ...   # every step, the summary
    python  benchmarks/gpu_proof.py step NAME --work DIR --result FILE [--dry-run]      # one step's driver (venv)
    python3 benchmarks/gpu_proof.py requirements --for image|full                       # what an install needs
    python3 benchmarks/gpu_proof.py prepare-wheelhouse --for image|full [--dir DIR]     # here, with network

`run` imports nothing but the standard library, so it works under the device image's own python3 before
any venv exists. Each step runs as a subprocess in its own process group with its own time limit (the
group is killed when the limit passes, and after the step anyway, so nothing it started outlives it);
the summary is rewritten after every step, so a run killed half-way still leaves one. The step drivers
run in the venv and use only the product's public surfaces: `%load_ext depin_jupyter`, `%%depin`,
`%depin ...`, `depin_jupyter.xp()` and the `depin` command line.

A check is True (passed), False (failed) or None (skipped: it needs a GPU). A step passes when all its
checks passed; with --dry-run (or DEPIN_GPU_PROOF_DRY=1) a step whose only misses are GPU checks is
"skipped: no GPU"; without it, any skipped check fails the step: the proof claims nothing it did not run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SCRIPT = HERE / "gpu_proof.sh"
SKIPPED = "skipped: no GPU"
CARRY_LIMIT = 64 * 2**20  # what the device tool carries to the GPU machine: working tree + carried paths
DEVICE_PYTHON = "3.12"    # the device image's python3 (3.12.3 when last seen)


def _run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
    """subprocess.run that leaves the exit status to the caller."""
    return subprocess.run(argv, check=False, **kw)


@dataclass(frozen=True)
class Step:
    """One step of the proof: its name, time limits (GPU run, dry run) and what it proves."""

    name: str
    timeout_gpu: int
    timeout_dry: int
    proves: str


# GPU-run limits sum to 530 s, under the default --budget of 540 s: one device command (at most 600 s).
STEPS: tuple[Step, ...] = (
    Step("install", 150, 480, "a venv with the GPU extra installs (pip, a wheelhouse, or over the device image)"),
    Step("gpu-env", 20, 60, "the GPU, driver, cupy (NVRTC, cuBLAS, cuFFT, cuRAND), dask-cuda and NVML work"),
    Step("pytest-gpu", 80, 120, "every @pytest.mark.gpu test passes; none is skipped"),
    Step("embedded", 50, 120, "%%depin starts LocalCUDACluster and says so; --gpu routes; cupy stays cupy"),
    Step("volunteer", 70, 150, "depin scheduler + depin worker via dask-cuda; sandboxed GPU cell; NVML energy"),
    Step("benchmark", 80, 60, "benchmarks/gpu.py: %%depin >= 0.9x direct cupy (>= 1 s), field equals numpy"),
    Step("notebooks", 80, 240, "heat_diffusion and virtual-lab/gpu_speedup_lab execute on the GPU"),
)
DEFAULT_BUDGET = 540

# Large packages the device image already holds (its package list as read on 2026-11-17): an `image`
# wheelhouse leaves their wheels out (over 256 KiB only; small ones travel in case the image's are too old).
# cuda-core is not among them: dask-cuda needs >= 0.5.1, and the image's version was not read.
IMAGE_HAS = frozenset({
    "numpy", "pandas", "matplotlib", "pillow", "fonttools", "kiwisolver", "contourpy", "pygments", "pyyaml",
    "narwhals", "msgpack", "xxhash", "pytest", "psutil", "cuda-bindings", "cuda-pathfinder",
    "cuda-toolkit", "nvidia-ml-py", "scipy", "pyarrow", "jinja2", "packaging", "click", "fsspec",
    "python-dateutil", "pyparsing", "markupsafe", "attrs", "toolz", "typing-extensions", "sortedcontainers",
    "cloudpickle", "pluggy", "zipp", "iniconfig", "pytest-timeout", "pathspec", "six", "cycler", "xarray",
})
IMAGE_KEEP_BELOW = 256 * 2**10
# Over the image (cupy-cuda13x, numba-cuda, NVML and CUDA 13 libraries already there): what the proof's
# steps need besides the project's own dependencies (of which the Lab stack is left out: no step needs it).
IMAGE_EXTRA = ("dask-cuda", "pytest>=8", "pytest-timeout>=2", "ipykernel>=6", "jupyter_client>=8", "nbclient",
               "nbformat", "matplotlib>=3.8")
IMAGE_DROP = ("jupyterlab", "jupyter_server", "jupyter-server")
BUILD_BACKEND = ("hatchling>=1.5", "hatch-jupyter-builder>=0.9", "editables")  # hatchling needs editables for -e


# ------------------------------------------------------------------ running one step

@dataclass
class StepRun:
    """How a step's process ended."""

    rc: int | None
    duration_s: float
    timed_out: bool


def _kill_group(pgid: int, grace: float = 5.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.1)


def run_step(argv: list[str], timeout: float, log: Path, env: dict[str, str] | None = None,
             cwd: Path | None = None) -> StepRun:
    """Run ``argv`` in a new session with stdout+stderr to ``log``; kill its whole group at ``timeout``.

    The group is killed after a normal exit too: a step must not leave processes behind.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "ab") as f:
        f.write(f"$ {' '.join(argv)}\n# time limit {timeout:.0f}s\n".encode())
        f.flush()
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=cwd, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    return StepRun(rc=proc.returncode, duration_s=time.monotonic() - t0, timed_out=timed_out)


def judge(run: StepRun, result: dict[str, Any] | None, dry: bool, timeout: float) -> tuple[str, str]:
    """(status, why) of a step: "pass", "fail" or "skipped: no GPU" (dry runs only)."""
    checks = (result or {}).get("checks") or []
    failed = [c for c in checks if c.get("ok") is False]
    skipped = [c for c in checks if c.get("ok") is None]
    if run.timed_out:
        return "fail", f"timed out after {timeout:.0f}s" + (f"; failed: {failed[0]['name']}" if failed else "")
    if failed:
        return "fail", "; ".join(f"{c['name']}: {c.get('detail') or 'no'}"[:300] for c in failed[:3])
    if run.rc != 0:
        return "fail", f"exit status {run.rc}" + ("" if result else " (the step wrote no result)")
    if not checks:
        return "fail", "the step ran no check"
    if skipped:
        names = ", ".join(c["name"] for c in skipped)
        return (SKIPPED, f"GPU checks not run: {names}") if dry else ("fail", f"GPU checks skipped: {names}")
    return "pass", f"{len(checks)} checks passed"


# ------------------------------------------------------------------ the summary

@dataclass
class Summary:
    """The one JSON file a proof run leaves: each step, its status, duration and key figures."""

    path: Path
    dry: bool
    budget_s: float
    info: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    @property
    def ok(self) -> bool:
        allowed = ("pass", SKIPPED) if self.dry else ("pass",)
        return bool(self.steps) and all(s["status"] in allowed for s in self.steps)

    def add(self, entry: dict[str, Any]) -> None:
        self.steps.append(entry)
        self.write()

    def write(self) -> None:
        doc = {
            "proof": "depin-jupyter GPU path (issue #23)",
            "mode": "dry-run (no GPU: GPU checks skipped)" if self.dry else "gpu",
            "ok": self.ok,
            "duration_s": round(time.monotonic() - self.t0, 1),
            "budget_s": self.budget_s,
            **self.info,
            "steps": self.steps,
            "failed": [s["name"] for s in self.steps if s["status"] == "fail"],
            "skipped_no_gpu": [s["name"] for s in self.steps if s["status"] == SKIPPED],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        tmp.replace(self.path)


def _tail(path: Path, n: int = 2500) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-n:].decode("utf-8", "replace")


def _git_commit() -> str | None:
    try:
        out = _run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = _run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (modified)" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _step_env(work: Path, venv: Path) -> dict[str, str]:
    """The steps' environment: the venv first on PATH, a private Dask config and Jupyter dirs."""
    env = dict(os.environ)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["PYTHONUNBUFFERED"] = "1"
    (work / "dask-config").mkdir(parents=True, exist_ok=True)
    env["DASK_CONFIG"] = str(work / "dask-config")          # nobody's ~/.config/dask changes the proof
    env["JUPYTER_PATH"] = str(work / "jupyter")              # the proof's own kernel spec comes first
    env["JUPYTER_RUNTIME_DIR"] = str(work / "jupyter-runtime")
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    env["MPLBACKEND"] = "Agg"
    env.pop("DEPIN_LAB_TOKEN", None)
    env.pop("PYTHONPATH", None)
    return env


def _install_checks(venv: Path, work: Path, env: dict[str, str], mode: str, dry: bool) -> dict[str, Any]:
    """After the install step: does the venv import the product, answer `depin --version`, and at which versions."""
    checks: list[dict[str, Any]] = []
    figures: dict[str, Any] = {"mode": mode}
    py = venv / "bin" / "python"
    probe = ("import json, importlib.metadata as m\nout = {}\n"
             "for d in ('depin-jupyter', 'dask', 'distributed', 'dask-cuda', 'rapids-dask-dependency', "
             "'cupy-cuda12x', 'cupy-cuda13x', 'numpy', 'zarr', 'ipython', 'nvidia-ml-py', 'cuda-core', "
             "'cuda-bindings', 'pytest'):\n"
             "    try:\n        out[d] = m.version(d)\n    except m.PackageNotFoundError:\n        out[d] = None\n"
             "import depin_jupyter\nprint(json.dumps(out))")
    try:
        p = _run([str(py), "-c", probe], capture_output=True, text=True, timeout=60, env=env)
        versions = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {}
        checks.append({"name": "the venv imports depin_jupyter", "ok": p.returncode == 0,
                       "detail": p.stderr[-300:] if p.returncode else ""})
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as e:
        versions = {}
        checks.append({"name": "the venv imports depin_jupyter", "ok": False, "detail": repr(e)})
    figures["versions"] = versions
    if versions:
        checks.append({"name": "dask and distributed are one release", "ok": bool(versions.get("dask"))
                       and versions.get("dask") == versions.get("distributed"),
                       "detail": f"dask {versions.get('dask')}, distributed {versions.get('distributed')}"})
    try:
        p = _run([str(venv / "bin" / "depin"), "--version"], capture_output=True, text=True, timeout=60,
                           env=env)
        checks.append({"name": "the depin command answers", "ok": p.returncode == 0,
                       "detail": (p.stdout or p.stderr).strip()[-200:]})
    except (OSError, subprocess.TimeoutExpired) as e:
        checks.append({"name": "the depin command answers", "ok": False, "detail": repr(e)})
    if versions:
        cupy = versions.get("cupy-cuda12x") or versions.get("cupy-cuda13x")
        gpu_stack = bool(versions.get("dask-cuda")) and bool(cupy)
        if gpu_stack or not dry:
            checks.append({"name": "dask-cuda and cupy are installed", "ok": gpu_stack,
                           "detail": f"dask-cuda {versions.get('dask-cuda')}, cupy-cuda12x "
                                     f"{versions.get('cupy-cuda12x')}, cupy-cuda13x {versions.get('cupy-cuda13x')}"})
    resolution = work / "gpu-extra-resolution.json"
    if resolution.exists():  # a dry run resolved `.[test,gpu]` without installing the CUDA wheels
        try:
            rep = json.loads(resolution.read_text())
            got = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in rep.get("install", [])}
            keys = ("dask", "distributed", "dask-cuda", "rapids-dask-dependency", "cupy-cuda12x", "cuda-core",
                    "cuda-bindings", "cuda-toolkit", "nvidia-ml-py", "nvidia-cublas-cu12", "numpy")
            figures["gpu_extra_resolves_to"] = {k: got.get(k) for k in keys}
            checks.append({"name": "the [test,gpu] extras resolve with the project's dask pin",
                           "ok": all(got.get(k) for k in ("dask", "dask-cuda", "cupy-cuda12x", "nvidia-cublas-cu12"))
                           and got.get("dask") == got.get("distributed"),
                           "detail": json.dumps(figures["gpu_extra_resolves_to"])})
        except (OSError, ValueError, KeyError) as e:
            checks.append({"name": "the [test,gpu] extras resolve", "ok": False, "detail": repr(e)})
    return {"checks": checks, "figures": figures}


def cmd_run(args: argparse.Namespace) -> int:
    """Every step in order, each under its own limit and the overall budget; the summary; 0 if the proof holds."""
    dry = bool(args.dry_run) or os.environ.get("DEPIN_GPU_PROOF_DRY", "").lower() in ("1", "true", "yes")
    out = Path(args.out or os.environ.get("OUT") or "gpu-proof-out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="depin-gpu-proof-"))
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)  # mkdtemp makes it 0700: the volunteer sandbox's user must reach the venv inside
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    venv = Path(args.venv).resolve() if args.venv else work / "venv"
    mode = args.install or ("wheelhouse" if args.wheelhouse else "pip")
    wanted = [s.strip() for s in args.steps.split(",")] if args.steps else [s.name for s in STEPS]
    unknown = sorted(set(wanted) - {s.name for s in STEPS})
    if unknown:
        print(f"gpu_proof: unknown step(s) {', '.join(unknown)}; steps: {', '.join(s.name for s in STEPS)}",
              file=sys.stderr)
        return 2
    def say(text: str) -> None:
        print(text, flush=True)
        with open(out / "proof.log", "a") as console:
            console.write(text + "\n")

    summary = Summary(out / "summary.json", dry, float(args.budget))
    summary.info.update({
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "git": _git_commit(),
        "python": sys.version.split()[0], "orchestrator": sys.executable, "install_mode": mode,
        "venv": str(venv), "work": str(work), "repo": str(REPO), "uid": os.getuid(),
        "step_limits_s": {s.name: (s.timeout_dry if dry else s.timeout_gpu) for s in STEPS if s.name in wanted},
    })
    summary.write()
    env = _step_env(work, venv)
    say(f"gpu_proof: {'DRY RUN (no GPU checks)' if dry else 'GPU run'}; summary -> {summary.path}; work in {work}")
    broken: str | None = None
    for step in (s for s in STEPS if s.name in wanted):
        limit = float(step.timeout_dry if dry else step.timeout_gpu)
        if step.name == "install" and args.install_timeout:  # e.g. the 2 GB GPU extra over a slow network
            limit = float(args.install_timeout)
        left = float(args.budget) - (time.monotonic() - summary.t0)
        entry: dict[str, Any] = {"name": step.name, "proves": step.proves, "timeout_s": limit}
        if broken or left < 10:
            why = broken or f"not run: {left:.0f}s of the {args.budget}s budget left"
            entry.update(status="fail", why=why, duration_s=0.0)
            summary.add(entry)
            say(f"  {step.name:11} {'fail':15} {why}")
            continue
        limit = min(limit, left - 5)
        log = logs / f"{step.name}.log"
        result_file = work / "results" / f"{step.name}.json"
        result_file.parent.mkdir(parents=True, exist_ok=True)
        result_file.unlink(missing_ok=True)
        if step.name == "install":
            argv = ["bash", str(SCRIPT), "_install", "--mode", mode, "--venv", str(venv), "--work", str(work),
                    "--python", args.python or sys.executable]
            argv += ["--wheelhouse", str(Path(args.wheelhouse).resolve())] if args.wheelhouse else []
            argv += ["--dry-run"] if dry else []
        else:
            argv = [str(venv / "bin" / "python"), str(Path(__file__).resolve()), "step", step.name,
                    "--work", str(work), "--result", str(result_file)] + (["--dry-run"] if dry else [])
        say(f"  {step.name:11} {'...':15} (limit {limit:.0f}s) {step.proves}")
        run = run_step(argv, limit, log, env=env, cwd=REPO)
        if step.name == "install":
            result = _install_checks(venv, work, env, mode, dry) if not run.timed_out and run.rc == 0 else None
        else:
            try:
                result = json.loads(result_file.read_text())
            except (OSError, ValueError):
                result = None
        status, why = judge(run, result, dry, limit)
        entry.update(status=status, why=why, duration_s=round(run.duration_s, 1), rc=run.rc,
                     timed_out=run.timed_out, figures=(result or {}).get("figures", {}),
                     checks=(result or {}).get("checks", []), log=f"logs/{step.name}.log")
        if status == "fail":
            entry["log_tail"] = _tail(log)
        summary.add(entry)
        say(f"  {step.name:11} {status:15} {run.duration_s:6.1f}s  {why}")
        if step.name == "install" and status == "fail":
            broken = "not run: the install step failed"
    summary.write()
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:  # one file: the device returns at most 8
        tar.add(logs, arcname="logs")
        if (work / "results").exists():
            tar.add(work / "results", arcname="results")
    verdict = "PROOF HOLDS" if summary.ok and not dry else ("DRY RUN OK" if summary.ok else "PROOF FAILED")
    say(f"gpu_proof: {verdict} in {time.monotonic() - summary.t0:.0f}s; "
        f"failed: {', '.join(s['name'] for s in summary.steps if s['status'] == 'fail') or 'none'}; "
        f"{summary.path}")
    return 0 if summary.ok else 1


# ------------------------------------------------------------------ the step drivers (run in the venv)

class Checks:
    """A step's checks and figures, rewritten to its result file after each one (a killed step keeps them)."""

    def __init__(self, path: Path, gpu: bool) -> None:
        self.path, self.gpu = path, gpu
        self.checks: list[dict[str, Any]] = []
        self.figures: dict[str, Any] = {}

    def _write(self) -> None:
        self.path.write_text(json.dumps({"checks": self.checks, "figures": self.figures}, indent=2, default=str))

    def check(self, name: str, ok: bool, detail: Any = "") -> bool:
        ok = bool(ok)
        self.checks.append({"name": name, "ok": ok, "detail": str(detail)[-600:]})
        print(f"[{'ok' if ok else 'FAIL'}] {name}" + ("" if ok or not detail else f": {str(detail)[-600:]}"),
              flush=True)
        self._write()
        return ok

    def skip(self, *names: str) -> None:
        for name in names:
            self.checks.append({"name": name, "ok": None, "detail": SKIPPED})
            print(f"[skip] {name} ({SKIPPED})", flush=True)
        self._write()

    def figure(self, key: str, value: Any) -> None:
        self.figures[key] = value
        self._write()


def _readable_by_others(path: Path) -> bool:
    """Whether another user can read ``path``: it is o+r and every folder above it o+x."""
    path = path.resolve()
    try:
        if not path.stat().st_mode & 0o004:
            return False
        return all(p.stat().st_mode & 0o001 for p in path.parents)
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(path: Path, text: str, proc: subprocess.Popen[Any], timeout: float) -> str:
    """The log at ``path`` once it holds ``text``; "" if the process exits or time runs out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        if proc.poll() is not None:
            return ""
        time.sleep(0.2)
    return ""


def _kernel_spec(work: Path) -> str:
    """A kernel spec running this venv's python, found first through JUPYTER_PATH (set by `run`)."""
    d = work / "jupyter" / "kernels" / "depin-proof"
    d.mkdir(parents=True, exist_ok=True)
    (d / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "depin GPU proof", "language": "python"}))
    os.environ["JUPYTER_PATH"] = str(work / "jupyter")
    return "depin-proof"


@dataclass
class Reply:
    """What one cell did in a kernel."""

    ok: bool
    stdout: str
    stderr: str
    error: str

    @property
    def text(self) -> str:
        return f"{self.stdout}\n{self.stderr}\n{self.error}"


class Kernel:
    """A real IPython kernel (jupyter_client + ipykernel), as a notebook has one."""

    def __init__(self, work: Path, cwd: Path) -> None:
        from jupyter_client.manager import start_new_kernel

        self.km, self.kc = start_new_kernel(kernel_name=_kernel_spec(work), cwd=str(cwd), startup_timeout=60)

    def run(self, code: str, timeout: float = 60) -> Reply:
        out: dict[str, list[str]] = {"stdout": [], "stderr": [], "error": []}

        def hook(msg: dict[str, Any]) -> None:
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out[content["name"]].append(content["text"])
            elif kind == "error":
                out["error"].append(f"{content['ename']}: {content['evalue']}")
            elif kind in ("execute_result", "display_data"):
                out["stdout"].append(str(content.get("data", {}).get("text/plain", "")) + "\n")

        try:
            reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=hook, allow_stdin=False)
            ok = reply["content"]["status"] == "ok"
        except TimeoutError as e:
            ok = False
            out["error"].append(f"no reply within {timeout:g}s ({e})")
        text = {k: "".join(v) for k, v in out.items()}
        if "UsageError" in text["stderr"] and not text["error"]:
            text["error"] = text["stderr"]
        return Reply(ok and not text["error"], text["stdout"], text["stderr"], text["error"])

    def value(self, expr: str, timeout: float = 60) -> Any:
        """``expr`` evaluated in the kernel, through JSON (None when it fails)."""
        r = self.run(f"import json as _j\nprint('@@' + _j.dumps({expr}, default=str))", timeout)
        for line in r.stdout.splitlines():
            if line.startswith("@@"):
                return json.loads(line[2:])
        print(f"value({expr!r}) failed: {r.text[-800:]}", flush=True)
        return None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.kc.stop_channels()
        with contextlib.suppress(Exception):
            self.km.shutdown_kernel(now=False)


# Evaluated in the kernel after the first cell: where its result lives there.
_KERNEL_PROBE = """{'type': type(g).__module__ + '.' + type(g).__name__, 'on_worker': on_worker, 'sum': float(g.sum()),
 'worker_gpus': worker_gpus, 'nbytes': int(g.nbytes),
 'device': int(g.device.id) if hasattr(getattr(g, 'device', None), 'id') else None,
 'pool_bytes': int(__import__('cupy').get_default_memory_pool().used_bytes())
               if type(g).__module__.startswith('cupy') else None}"""
# A `%depin status` row of a GPU worker: "1x NVIDIA H200  139.8 GiB" (GPU model, then its memory).
_GPU_ROW = re.compile(r"\b1x (\S[^\n]*?)\s{2,}(\d+\.\d) GiB")
_EMBEDDED_GPU_ONLY = (
    "the cell ran on a GPU worker (resource GPU=1)", "the worker computed a cupy array",
    "the result is a cupy array in the kernel", "it lives in the kernel's GPU memory (cupy pool holds its bytes)",
    "a cupy input reaches the worker as cupy (no silent host copy)", "and the next result comes back as cupy",
    "--gpu-mem / --gpu-arch that the GPU meets: the cell runs")


def step_embedded(c: Checks, work: Path) -> None:
    """%%depin's embedded default on this machine, driven through a real kernel."""
    gpu = c.gpu
    cwd = work / "embedded"
    cwd.mkdir(parents=True, exist_ok=True)
    os.environ["DASK_DEPIN__STORE__URL"] = str(cwd / "depin-results.zarr")
    k = Kernel(work, cwd)
    try:
        c.check("%load_ext depin_jupyter", k.run("%load_ext depin_jupyter").ok)
        mod = "cupy" if gpu else "numpy"
        first = k.run(f"%%depin {'--gpu ' if gpu else ''}--no-store\nimport {mod} as m\n"
                      "from distributed import get_worker\n"
                      "worker_gpus = get_worker().state.total_resources.get('GPU', 0)\n"
                      "g = m.arange(1_000_000, dtype=m.float64) * 2\non_worker = type(g).__module__", timeout=120)
        # the note is information: on the progress line (a display's text/plain), or stdout in a terminal
        started = next((ln for ln in (first.stdout + first.stderr).splitlines() if "started" in ln
                        and "Cluster" in ln), "")
        c.figure("started", started)
        c.check("the first %%depin cell ran", first.ok, first.text)
        if gpu:
            c.check("the embedded default is LocalCUDACluster and says so", "LocalCUDACluster" in started, started)
        else:
            c.check("without a GPU the embedded default is a CPU LocalCluster and says so",
                    "CPU LocalCluster" in started, started)
            c.skip("the embedded default is LocalCUDACluster and says so")
        info = k.value(_KERNEL_PROBE.replace("\n", "")) or {}
        c.figure("result", info)
        c.check("the cell's result is back in the kernel", info.get("sum") == 999999000000.0, info)
        if gpu:
            c.check("the cell ran on a GPU worker (resource GPU=1)", info.get("worker_gpus") == 1, info)
            c.check("the worker computed a cupy array", str(info.get("on_worker")).startswith("cupy"), info)
            c.check("the result is a cupy array in the kernel", str(info.get("type")).startswith("cupy."), info)
            c.check("it lives in the kernel's GPU memory (cupy pool holds its bytes)",
                    (info.get("pool_bytes") or 0) >= info.get("nbytes", 1), info)
            nxt = k.run("%%depin --gpu --no-store\nh = g + 1\ninput_type = type(g).__module__")
            c.check("a cupy input reaches the worker as cupy (no silent host copy)",
                    nxt.ok and (k.value("input_type") or "").startswith("cupy"), nxt.text)
            c.check("and the next result comes back as cupy", (k.value("type(h).__module__") or "").startswith("cupy"))
            props = k.value("(lambda p: {'name': p['name'].decode() if isinstance(p['name'], bytes) else p['name'], "
                            "'memory': p['totalGlobalMem'], 'arch': float(f\"{p['major']}.{p['minor']}\")})"
                            "(__import__('cupy').cuda.runtime.getDeviceProperties(0))") or {}
            c.figure("gpu", props)
            have = float(props.get("memory") or 0) / 2**30
            fits = k.run(f"%%depin --gpu-mem {have * 0.5:.1f} --gpu-arch {props.get('arch', 0)} --no-store\nfits = 1")
            c.check("--gpu-mem / --gpu-arch that the GPU meets: the cell runs", fits.ok, fits.text)
        else:
            c.check("a --gpu cell on a CPU cluster gives the clear error",
                    not (r := k.run("%%depin --gpu --no-store\ny = 1")).ok and "no connected worker has that" in r.text,
                    r.text)
            c.skip(*_EMBEDDED_GPU_ONLY)
        big = k.run("%%depin --gpu-mem 100000 --no-store\ny = 1")
        want = "no connected worker has a GPU with at least 100000 GiB" if gpu else "--gpu-mem"
        c.check("--gpu-mem too large gives the clear error", not big.ok and want in big.text, big.text)
        status = k.run("%depin status")
        c.figure("status", status.stdout)
        if gpu:
            row = _GPU_ROW.search(status.stdout)
            c.figure("status_gpu", row.groups() if row else None)
            c.check("%depin status shows the GPU model and memory", row is not None, status.stdout)
        else:
            c.check("%depin status lists the workers", status.ok and "LocalCluster" in status.stdout, status.text)
            c.skip("%depin status shows the GPU model and memory")
        c.check("%depin close", k.run("%depin close", timeout=60).ok)
    finally:
        k.close()


def _log(files: contextlib.ExitStack, path: Path) -> Any:
    """A log file for a child process, closed with ``files``."""
    return files.enter_context(path.open("w"))


def _depin(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("depin") or str(Path(sys.executable).parent / "depin")
    return _run([exe, *args], capture_output=True, text=True, timeout=timeout, env=env)


def step_volunteer(c: Checks, work: Path) -> None:
    """A volunteer network on this machine: `depin scheduler`, `depin worker TOKEN`, a client, teardown."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    gpu = c.gpu
    root = work / "volunteer"
    root.mkdir(parents=True, exist_ok=True)
    store = root / "results.zarr"
    env = dict(os.environ, DASK_DEPIN__COORDINATOR__DASHBOARD_ADDRESS="127.0.0.1:0",
               DASK_DEPIN__VOLUNTEER__LEAVE_TIMEOUT="10s", DASK_DEPIN__STORE__URL=str(store))
    os.environ.update({"DASK_DEPIN__STORE__URL": str(store)})
    # A root worker runs cells as `nobody`; without bubblewrap that user must be able to read the checkout
    # and the venv. Where it cannot (a checkout under /root, say), the cell would fail for the file layout,
    # not for the GPU: run it as root then, still in its own sandboxed child, and say so in the summary.
    needed = {REPO, Path(sys.prefix), Path(sys.base_prefix), Path(os.path.realpath(sys.executable))}
    needed |= {Path(p) for p in sys.path if p and os.path.isdir(p)}
    closed = sorted(str(p) for p in needed if not _readable_by_others(p))
    switch = not (os.geteuid() == 0 and not shutil.which("bwrap") and closed)
    if not switch:
        env["DASK_DEPIN__SANDBOX__USER"] = "None"
    c.figure("sandbox_user", "depin.sandbox.user (nobody)" if switch else
             f"root: no bwrap, and other users cannot read {', '.join(closed[:4])}")
    exe = shutil.which("depin") or str(Path(sys.executable).parent / "depin")
    port = _free_port()
    s_out, s_err, w_log = root / "scheduler.out", root / "scheduler.log", root / "worker.log"
    procs: list[subprocess.Popen[Any]] = []
    files = contextlib.ExitStack()
    try:
        sched = subprocess.Popen([exe, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--state-dir",
                                  str(root / "state")], stdout=_log(files, s_out), stderr=_log(files, s_err), env=env)
        procs.append(sched)
        up = _wait_for(s_err, "listening at", sched, 60)
        if not c.check("depin scheduler listens", bool(up), _tail(s_err, 1500)):
            return
        wtoken = ctoken = ""
        for _ in range(100):  # each token is printed on the line after its heading
            lines = s_out.read_text().splitlines()
            w_i = next((i for i, ln in enumerate(lines) if ln.startswith("worker join token")), None)
            c_i = next((i for i, ln in enumerate(lines) if ln.startswith("client token")), None)
            if w_i is not None and c_i is not None and len(lines) > c_i + 1:
                wtoken, ctoken = lines[w_i + 1].strip(), lines[c_i + 1].strip()
                break
            time.sleep(0.1)
        if not c.check("it printed a worker and a client token", bool(wtoken and ctoken) and wtoken != ctoken,
                       _tail(s_out, 500)):
            return
        worker = subprocess.Popen([exe, "worker", wtoken, *([] if gpu else ["--gpus", "none"])],
                                  stdout=subprocess.DEVNULL, stderr=_log(files, w_log), env=env)
        procs.append(worker)
        joined = _wait_for(w_log, "depin worker: joined", worker, 120)
        line = next((ln for ln in joined.splitlines() if "depin worker: joined" in ln), "")
        c.figure("worker_joined", line)
        if gpu:
            c.check("depin worker joined through dask-cuda with one GPU worker", "with 1 GPU worker(s)" in line,
                    line or _tail(w_log, 1500))
        else:
            c.check("depin worker --gpus none joined with a CPU worker", "with a CPU worker" in line,
                    line or _tail(w_log, 1500))
            c.skip("depin worker joined through dask-cuda with one GPU worker")
        if not line:
            return
        sh = InteractiveShell.instance()
        sh.run_line_magic("load_ext", "depin_jupyter")
        with capture_output() as cap:
            res = sh.run_cell(f"%depin connect {ctoken}", store_history=False)
        c.check("%depin connect CLIENT_TOKEN", res.success, cap.stdout + cap.stderr)
        status = ""
        for _ in range(60):
            with capture_output() as cap:
                sh.run_cell("%depin status", store_history=False)
            status = cap.stdout
            listed = len(status.strip().splitlines()) >= 3  # the description, the header, a worker's row
            if listed and (_GPU_ROW.search(status) or not gpu):
                break
            time.sleep(0.5)
        c.figure("status", status)
        if gpu:
            row = _GPU_ROW.search(status)
            c.figure("status_gpu", row.groups() if row else None)
            c.check("%depin status shows the volunteer's GPU model and memory", row is not None, status)
        else:
            c.check("%depin status lists the volunteer", listed and "volunteer" in status, status)
            c.skip("%depin status shows the volunteer's GPU model and memory")
        with capture_output() as cap:
            big = sh.run_cell("%%depin --gpu-mem 100000\ny = 1", store_history=False)
        err = f"{big.error_in_exec or big.error_before_exec}"
        want = "no connected worker has a GPU with at least 100000 GiB" if gpu else "--gpu-mem"
        c.check("--gpu-mem too large gives the clear error", not big.success and want in err, err)
        m = "cupy" if gpu else "numpy"
        work_loop = ("a = cp.random.default_rng(0).standard_normal((4096, 4096), dtype=cp.float32)\n"
                     "while time.perf_counter() - t0 < 1.5:\n    a = cp.tanh(a @ a / 4096.0)\n"
                     "    cp.cuda.Device().synchronize()\n") if gpu else (
                     "a = np.random.default_rng(0).standard_normal((256, 256))\n"
                     "while time.perf_counter() - t0 < 0.5:\n    a = np.tanh(a @ a / 256.0)\n")
        cell = (f"%%depin {'--gpu ' if gpu else ''}--name proof-volunteer\nimport os, time\nimport numpy as np\n"
                f"{'import cupy as cp' if gpu else ''}\nsandboxed = 'DEPIN_SANDBOX_RUN' in os.environ\n"
                "uid = os.getuid()\n"
                f"t0 = time.perf_counter()\n{work_loop}s = float(a.sum())\nfield = a[:256, :256].copy()\n"
                "field_type = type(field).__module__\ndel a")  # only the small field travels back
        with capture_output() as cap:
            res = sh.run_cell(cell, store_history=False)
        c.check("a cell runs on the volunteer", res.success,
                f"{res.error_in_exec or res.error_before_exec} {cap.stderr[-1500:]}")
        ns = sh.user_ns
        c.figure("cell", {"sandboxed": ns.get("sandboxed"), "uid": ns.get("uid"), "field_type_on_worker":
                          ns.get("field_type"), "field_type_in_client": type(ns.get("field")).__module__})
        c.check("it ran in the sandbox (a child process with DEPIN_SANDBOX_RUN)", ns.get("sandboxed") is True)
        if os.geteuid() == 0 and switch:
            c.check("a root worker ran it as another user", ns.get("uid") not in (None, 0), ns.get("uid"))
        if gpu:
            c.check("the sandboxed cell computed cupy on the GPU", str(ns.get("field_type")).startswith(m))
            c.check("its result decodes back to cupy in the client",
                    type(ns.get("field")).__module__.startswith("cupy"))
        else:
            c.skip("the sandboxed cell computed cupy on the GPU", "its result decodes back to cupy in the client")
        runs = _depin("runs", str(store), env=env)
        run_id = next((ln.split()[0] for ln in runs.stdout.splitlines()[1:] if "proof-volunteer" in ln), None)
        c.check("the run is in the store (depin runs)", run_id is not None, runs.stdout + runs.stderr)
        if run_id:
            shown = _depin("show", run_id, "--store", str(store), "--format", "json", env=env)
            try:
                energy = (json.loads(shown.stdout).get("extra") or {}).get("energy") or {}
            except ValueError:
                energy = {}
            c.figure("energy", energy)
            c.check("the manifest records the cell's energy (depin show)", "energy_j" in energy,
                    shown.stdout[-500:] + shown.stderr[-500:])
            if gpu:
                joules = energy.get("energy_j")
                real = isinstance(joules, (int, float)) and joules > 0
                c.check("NVML energy in the manifest is a real number of joules",
                        real and str(energy.get("source", "")).startswith("nvml"), energy)
            else:
                c.skip("NVML energy in the manifest is a real number of joules")
        credits = _depin("credits", "--json", "--state-dir", str(root / "state"), env=env)
        with contextlib.suppress(ValueError):
            c.figure("credits", json.loads(credits.stdout))
        with capture_output():
            sh.run_cell("%depin close", store_history=False)
        worker.send_signal(signal.SIGTERM)
        try:
            rc = worker.wait(40)
        except subprocess.TimeoutExpired:
            rc = None
        c.check("SIGTERM: the worker hands its work back and leaves (exit 0)",
                rc == 0 and "left gracefully" in _tail(w_log, 3000), f"rc {rc}: {_tail(w_log, 800)}")
        sched.send_signal(signal.SIGTERM)
        try:
            rc = sched.wait(30)
        except subprocess.TimeoutExpired:
            rc = None
        c.check("SIGTERM: the scheduler stops (exit 0)", rc == 0, f"rc {rc}: {_tail(s_err, 800)}")
    finally:
        for p in procs[::-1]:
            if p.poll() is None:
                p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(10)
        files.close()
        for f in (s_err, w_log):  # into the step's log, which the tarball keeps
            print(f"----- {f.name} (tail) -----\n{_tail(f, 3000)}", flush=True)


def _stream(argv: list[str], timeout: float, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> tuple[int, str]:
    """Run ``argv``; echo its output into this step's log and return (exit status, output)."""
    try:
        p = _run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = 124, f"{e.stdout or ''}{e.stderr or ''}\n(timed out after {timeout:g}s)"
        text = text if isinstance(text, str) else text.decode(errors="replace")
    print(text, flush=True)
    return rc, text


def step_gpu_env(c: Checks, work: Path) -> None:
    """The GPU and the libraries every later step stands on."""
    import importlib.metadata as md

    import depin_jupyter

    versions = {}
    for d in ("depin-jupyter", "dask", "distributed", "dask-cuda", "cupy-cuda12x", "cupy-cuda13x", "numpy",
              "nvidia-ml-py", "cuda-core", "cuda-bindings", "zarr", "ipython"):
        try:
            versions[d] = md.version(d)
        except md.PackageNotFoundError:
            versions[d] = None
    c.figure("versions", versions)
    c.figure("python", sys.version.split()[0])
    c.figure("sandbox", {"bwrap": shutil.which("bwrap"), "uid": os.geteuid(),
                         "repo_readable_by_others": _readable_by_others(REPO),
                         "venv_readable_by_others": _readable_by_others(Path(sys.prefix))})
    rc, text = _stream(["depin", "--version"], 30)
    c.check("the depin command answers", rc == 0, text)
    smi = shutil.which("nvidia-smi")
    rc, text = 127, "nvidia-smi is not on PATH"
    if smi:
        rc, text = _stream([smi, "--query-gpu=name,memory.total,driver_version,power.draw",
                            "--format=csv,noheader"], 20)
        c.figure("nvidia_smi", text.strip())
    if not c.gpu:
        c.check("no GPU here, as a dry run expects: depin_jupyter.xp() is numpy",
                depin_jupyter.xp().__name__ == "numpy")
        c.skip("nvidia-smi lists the GPU", "cupy sees a CUDA device", "depin_jupyter.xp() is cupy",
               "cupy elementwise kernel (NVRTC)", "cupy matmul (cuBLAS)", "cupy fft (cuFFT)", "cupy random (cuRAND)",
               "cupy default_rng (cuRAND device code, NVRTC)",
               "dask-cuda imports", "NVML reads the board power")
        return
    c.check("nvidia-smi lists the GPU", bool(smi) and rc == 0 and bool(text.strip()), text)
    try:
        import cupy as cp

        n = int(cp.cuda.runtime.getDeviceCount())
        c.check("cupy sees a CUDA device", n > 0, f"{n} device(s)")
    except Exception as e:  # noqa: BLE001 - the check says what broke
        c.check("cupy sees a CUDA device", False, repr(e))
        return
    c.check("depin_jupyter.xp() is cupy", depin_jupyter.xp().__name__ == "cupy")
    probes: dict[str, Callable[[], bool]] = {
        "cupy elementwise kernel (NVRTC)": lambda: float(((cp.arange(10) ** 2) + 0.5).sum()) == 290.0,
        "cupy matmul (cuBLAS)": lambda: float((cp.ones((64, 64)) @ cp.ones((64, 64)))[0, 0]) == 64.0,
        "cupy fft (cuFFT)": lambda: abs(complex(cp.fft.fft(cp.ones(8))[0]) - 8) < 1e-9,
        "cupy random (cuRAND)": lambda: cp.random.standard_normal(1000).shape == (1000,),
        "cupy default_rng (cuRAND device code, NVRTC)": lambda: cp.random.default_rng(0).standard_normal(8).size == 8,
    }
    for name, probe in probes.items():
        try:
            c.check(name, probe())
        except Exception as e:  # noqa: BLE001
            c.check(name, False, f"{type(e).__name__}: {e}")
    try:
        import dask_cuda

        c.check("dask-cuda imports", True, dask_cuda.__version__)
    except Exception as e:  # noqa: BLE001
        c.check("dask-cuda imports", False, repr(e))
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        watts = pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0
        c.figure("board_power_w", watts)
        c.check("NVML reads the board power", watts > 0, watts)
    except Exception as e:  # noqa: BLE001
        c.check("NVML reads the board power", False, repr(e))


def _junit_counts(path: Path) -> dict[str, Any]:
    import xml.etree.ElementTree as ET

    counts: dict[str, Any] = {"collected": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "tests": {}}
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return counts
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        counts["collected"] += 1
        kind = next((k for k in ("failure", "error", "skipped") if case.find(k) is not None), "passed")
        key = {"failure": "failed", "error": "errors"}.get(kind, kind)
        counts[key] += 1
        counts["tests"][name] = key
    return counts


def step_pytest_gpu(c: Checks, work: Path) -> None:
    """`pytest -m gpu` over the test files that hold GPU tests (other files' imports need not resolve here)."""
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                   if "mark.gpu" in p.read_text(errors="replace"))
    c.figure("files", files)
    if not c.check("there are gpu-marked tests", bool(files)):
        return
    xml = work / "logs" / "pytest-gpu.xml"
    rc, text = _stream([sys.executable, "-m", "pytest", "-m", "gpu", "-rA", "-p", "no:cacheprovider",
                        f"--junitxml={xml}", *files], 3600, cwd=REPO)
    counts = _junit_counts(xml)
    c.figure("pytest", counts)
    c.check("pytest collected the gpu tests", counts["collected"] > 0, text[-800:])
    if c.gpu:
        c.check("every gpu test passed, none skipped", rc == 0 and counts["passed"] == counts["collected"] > 0,
                f"{counts}: {text[-1500:]}")
    else:
        c.check("without a GPU they are all skipped and pytest exits 0",
                rc == 0 and counts["skipped"] == counts["collected"] > 0, f"{counts}: {text[-1000:]}")
        c.skip("every gpu test passed, none skipped")


def step_benchmark(c: Checks, work: Path) -> None:
    """benchmarks/gpu.py: the heat solver via %%depin on LocalCUDACluster against direct cupy and numpy."""
    out = work / "results" / "gpu_bench.json"
    rc, text = _stream([sys.executable, str(HERE / "gpu.py"), "--n", "4096", "--steps", "5000",
                        "--check-steps", "20", "--out", str(out)], 3600, cwd=REPO)
    if not c.gpu:
        c.check("without a GPU benchmarks/gpu.py says so and exits 2", rc == 2 and "no usable GPU" in text, text[-500:])
        c.skip("workload of at least 1 s", "%%depin >= 0.9x direct cupy", "field equal to the numpy run",
               "the field stays cupy in the kernel")
        return
    try:
        doc = json.loads(out.read_text())
    except (OSError, ValueError):
        c.check("benchmarks/gpu.py ran and wrote its JSON", False, text[-1500:])
        return
    rows = doc.get("rows", {})
    c.figure("rows", rows)
    c.figure("gpu", doc.get("gpu"))
    c.check("benchmarks/gpu.py ran and wrote its JSON", rc == 0, text[-500:])
    c.check("workload of at least 1 s", rows.get("cupy_direct_s", 0) >= 1.0, rows.get("cupy_direct_s"))
    c.check("%%depin >= 0.9x direct cupy", rows.get("depin_over_direct_speed", 0) >= 0.9,
            rows.get("depin_over_direct_speed"))
    c.check("field equal to the numpy run", rows.get("equal_to_numpy") is True)
    c.check("the field stays cupy in the kernel", rows.get("field_stays_cupy") is True)


def _shrink(nb: Any, params: dict[str, str]) -> None:
    """Set the parameters cell (tagged 'parameters', the papermill convention)."""
    for cell in nb.cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            lines = []
            for line in cell.source.splitlines():
                name = line.split("=")[0].strip()
                lines.append(f"{name} = {params[name]}" if name in params else line)
            cell.source = "\n".join(lines)


def step_notebooks(c: Checks, work: Path) -> None:
    """The heat-diffusion and virtual-lab notebooks, top to bottom in a real kernel."""
    import nbformat
    from nbclient import NotebookClient

    kernel = _kernel_spec(work)
    os.environ.pop("DEPIN_LAB_TOKEN", None)
    os.environ.pop("DASK_DEPIN__STORE__URL", None)  # each notebook's own store, beside it
    gpu = c.gpu
    books = (("heat_diffusion.ipynb", {"n": "1024", "steps": "300"} if gpu else {"n": "64", "steps": "50"}),
             ("virtual-lab/gpu_speedup_lab.ipynb", {"n": "2048", "steps": "20", "repeats": "2"} if gpu
              else {"n": "64", "steps": "5", "repeats": "1"}))
    for rel, params in books:
        src = REPO / "notebooks" / rel
        stem = src.stem
        dest = work / "notebooks" / stem
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(src.parent, dest)
        nb = nbformat.read(dest / src.name, as_version=4)
        _shrink(nb, params)
        t0 = time.monotonic()
        try:
            NotebookClient(nb, timeout=150, kernel_name=kernel, resources={"metadata": {"path": str(dest)}}).execute()
            error = ""
        except Exception as e:  # noqa: BLE001 - the check reports it
            error = f"{type(e).__name__}: {str(e)[-1500:]}"
        nbformat.write(nb, work / "logs" / f"{stem}.executed.ipynb")
        outs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
        text = "".join(o.get("text", "") for o in outs)
        c.figure(stem, {"seconds": round(time.monotonic() - t0, 1), "params": params,
                        "lines": [ln for ln in text.splitlines() if ln.strip()][-12:]})
        c.check(f"{stem} executed top to bottom", not error, error)
        if stem == "heat_diffusion":
            c.check("heat_diffusion matches the local numpy run", "matches the local numpy run" in text, text[-800:])
            c.check("heat_diffusion drew its figure", any("image/png" in o.get("data", {}) for o in outs))
            if gpu:
                c.check("heat_diffusion's solver ran on cupy in LocalCUDACluster",
                        "cupy:" in text and "LocalCUDACluster" in text, text[-800:])
            else:
                c.skip("heat_diffusion's solver ran on cupy in LocalCUDACluster")
        else:
            c.check("gpu_speedup_lab: results agree", "results agree; speed-ups" in text, text[-800:])
            speed = re.findall(r"speed-ups: stencil ([0-9.]+)x, fft ([0-9.]+)x", text)
            if speed:
                c.figure("lab_speedups", {"stencil": float(speed[-1][0]), "fft": float(speed[-1][1])})
            if gpu:
                c.check("gpu_speedup_lab ran cupy on a GPU worker of LocalCUDACluster", "LocalCUDACluster" in text
                        and "cupy" in text and "no GPU on this worker" not in text, text[-800:])
            else:
                c.skip("gpu_speedup_lab ran cupy on a GPU worker of LocalCUDACluster")


DRIVERS: dict[str, Callable[[Checks, Path], None]] = {
    "gpu-env": step_gpu_env, "pytest-gpu": step_pytest_gpu, "embedded": step_embedded,
    "volunteer": step_volunteer, "benchmark": step_benchmark, "notebooks": step_notebooks,
}


def cmd_step(args: argparse.Namespace) -> int:
    """One step's driver: its checks go to --result as they are made."""
    c = Checks(Path(args.result), gpu=not args.dry_run)
    c._write()
    try:
        DRIVERS[args.name](c, Path(args.work))
    except Exception as e:  # noqa: BLE001 - a crash is a failed check, with its traceback in the log
        import traceback

        traceback.print_exc()
        c.check(f"the {args.name} driver ran to its end", False, f"{type(e).__name__}: {e}")
        return 1
    return 0


# ------------------------------------------------------------------ requirements and the wheelhouse

def requirements(flavor: str) -> list[str]:
    """What an install needs: ``full`` = the project with [test,gpu]; ``image`` = over the device image."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"])
    if flavor == "full":
        extras = project["optional-dependencies"]
        return [*deps, *extras["test"], *extras["gpu"], *BUILD_BACKEND]
    name = re.compile(r"^\s*([A-Za-z0-9_.\-]+)")
    kept = [d for d in deps if (m := name.match(d)) and m.group(1).lower() not in IMAGE_DROP]
    return [*kept, *IMAGE_EXTRA, *BUILD_BACKEND]


def _platform_args() -> list[str]:
    tags = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64", "linux_x86_64"]
    tags += [f"manylinux_2_{n}_x86_64" for n in range(5, 40)]
    return [a for t in tags for a in ("--platform", t)]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _tree_bytes() -> int:
    """What the device tool sends besides carried paths: tracked and untracked-not-ignored files."""
    try:
        p = _run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, timeout=30)
        return sum((REPO / f).stat().st_size for f in p.stdout.decode().split("\0") if f and (REPO / f).is_file())
    except (OSError, subprocess.TimeoutExpired):
        return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Download the wheels an offline install needs (for the device's Python) and say if they fit the carry."""
    dest = Path(args.dir).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    reqs = dest / f"requirements-{args.flavor}.txt"
    reqs.write_text("\n".join(requirements(args.flavor)) + "\n")
    target = ["--python-version", args.python_version, "--implementation", "cp", "--only-binary=:all:",
              *_platform_args()]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        p = _run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
                            "--report", str(report), "--target", str(Path(tmp) / "t"), *target, "-r", str(reqs)])
        if p.returncode != 0:
            print("gpu_proof: the requirements do not resolve for the device's Python", file=sys.stderr)
            return 1
        items = json.loads(report.read_text())["install"]
    pins, left_out = [], []
    for it in items:
        meta, url = it["metadata"], it["download_info"]["url"]
        pins.append((_norm(meta["name"]), meta["version"], url.rsplit("/", 1)[-1]))
    wanted = [f"{n}=={v}" for n, v, _ in pins]
    p = _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), *target, *wanted])
    if p.returncode != 0:
        return 1
    files = {f.name: f.stat().st_size for f in dest.glob("*.whl")}
    keep = {fn for _, _, fn in pins}
    for name in list(files):
        if name not in keep:  # a wheel from an earlier preparation that this one does not use
            (dest / name).unlink()
            del files[name]
    if args.flavor == "image":
        for n, v, fn in pins:
            if n in IMAGE_HAS and files.get(fn, 0) > IMAGE_KEEP_BELOW:
                left_out.append(f"{n}=={v}")
                (dest / fn).unlink()
                del files[fn]
    total = sum(files.values())
    tree = _tree_bytes()
    fits = total + tree <= CARRY_LIMIT
    doc = {"flavor": args.flavor, "python_version": args.python_version, "wheels": len(files), "bytes": total,
           "mib": round(total / 2**20, 1), "tree_mib": round(tree / 2**20, 1), "carry_limit_mib": CARRY_LIMIT // 2**20,
           "fits_carry": fits, "left_out_for_the_image": left_out,
           "biggest": sorted(files.items(), key=lambda kv: -kv[1])[:10]}
    (dest / "wheelhouse.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in ("flavor", "wheels", "mib", "tree_mib", "fits_carry")}))
    if not fits:
        print(f"gpu_proof: {total / 2**20:.0f} MiB of wheels + {tree / 2**20:.1f} MiB of working tree is over the "
              f"{CARRY_LIMIT // 2**20} MiB the device tool carries: this wheelhouse cannot travel; the GPU machine "
              f"needs its own package access (or use --for image over the device image's own CUDA stack).",
              file=sys.stderr)
        return 3
    return 0


# ------------------------------------------------------------------ command line

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="every step and the summary")
    r.add_argument("--dry-run", action="store_true", help="no GPU: run the plumbing, report GPU checks as skipped")
    r.add_argument("--out", help="where summary.json, proof.log and logs.tar.gz go (default $OUT or ./gpu-proof-out)")
    r.add_argument("--work", help="scratch directory (default: a new one under the temp dir)")
    r.add_argument("--venv", help="the venv to create (or reuse with --install none); default WORK/venv")
    r.add_argument("--install", choices=("pip", "wheelhouse", "image", "none"),
                   help="pip: from the index; wheelhouse: offline from --wheelhouse; image: offline, over the "
                        "device image's python3 and its CUDA stack; none: reuse --venv")
    r.add_argument("--wheelhouse", help="a directory of wheels (benchmarks/gpu_proof.sh prepare-wheelhouse)")
    r.add_argument("--python", help="the python3 the venv is made from (default: this one)")
    r.add_argument("--steps", help=f"comma-separated subset of {','.join(s.name for s in STEPS)}")
    r.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for all steps together")
    r.add_argument("--install-timeout", type=float, help="the install step's limit instead of its default")
    s = sub.add_parser("step", help="one step's driver (inside the venv)")
    s.add_argument("name", choices=sorted(DRIVERS))
    s.add_argument("--work", required=True)
    s.add_argument("--result", required=True)
    s.add_argument("--dry-run", action="store_true")
    q = sub.add_parser("requirements", help="print what an install needs, one requirement a line")
    q.add_argument("--for", dest="flavor", choices=("full", "image"), default="full")
    w = sub.add_parser("prepare-wheelhouse", help="download the wheels of an offline install; say if they fit")
    w.add_argument("--for", dest="flavor", choices=("full", "image"), default="image")
    w.add_argument("--dir", default=str(REPO / ".gpu-proof-wheels"))
    w.add_argument("--python-version", default=DEVICE_PYTHON)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "step":
        return cmd_step(args)
    if args.cmd == "requirements":
        print("\n".join(requirements(args.flavor)))
        return 0
    return cmd_prepare(args)


if __name__ == "__main__":
    sys.exit(main())
