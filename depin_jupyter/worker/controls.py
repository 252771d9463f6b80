"""The volunteer stays in control: pause/resume, working hours, idle-only, GPU limits, fair credit.

Everything here is small and mostly pure, so it can be tested without a cluster:

* **The control file** (``control.json`` in ``depin.volunteer.control-dir``, default
  ``$XDG_STATE_HOME/depin`` or ``~/.local/state/depin``; directory 0700, file 0600). ``depin pause`` and
  ``depin resume`` write it; every ``depin worker`` of this user on this machine polls it. Each running
  worker writes ``worker-<pid>.json`` next to it with its status and the reasons it is paused, which is
  how ``depin pause`` reports what it did.
* **Predicates** that each say why the worker must not take work now (``None`` when it may): the
  volunteer's pause, ``--hours``, ``--when-idle``, ``--max-gpu-util``. The worker takes work only when none
  of them objects (see `Controls.reasons`).
* **Pure helpers**: duration and hours parsing, the ``CUDA_VISIBLE_DEVICES`` left after ``--exclude-gpus``.
* **Speed benchmark and normalized credit** (`benchmark`, `speed_factor`).

What the idle signal really reads (``--when-idle``), in this order:

1. ``depin.volunteer.idle-signal-file`` when set: a file whose content is ``idle`` or ``busy`` (anything
   else, or no file, counts as busy). Any program of the volunteer's can drive it; tests use it.
2. otherwise keyboard/mouse idle time from ``xprintidle`` (X11 only; needs it on PATH and ``$DISPLAY``):
   busy until the user has been away ``depin.volunteer.idle-after`` (default 5 minutes);
3. and GPU use by *other* processes through NVML (``pynvml``/``nvidia-ml-py``): busy above
   ``depin.volunteer.idle-gpu-util`` percent.

Wayland sessions, a locked screen, and CPU load are not read. With none of these signals available,
``--when-idle`` refuses to start rather than guess.

Credit figures are self-reported: the CPU time and the benchmark are measured by the volunteer's own
worker, which the volunteer controls. They make honest volunteers comparable (sleeping inside a task
earns nothing); they do not prove that work was done — replicating tasks on other volunteers does that.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from depin_jupyter.errors import DepinUsageError
from depin_jupyter.protocol.credit import REFERENCE_SECONDS, speed_factor

__all__ = [
    "Controls",
    "IdleSignal",
    "benchmark",
    "cached_benchmark",
    "control_dir",
    "control_reason",
    "cuda_visible_devices",
    "hours_reason",
    "in_hours",
    "parse_duration",
    "parse_gpu_indices",
    "parse_hours",
    "read_control",
    "set_power_limits",
    "speed_factor",
    "worker_states",
    "write_control",
    "write_worker_state",
]

CONTROL_FILE = "control.json"

# ------------------------------------------------------------------ the control file


def control_dir() -> pathlib.Path:
    """Where `depin pause`/`resume` and the running workers meet (config depin.volunteer.control-dir)."""
    from depin_jupyter import config

    configured = config.get("volunteer.control-dir")
    if configured:
        return pathlib.Path(os.path.expanduser(str(configured)))
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return pathlib.Path(base) / "depin"


def _ensure_dir(path: pathlib.Path) -> pathlib.Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise DepinUsageError(f"the control directory {path} belongs to another user; set "
                              f"depin.volunteer.control-dir to a directory of your own")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def _write_json(path: pathlib.Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _read_json(path: pathlib.Path) -> dict[str, Any] | None:
    """The JSON object in ``path`` if it is a file of ours; None when absent, foreign or unreadable."""
    try:
        if path.stat().st_uid != os.getuid():
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_control(paused: bool, until: float | None = None, directory: pathlib.Path | None = None) -> dict[str, Any]:
    """Record the volunteer's pause (``until``: epoch seconds of the automatic resume) or its end."""
    d = _ensure_dir(directory or control_dir())
    data = {"paused": bool(paused), "until": until if paused else None, "time": time.time()}
    _write_json(d / CONTROL_FILE, data)
    return data


def read_control(directory: pathlib.Path | None = None) -> dict[str, Any]:
    return _read_json((directory or control_dir()) / CONTROL_FILE) or {"paused": False}


