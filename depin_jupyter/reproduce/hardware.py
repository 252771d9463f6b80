"""The hardware class of a run, from its manifest: what must match for two runs to be expected bit-identical.

As with BOINC's homogeneous redundancy, floating-point results are compared exactly only between runs of one
class (same CPU model, GPU model, GPU driver and CUDA runtime, Python and numerical library versions); across
classes a tolerance is the honest comparison (fused multiply-add, vector widths, library kernels differ).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["NUMERIC_LIBRARIES", "hardware_class", "same_class"]

NUMERIC_LIBRARIES = ("numpy", "cupy", "scipy", "dask", "numcodecs", "zarr")


def _gpu(worker: Mapping[str, Any]) -> Mapping[str, Any] | None:
    gpu = worker.get("gpu")
    if isinstance(gpu, Mapping):
        return gpu
    gpus = worker.get("gpus")
    if isinstance(gpus, list) and gpus and isinstance(gpus[0], Mapping):
        return gpus[0]
    return None


def hardware_class(manifest: Any) -> dict[str, Any]:
    """CPU and GPU model, GPU driver, CUDA runtime, Python and numerical library versions of a run, and
    ``class``: one string naming them all (equal strings: one hardware class)."""
    worker = dict(getattr(manifest, "worker", None) or {})
    env = dict(getattr(manifest, "environment", None) or {})
    packages = dict(env.get("packages") or {})
    gpu = _gpu(worker) or {}
    out: dict[str, Any] = {
        "cpu": worker.get("cpu") or worker.get("machine"),
        "gpu": gpu.get("name"),
        "gpu_driver": gpu.get("nvidia_driver") or gpu.get("driver"),
        "cuda_runtime": gpu.get("runtime"),
        "python": env.get("python") or worker.get("python"),
        "libraries": {k: packages[k] for k in NUMERIC_LIBRARIES if k in packages},
    }
    libs = ",".join(f"{k}={v}" for k, v in sorted(out["libraries"].items()))
    device = (f"GPU {out['gpu']} (driver {out['gpu_driver']}, CUDA {out['cuda_runtime']})" if out["gpu"]
              else "no GPU")
    out["class"] = f"CPU {out['cpu']}; {device}; Python {out['python']}; {libs}"
    return out


def same_class(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two `hardware_class` results are one class (and known: an unknown CPU matches nothing)."""
    return bool(a.get("cpu")) and a.get("class") == b.get("class")
