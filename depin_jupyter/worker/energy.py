"""Energy a cell used, measured on the worker while it runs, never estimated.

`measure()` is a context manager around the cell; the dict it yields is filled in when the cell ends:

* always: ``wall_seconds`` and ``cpu_seconds`` (CPU time of the cell's thread, or of the whole process in
  a sandboxed child, which runs nothing but the cell: ``cpu_scope`` says which);
* on a GPU worker with NVML (``pynvml`` from nvidia-ml-py): a sampler thread reads the board power of
  the worker's GPU every ``depin.energy.interval`` (default 0.1 s) and its utilization: ``gpu_energy_j``
  (from the driver's energy counter where the GPU has one, else the integral of the samples),
  ``gpu_power_mean_w``, ``gpu_power_peak_w``, ``gpu_util_mean`` (%) and ``gpu_samples``. The board
  draws this power whatever runs on it: other programs on that GPU are counted too;
* on a CPU worker where ``/sys/class/powercap/intel-rapl:N/energy_uj`` is readable (Intel and recent AMD
  CPUs on Linux; often root only): ``cpu_package_energy_j`` of all CPU packages, i.e. of the whole
  machine's CPUs during the cell, not of the cell alone.

``energy_j`` is the sum of what was measured, with ``source`` ("nvml", "rapl" or both). When nothing could
be measured, ``energy_j`` is the string ``"not measured"`` and ``reason`` says why. All figures are
reported by the volunteer's own worker: self-reported, like credit.
"""

from __future__ import annotations

import contextlib
import glob
import os
import resource
import threading
import time
from collections.abc import Iterator
from typing import Any

from depin_jupyter.reports import NOT_MEASURED

__all__ = ["measure", "rapl_domains"]
_RAPL_GLOB = "/sys/class/powercap/intel-rapl:*"


def _cpu_time(whole_process: bool) -> float:
    if whole_process:
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    return time.thread_time()


# ------------------------------------------------------------------ RAPL (CPU packages)

def rapl_domains(pattern: str = _RAPL_GLOB) -> tuple[list[tuple[str, int]], str | None]:
    """([(energy_uj path, max range µJ)] of each CPU package, None) or ([], why they cannot be read)."""
    dirs = sorted(d for d in glob.glob(pattern) if os.path.basename(d).count(":") == 1)  # packages, not subzones
    if not dirs:
        return [], "no RAPL power counters on this machine (/sys/class/powercap/intel-rapl:*)"
    out = []
    for d in dirs:
        try:
            with open(os.path.join(d, "energy_uj")) as f:
                int(f.read())
        except (OSError, ValueError) as e:
            return [], f"the RAPL counters are not readable by this user ({type(e).__name__}: {d}/energy_uj)"
        try:
            with open(os.path.join(d, "max_energy_range_uj")) as f:
                top = int(f.read())
        except (OSError, ValueError):
            top = 0
        out.append((os.path.join(d, "energy_uj"), top))
    return out, None


def _rapl_read(domains: list[tuple[str, int]]) -> list[int] | None:
    try:
        values = []
        for path, _ in domains:
            with open(path) as f:
                values.append(int(f.read()))
        return values
    except (OSError, ValueError):
        return None


def _rapl_joules(domains: list[tuple[str, int]], before: list[int], after: list[int]) -> float:
    total = 0
    for (_, top), a, b in zip(domains, before, after):
        d = b - a
        if d < 0 and top:  # the counter wrapped around
            d += top
        total += max(0, d)
    return total / 1e6


# ------------------------------------------------------------------ NVML (GPU board power)

def _nvml_handle() -> tuple[Any, Any, str | None]:
    """(pynvml, handle of this worker's GPU, None) or (None, None, why not)."""
    try:
        import pynvml
    except ImportError:
        return None, None, "NVML is not available (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - no driver
        return None, None, f"NVML could not start ({type(e).__name__}: {e})"
    try:  # the worker's GPU is CUDA device 0 of this process (dask-cuda orders CUDA_VISIBLE_DEVICES so)
        import cupy

        bus = cupy.cuda.Device(0).pci_bus_id
        return pynvml, pynvml.nvmlDeviceGetHandleByPciBusId(bus.encode() if isinstance(bus, str) else bus), None
    except Exception:  # noqa: BLE001, S110 - no cupy: the first visible device by index or UUID
        pass
    first = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip() or "0"
    try:
        if first.isdigit():
            return pynvml, pynvml.nvmlDeviceGetHandleByIndex(int(first)), None
        return pynvml, pynvml.nvmlDeviceGetHandleByUUID(first), None
    except Exception as e:  # noqa: BLE001
        return None, None, f"NVML found no GPU {first!r} ({type(e).__name__}: {e})"