def control_reason(ctl: dict[str, Any], now: float) -> str | None:
    """Why the volunteer's own pause stops work now, or None (not paused, or its --for has run out)."""
    if not ctl.get("paused"):
        return None
    until = ctl.get("until")
    if until is None:
        return "paused by the volunteer (depin pause)"
    try:
        until = float(until)
    except (TypeError, ValueError):
        return "paused by the volunteer (depin pause)"
    if now >= until:
        return None
    return f"paused by the volunteer until {time.strftime('%H:%M:%S', time.localtime(until))} (depin pause --for)"


def write_worker_state(state: dict[str, Any], directory: pathlib.Path | None = None) -> None:
    d = _ensure_dir(directory or control_dir())
    _write_json(d / f"worker-{os.getpid()}.json", {**state, "pid": os.getpid(), "time": time.time()})


def remove_worker_state(directory: pathlib.Path | None = None) -> None:
    try:
        ((directory or control_dir()) / f"worker-{os.getpid()}.json").unlink()
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_states(directory: pathlib.Path | None = None) -> list[dict[str, Any]]:
    """The states the running workers of this control directory last wrote (dead ones are skipped)."""
    d = directory or control_dir()
    out = []
    for p in sorted(d.glob("worker-*.json")) if d.is_dir() else ():
        s = _read_json(p)
        if s and isinstance(s.get("pid"), int) and _alive(s["pid"]):
            out.append(s)
    return out


# ------------------------------------------------------------------ parsing

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(d|h|m|s|ms)")
_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(text: str) -> float:
    """Seconds in "30m", "2h", "1h30m", "90s", "1.5h", "2 hours" (a unit is required); > 0."""
    t = str(text).strip().lower()
    compact = t.replace(" ", "")
    seconds: float | None = None
    if compact and _DURATION_PART.sub("", compact) == "":
        seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(compact))
    elif t and not re.fullmatch(r"[\d.]+", t):
        import dask.utils

        try:
            seconds = float(dask.utils.parse_timedelta(t))
        except (ValueError, KeyError, TypeError):
            seconds = None
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise DepinUsageError(f"{text!r} is not a duration: give one with a unit, such as 30m, 2h or 1h30m")
    return seconds


def _minute(hhmm: str, text: str) -> int:
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", hhmm.strip())
    if not m or int(m.group(2)) > 59 or int(m.group(1)) > 24 or (int(m.group(1)) == 24 and int(m.group(2))):
        raise DepinUsageError(f"--hours {text!r}: {hhmm.strip()!r} is not a time of day (HH:MM, 00:00-24:00)")
    return int(m.group(1)) * 60 + int(m.group(2))


def parse_hours(text: str) -> list[tuple[int, int]]:
    """Windows of local time as (start, end) minutes of the day from "22:00-07:00" or "9:00-12:00,14:00-18:00".

    A window whose end is before its start runs across midnight. An empty window (start == end) is refused.
    """
    windows = []
    for part in str(text).split(","):
        if not part.strip():
            continue
        if part.count("-") != 1:
            raise DepinUsageError(f"--hours {text!r}: give windows as HH:MM-HH:MM, e.g. 22:00-07:00")
        a, b = part.split("-")
        start, end = _minute(a, text) % 1440, _minute(b, text)
        end = end if end == 1440 else end % 1440
        if start == end % 1440 and end != 1440:
            raise DepinUsageError(f"--hours {text!r}: the window {part.strip()} is empty")
        windows.append((start, end))
    if not windows:
        raise DepinUsageError(f"--hours {text!r}: give windows as HH:MM-HH:MM, e.g. 22:00-07:00")
    return windows


def in_hours(windows: Iterable[tuple[int, int]], minute_of_day: int) -> bool:
    """Whether ``minute_of_day`` (0-1439) falls inside one of the windows (end excluded)."""
    for start, end in windows:
        if start < end:
            if start <= minute_of_day < end:
                return True
        elif minute_of_day >= start or minute_of_day < end:  # across midnight
            return True
    return False


