"""GPU detection that never raises, and the array module a cell should use (cupy or numpy)."""

from __future__ import annotations

import functools
from types import ModuleType

__all__ = ["detect", "array_module"]


@functools.lru_cache(maxsize=1)
def detect() -> tuple[int, str]:
    """(number of usable CUDA GPUs, a sentence saying why when it is 0)."""
    try:
        import cupy
    except ImportError:
        return 0, "cupy is not installed (install the GPU extra: pip install 'depin-jupyter[gpu]')"
    try:
        if not cupy.cuda.is_available():
            return 0, "cupy found no usable CUDA device or driver"
        n = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as e:  # noqa: BLE001 - no driver, broken runtime, NVML errors...
        return 0, f"CUDA is not usable here ({type(e).__name__}: {e})"
    if n == 0:
        return 0, "no CUDA device is visible"
    try:
        import dask_cuda  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return 0, f"{n} GPU(s) found but dask-cuda cannot be imported ({e}); pip install 'depin-jupyter[gpu]'"
    return n, f"{n} CUDA GPU(s) found"


def array_module() -> ModuleType:
    """cupy where this process can use a GPU, numpy otherwise: write a cell once for both."""
    try:
        import cupy

        if cupy.cuda.is_available() and cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # noqa: BLE001, S110
        pass
    import numpy

    return numpy


def describe() -> dict[str, object] | None:
    """This process's first visible GPU (name, memory in bytes, compute capability, CUDA driver API and runtime
    versions, NVIDIA driver version), or None.

    Run on a worker through `Client.run`: dask-cuda orders CUDA_VISIBLE_DEVICES so that device 0 is the
    worker's own GPU.
    """
    try:
        import cupy

        if not cupy.cuda.is_available() or cupy.cuda.runtime.getDeviceCount() == 0:
            return None
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"]
        return {
            "name": name.decode() if isinstance(name, bytes) else str(name),
            "memory": int(props["totalGlobalMem"]),
            "arch": float(f"{props['major']}.{props['minor']}"),
            "driver": int(cupy.cuda.runtime.driverGetVersion()),
            "runtime": int(cupy.cuda.runtime.runtimeGetVersion()),
            "nvidia_driver": _nvidia_driver(),
        }
    except Exception:  # noqa: BLE001 - no cupy, no driver: no GPU to describe
        return None


def _nvidia_driver() -> str | None:
    """The NVIDIA driver's version string (e.g. 550.54.15) through NVML, or None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else str(v)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML: the CUDA driver API version above still names the driver
        return None
