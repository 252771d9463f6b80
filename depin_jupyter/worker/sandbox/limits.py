"""What one sandboxed cell may use (``depin.sandbox.*``), read from the settings."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["GiB", "Limits", "SandboxError", "gpu_host", "human_bytes"]


_DEFAULT_WALL = 3600.0


GiB = 2**30


class SandboxError(RuntimeError):
    """The sandbox could not be set up as configured (e.g. ``bubblewrap: true`` without a working bwrap)."""


def _bool_or_auto(value: Any, key: str) -> bool | str:
    if value is None or value == "auto":
        return "auto"
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "false", "no", "off"):
        return value.lower() in ("true", "yes", "on")
    raise ValueError(f"depin.sandbox.{key} must be true, false or auto, not {value!r}")


def gpu_host() -> bool:
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0"))


def _auto_memory() -> int | None:
    """8 GiB or 3/4 of the machine's memory, whichever is smaller; none where a GPU is present (CUDA
    reserves far more virtual address space than it uses, so RLIMIT_AS would break it)."""
    if gpu_host():
        return None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 16 * GiB
    return int(min(8 * GiB, total * 3 // 4))


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one sandboxed cell may use (``depin.sandbox.*``); None means no limit."""

    enabled: bool | str = "auto"       # auto: the caller decides (on for volunteer workers)
    memory: int | None = 8 * GiB      # bytes of address space the cell may add (RLIMIT_AS)
    wall_time: float | None = _DEFAULT_WALL  # seconds; also capped by the cell's --timeout/--max-runtime
    cpu_time: float | None = None      # seconds of CPU (RLIMIT_CPU)
    max_processes: int | None = 256    # processes and threads the cell may add (RLIMIT_NPROC)
    bubblewrap: bool | str = "auto"    # auto: use bwrap when it is on PATH and works; True: require it
    scratch_root: str | None = None    # where per-cell scratch directories are made (None: the temp dir)
    user: str | int | None = "nobody"  # a root worker runs cells as this user; None: never switch
    network: bool = False              # inside bubblewrap: False gives the cell no network at all
    wall_source: str = "depin.sandbox.wall-time"  # what set wall_time (for the message when it stops a cell)

    @classmethod
    def from_config(cls, spec: Mapping[str, Any] | None = None) -> Limits:
        """The limits from ``depin.sandbox.*`` (defaults where unset), narrowed by ``spec``'s timeouts."""
        import dask
        import dask.config

        class _Settings:  # each key looked up by its dotted path: DASK_DEPIN__SANDBOX__WALL_TIME sets
            # "wall_time", which only dask.config.get's own key matching finds for "wall-time"
            @staticmethod
            def get(key: str, default: Any = None) -> Any:
                return dask.config.get(f"depin.sandbox.{key}", default=default)

        cfg = _Settings()
        memory = cfg.get("memory", "auto")
        if memory == "auto":
            memory_b = _auto_memory()
        elif memory is None or memory is False or str(memory).lower() in ("null", "none", "false"):
            memory_b = None
        else:
            memory_b = int(dask.utils.parse_bytes(memory))
        wall = cfg.get("wall-time", "1h")
        cpu = cfg.get("cpu-time")
        nproc = cfg.get("max-processes", 256)
        limits = cls(
            enabled=_bool_or_auto(cfg.get("enabled", "auto"), "enabled"),
            memory=memory_b,
            wall_time=None if wall is None else float(dask.utils.parse_timedelta(wall, default="s")),
            cpu_time=None if cpu is None else float(dask.utils.parse_timedelta(cpu, default="s")),
            max_processes=None if nproc is None else int(nproc),
            bubblewrap=_bool_or_auto(cfg.get("bubblewrap", "auto"), "bubblewrap"),
            scratch_root=cfg.get("scratch-root"),
            user=cfg.get("user", "nobody"),
            network=bool(cfg.get("network", False)),
        )
        return limits.for_spec(spec) if spec else limits

    def for_spec(self, spec: Mapping[str, Any]) -> Limits:
        """These limits with the wall time capped by the cell's own --timeout/--max-runtime plus the
        cancel grace (the cell's own timer stops it first; the sandbox kills it if a C call holds on)."""
        import dask
        import dask.config

        grace = float(dask.utils.parse_timedelta(dask.config.get("depin.cancel-grace", "3s"), default="s"))
        wall, source = self.wall_time, self.wall_source
        for key, flag in (("timeout", "--timeout"), ("max_runtime", "--max-runtime")):
            value = spec.get(key)
            if value and (wall is None or value + grace < wall):
                wall, source = float(value) + grace, f"the cell's {flag} {value:g}s plus {grace:g}s grace"
        return dataclasses.replace(self, wall_time=wall, wall_source=source)

    def is_enabled(self, volunteer: bool) -> bool:
        """Whether cells run sandboxed: ``enabled`` itself, or for "auto" on volunteer workers only."""
        return volunteer if self.enabled == "auto" else bool(self.enabled)


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"