def hours_reason(windows: list[tuple[int, int]], text: str, now: float) -> str | None:
    lt = time.localtime(now)
    return None if in_hours(windows, lt.tm_hour * 60 + lt.tm_min) else f"outside hours {text}"


def parse_gpu_indices(value: Any, option: str = "--exclude-gpus") -> list[str]:
    """Device indices from "1,2", [1, 2] or None/"" (none)."""
    if value is None or value == "":
        return []
    items = [str(v).strip() for v in (value if isinstance(value, (list, tuple)) else str(value).split(","))]
    items = [i for i in items if i]
    if not all(i.isdigit() for i in items):
        raise DepinUsageError(f"{option} {value!r}: give device indices such as 1,2")
    return items


def cuda_visible_devices(visible_env: str | None, device_count: int, wanted: list[str] | None,
                         exclude: list[str]) -> list[str]:
    """The devices dask-cuda may use: those visible, narrowed to ``wanted`` (None or []: all), minus ``exclude``.

    Indices name the same devices as ``CUDA_VISIBLE_DEVICES`` entries (when it is set) or as nvidia-smi
    (`depin worker` sets ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` unless it is set already).
    """
    if visible_env is not None and visible_env.strip() != "":
        visible = [v.strip() for v in visible_env.split(",") if v.strip()]
    else:
        visible = [str(i) for i in range(device_count)]
    chosen = [v for v in visible if v in wanted] if wanted else visible
    if wanted:
        missing = [w for w in wanted if w not in visible]
        if missing:
            raise DepinUsageError(f"--gpus: device(s) {','.join(missing)} are not visible here "
                                  f"(visible: {','.join(visible) or 'none'})")
    left = [v for v in chosen if v not in set(exclude)]
    if not left:
        raise DepinUsageError(f"--exclude-gpus {','.join(exclude)} leaves no GPU to share (visible: "
                              f"{','.join(visible) or 'none'}); use --gpus none for a CPU worker")
    return left


# ------------------------------------------------------------------ NVML