class _GpuSampler:
    """Samples the board power and utilization of one GPU in a thread while the cell runs."""

    def __init__(self, nvml: Any, handle: Any, interval: float) -> None:
        self.nvml, self.handle, self.interval = nvml, handle, interval
        self.samples: list[tuple[float, float, float | None]] = []   # (time, watts, util %)
        self._stop = threading.Event()
        self.counter0 = self._counter()
        self.t0 = time.perf_counter()
        self._sample()
        self.thread = threading.Thread(target=self._loop, name="depin-energy", daemon=True)
        self.thread.start()

    def _counter(self) -> float | None:
        try:
            return float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)) / 1000.0  # mJ -> J
        except Exception:  # noqa: BLE001 - older GPUs have no energy counter
            return None

    def _sample(self) -> None:
        try:
            watts = float(self.nvml.nvmlDeviceGetPowerUsage(self.handle)) / 1000.0  # mW
        except Exception:  # noqa: BLE001
            return
        try:
            util: float | None = float(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
        except Exception:  # noqa: BLE001
            util = None
        self.samples.append((time.perf_counter(), watts, util))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self.thread.join(2.0)
        self._sample()
        counter1 = self._counter()
        if not self.samples:
            return {"gpu_reason": "NVML gave no power readings for this GPU"}
        watts = [w for _, w, _ in self.samples]
        utils = [u for _, _, u in self.samples if u is not None]
        if self.counter0 is not None and counter1 is not None and counter1 >= self.counter0:
            joules, how = counter1 - self.counter0, "energy counter"
        else:  # trapezoids between samples
            joules = sum((t1 - t0) * (w0 + w1) / 2 for (t0, w0, _), (t1, w1, _) in zip(self.samples, self.samples[1:]))
            how = "integrated power samples"
        out: dict[str, Any] = {"gpu_energy_j": joules, "gpu_energy_method": how,
                               "gpu_power_mean_w": sum(watts) / len(watts), "gpu_power_peak_w": max(watts),
                               "gpu_samples": len(self.samples)}
        if utils:
            out["gpu_util_mean"] = sum(utils) / len(utils)
        try:
            name = self.nvml.nvmlDeviceGetName(self.handle)
            out["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # noqa: BLE001, S110
            pass
        return out


# ------------------------------------------------------------------ the measurement

@contextlib.contextmanager
def measure(gpu: bool = False, whole_process: bool = False, interval: float | None = None) -> Iterator[dict[str, Any]]:
    """Measure what runs inside the block; the yielded dict is filled in when it ends (see module doc).

    ``gpu``: this worker has a GPU (sample it with NVML); ``whole_process``: the process runs only this
    cell (a sandboxed child), so its whole CPU time is the cell's.
    """
    out: dict[str, Any] = {}
    reasons: list[str] = []
    sampler = None
    if gpu:
        if interval is None:  # only a GPU is sampled (and a CPU-only sandboxed cell does not import Dask)
            try:
                from depin_jupyter import config

                interval = config.seconds("energy.interval") or 0.1
            except Exception:  # noqa: BLE001 - a bare child without the config: the default
                interval = 0.1
        nvml, handle, why = _nvml_handle()
        if handle is not None:
            sampler = _GpuSampler(nvml, handle, float(interval))
        else:
            reasons.append(why or "NVML is not available")
    domains, why = rapl_domains()
    if why:
        reasons.append(why)
    rapl0 = _rapl_read(domains) if domains else None
    cpu0, t0 = _cpu_time(whole_process), time.perf_counter()
    try:
        yield out
    finally:
        out["wall_seconds"] = time.perf_counter() - t0
        out["cpu_seconds"] = max(0.0, _cpu_time(whole_process) - cpu0)
        out["cpu_scope"] = "the cell's process" if whole_process else "the cell's thread"
        sources, total = [], 0.0
        if sampler is not None:
            g = sampler.stop()
            out.update(g)
            if "gpu_energy_j" in g:
                sources.append("nvml")
                total += g["gpu_energy_j"]
            else:
                reasons.append(g.get("gpu_reason", "no GPU power readings"))
        rapl1 = _rapl_read(domains) if rapl0 is not None else None
        if rapl0 is not None and rapl1 is not None:
            out["cpu_package_energy_j"] = _rapl_joules(domains, rapl0, rapl1)
            out["cpu_package_scope"] = "all CPU packages of the machine, every process"
            sources.append("rapl")
            total += out["cpu_package_energy_j"]
        if sources:
            out["energy_j"] = total
            out["source"] = "+".join(sources)
            if out["wall_seconds"] > 0:
                out["power_mean_w"] = total / out["wall_seconds"]
        else:
            out["energy_j"] = NOT_MEASURED
            out["reason"] = "; ".join(reasons) or "no power counter available"