def _nvml() -> Any | None:
    """The initialised pynvml module, or None when NVML (nvidia-ml-py) or the driver is absent."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # noqa: BLE001 - not installed, no driver, no GPU
        return None


def _handle(nvml: Any, device: str) -> Any:
    if device.isdigit():
        return nvml.nvmlDeviceGetHandleByIndex(int(device))
    return nvml.nvmlDeviceGetHandleByUUID(device)


def gpu_util_by_others(nvml: Any, device: str, own_pids: set[int], own_busy: bool) -> tuple[float, str] | None:
    """(utilization percent of ``device`` by processes other than ours, how it was read), or None if unknown.

    Per-process samples (``nvmlDeviceGetProcessUtilization``) exclude our own processes. Where the driver
    does not give them, the device's total utilization is used, and only while this worker runs nothing
    (its own work would otherwise pause it).
    """
    try:
        h = _handle(nvml, device)
    except Exception:  # noqa: BLE001
        return None
    try:
        since = int((time.time() - 2.0) * 1e6)
        samples = nvml.nvmlDeviceGetProcessUtilization(h, since)
        by_pid: dict[int, float] = {}
        for s in samples:
            by_pid[int(s.pid)] = max(by_pid.get(int(s.pid), 0.0), float(s.smUtil))
        return sum(v for p, v in by_pid.items() if p not in own_pids), "per-process"
    except Exception:  # noqa: BLE001, S110 - not supported or no samples: whole device
        pass
    if own_busy:
        return None
    try:
        return float(nvml.nvmlDeviceGetUtilizationRates(h).gpu), "device"
    except Exception:  # noqa: BLE001
        return None


def set_power_limits(devices: list[str], watts: float) -> list[str]:
    """Set an NVML power limit of ``watts`` on each device; one plain sentence per device on what happened."""
    nvml = _nvml()
    if nvml is None:
        return [(f"--max-power {watts:g}: NVML is not available here (pip install nvidia-ml-py, and an NVIDIA "
                 f"driver); no power limit was set")]
    out = []
    for d in devices:
        try:
            h = _handle(nvml, d)
            lo, hi = nvml.nvmlDeviceGetPowerManagementLimitConstraints(h)
            mw = int(min(max(watts * 1000, lo), hi))
            nvml.nvmlDeviceSetPowerManagementLimit(h, mw)
            note = "" if mw == int(watts * 1000) else f" (clamped to what the card allows, {lo / 1000:g}-{hi / 1000:g} W)"
            out.append(f"GPU {d}: power limit set to {mw / 1000:g} W{note}; it stays until changed or reboot")
        except Exception as e:  # noqa: BLE001 - usually NVML_ERROR_NO_PERMISSION: needs root
            out.append(f"GPU {d}: could not set a {watts:g} W power limit ({type(e).__name__}: {e}); as root: "
                       f"nvidia-smi -i {d} -pl {watts:g}")
    return out


# ------------------------------------------------------------------ idle signal


class IdleSignal:
    """Whether the machine is busy with its owner's work (see the module docstring for what is read)."""

    def __init__(self, signal_file: str | None, idle_after: float, gpu_util: float, devices: list[str]) -> None:
        self.signal_file = pathlib.Path(os.path.expanduser(signal_file)) if signal_file else None
        self.idle_after = idle_after
        self.gpu_util = gpu_util
        self.devices = devices
        self.xprintidle = shutil.which("xprintidle") if os.environ.get("DISPLAY") else None
        self.nvml = None if self.signal_file else _nvml()

    def sources(self) -> list[str]:
        if self.signal_file:
            return [f"the idle-signal file {self.signal_file}"]
        out = []
        if self.xprintidle:
            out.append(f"keyboard/mouse idle time (xprintidle; idle after {self.idle_after:g}s)")
        if self.nvml is not None:
            out.append(f"GPU use by other processes (NVML; busy above {self.gpu_util:g}%)")
        return out

    def busy(self, own_busy: bool = False) -> str | None:
        if self.signal_file:
            try:
                word = self.signal_file.read_text().strip().lower()
            except OSError:
                word = ""
            return None if word == "idle" else f"the machine is busy (idle signal: {word or 'missing'})"
        if self.xprintidle:
            try:
                ms = int(subprocess.run([self.xprintidle], check=False, capture_output=True, text=True, timeout=2).stdout)
                if ms < self.idle_after * 1000:
                    return f"the machine is in use (keyboard/mouse active {ms / 1000:.0f}s ago)"
            except (OSError, ValueError, subprocess.SubprocessError):
                return "the machine may be in use (xprintidle failed)"
        if self.nvml is not None:
            devices = self.devices or [str(i) for i in range(self.nvml.nvmlDeviceGetCount())]
            for d in devices:
                got = gpu_util_by_others(self.nvml, d, {os.getpid(), os.getppid()}, own_busy)
                if got is not None and got[0] > self.gpu_util:
                    return f"the machine is busy (GPU {d}: {got[0]:.0f}% used by other programs)"
        return None


# ------------------------------------------------------------------ all reasons together


@dataclass
class Controls:
    """The volunteer's settings (config depin.volunteer.*) and the reasons they give to take no work now."""

    hours: str | None = None
    when_idle: bool = False
    max_gpu_util: float | None = None
    devices: list[str] = field(default_factory=list)   # this worker's GPUs (NVML index or UUID)
    directory: pathlib.Path | None = None
    idle: IdleSignal | None = None
    windows: list[tuple[int, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_config(cls, devices: list[str] | None = None) -> Controls:
        from depin_jupyter import config

        c = cls(hours=config.get("volunteer.hours") or None, when_idle=bool(config.get("volunteer.when-idle")),
                max_gpu_util=config.get("volunteer.max-gpu-util"), devices=list(devices or []),
                directory=control_dir())
        if c.hours:
            c.windows = parse_hours(c.hours)
        if c.when_idle:
            c.idle = IdleSignal(config.get("volunteer.idle-signal-file"), config.seconds("volunteer.idle-after") or 0,
                                float(config.get("volunteer.idle-gpu-util")), c.devices)
        return c

    def check(self, gpu_worker: bool) -> list[str]:
        """Problems to report (and notes) at start; raises DepinUsageError when a setting cannot work."""
        notes = []
        if self.when_idle and self.idle is not None:
            src = self.idle.sources()
            if not src:
                raise DepinUsageError(
                    "--when-idle: no idle signal can be read here (no xprintidle with a $DISPLAY, no NVML). "
                    "Point depin.volunteer.idle-signal-file at a file your own tool writes 'idle' or 'busy' to.")
            notes.append("takes work only while idle, judged by " + " and ".join(src))
        if self.max_gpu_util is not None:
            if not gpu_worker:
                notes.append(f"--max-gpu-util {self.max_gpu_util:g}: this is a CPU worker; nothing to watch")
            elif _nvml() is None:
                notes.append(f"--max-gpu-util {self.max_gpu_util:g}: NVML is not available (pip install "
                             f"nvidia-ml-py); GPU utilization cannot be read, so this limit is NOT applied")
            else:
                notes.append(f"pauses while other programs use more than {self.max_gpu_util:g}% of its GPU")
        if self.hours:
            notes.append(f"takes work only during {self.hours} (local time)")
        return notes

    def reasons(self, now: float | None = None, own_busy: bool = False) -> list[str]:
        """Every reason to take no new work now; empty: the worker may work."""
        now = time.time() if now is None else now
        out = []
        r = control_reason(read_control(self.directory), now)
        if r:
            out.append(r)
        if self.windows:
            r = hours_reason(self.windows, str(self.hours), now)
            if r:
                out.append(r)
        if self.idle is not None:
            r = self.idle.busy(own_busy)
            if r:
                out.append(r)
        if self.max_gpu_util is not None and self.devices:
            nvml = _nvml()
            for d in self.devices if nvml is not None else ():
                got = gpu_util_by_others(nvml, d, {os.getpid(), os.getppid()}, own_busy)
                if got is not None and got[0] > self.max_gpu_util:
                    out.append(f"GPU {d} is {got[0]:.0f}% busy with other programs (--max-gpu-util "
                               f"{self.max_gpu_util:g})")
        return out


# ------------------------------------------------------------------ speed and credit

def _numpy_workload() -> float:
    import numpy as np

    rng = np.random.default_rng(12345)
    a = rng.standard_normal(200_000)
    s = 0.0
    for _ in range(60):
        b = np.sort(a)
        s += float(np.sin(b).sum() + np.cumsum(b)[-1])
        a = a[::-1].copy()
    return s


def _cupy_workload() -> float:
    import cupy

    rng = cupy.random.default_rng(12345)
    a = rng.standard_normal((2048, 2048), dtype=cupy.float32)
    for _ in range(50):
        a = cupy.tanh(a @ a / 2048.0)
    cupy.cuda.Device().synchronize()
    return float(a.sum())


def benchmark(gpu: bool = False, repeat: int = 3) -> dict[str, Any]:
    """Time the fixed workload (cupy on a GPU worker, numpy otherwise): the best of ``repeat`` runs."""
    kind, work = "numpy", _numpy_workload
    if gpu:
        try:
            import cupy  # noqa: F401

            kind, work = "cupy", _cupy_workload
            work()  # warm-up: compile kernels, allocate
        except Exception:  # noqa: BLE001 - no usable cupy: time numpy
            kind, work = "numpy", _numpy_workload
    best = math.inf
    for _ in range(repeat):
        t0, w0 = time.thread_time(), time.perf_counter()
        work()
        # thread time for numpy (immune to other processes on the machine); wall time for the GPU
        took = (time.thread_time() - t0) if kind == "numpy" else (time.perf_counter() - w0)
        best = min(best, took)
    return {"kind": kind, "seconds": best, "reference_seconds": REFERENCE_SECONDS[kind],
            "factor": speed_factor({"kind": kind, "seconds": best})}


_bench_cache: dict[bool, dict[str, Any]] = {}


def cached_benchmark(gpu: bool) -> dict[str, Any]:
    """The speed benchmark of this process, run once (see `benchmark`); a CPU worker takes the one its
    `depin worker` measured (config ``depin.volunteer.advert``) instead of measuring again."""
    from depin_jupyter import config

    if gpu not in _bench_cache:
        measured = None if gpu else (config.get("volunteer.advert") or {}).get("benchmark")
        _bench_cache[gpu] = dict(measured) if isinstance(measured, dict) else benchmark(gpu)
    return _bench_cache[gpu]
