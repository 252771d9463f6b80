"""What the JupyterLab routes send: workers, trust and runs as plain JSON-able dicts (no NaN, no objects)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from depin_jupyter.protocol.constants import RUN_KEY_PREFIX

__all__ = ["duration", "elide_digests", "energy_fields", "finite", "run_record", "trust_record", "volunteer_name",
           "worker_label", "worker_record"]


# A volunteer's GPU workers are named "<certificate name>-<index>" (dask_cuda.CUDAWorker).
_GPU_SUFFIX = re.compile(r"^(?P<name>.+)-\d+$")


def volunteer_name(worker_name: str, gpu: bool, credits: Mapping[str, Any] | None) -> str:
    """The certificate name of the volunteer running a worker: its name, less the "-N" of a GPU worker."""
    if credits and worker_name in credits:
        return worker_name
    m = _GPU_SUFFIX.match(worker_name)
    return m.group("name") if m and gpu else worker_name


def worker_record(address: str, w: Mapping[str, Any], processing: Any = (), *,
                  credits: Mapping[str, Any] | None = None, volunteer: bool = False) -> dict[str, Any]:
    """One worker row: scheduler identity + NVML metrics (when the worker has a GPU) → panel fields.

    On a volunteer network (``volunteer``) the row also names the volunteer, what it advertised when it
    joined (``w["depin"]``: GPU or CPU, host) and its credit from the coordinator's ledger (``credits``:
    None when unknown, e.g. the coordinator did not answer).
    """
    metrics = w.get("metrics") or {}
    gpu = w.get("gpu") or {}               # distributed's NVML startup info: name, memory-total
    advertised: Mapping[str, Any] = w["depin"] if isinstance(w.get("depin"), Mapping) else {}
    adv_gpu: Mapping[str, Any] = advertised["gpu"] if isinstance(advertised.get("gpu"), Mapping) else {}
    adv_cpu: Mapping[str, Any] = advertised["cpu"] if isinstance(advertised.get("cpu"), Mapping) else {}
    if not gpu.get("name") and adv_gpu.get("name"):  # what the volunteer said it has (self-reported)
        gpu = {"name": adv_gpu.get("name"), "memory-total": adv_gpu.get("memory")}
    gpu_now = metrics.get("gpu") or {}     # NVML real-time metrics: utilization, memory-used
    task_counts = metrics.get("task_counts")
    counts: dict[str, Any] = task_counts if isinstance(task_counts, dict) else {}
    gpus = int((w.get("resources") or {}).get("GPU", 0) or 0) or (1 if gpu.get("name") else 0)
    keys = [str(k) for k in processing or ()]
    name = str(w.get("name", address))
    who = (str(w.get("depin_volunteer") or "") or volunteer_name(name, bool(gpus), credits)) if volunteer else None
    credit = None
    if who is not None and credits is not None:
        entry = credits.get(who)
        credit = dict(entry) if isinstance(entry, Mapping) else {}  # {}: known, nothing earned yet
    return {
        "address": address,
        "name": name,
        "host": w.get("host"),
        "status": w.get("status"),
        "nthreads": int(w.get("nthreads") or 0),
        "memory_limit": int(w.get("memory_limit") or 0) or None,
        "memory_used": metrics.get("memory"),
        "cpu_percent": metrics.get("cpu"),
        "gpus": gpus,
        "gpu_model": gpu.get("name"),
        "gpu_memory_total": gpu.get("memory-total"),
        "gpu_memory_used": gpu_now.get("memory-used"),
        "gpu_utilization": gpu_now.get("utilization"),
        "executing": int(counts.get("executing", 0) or 0),
        "depin_runs": sum(k.startswith(RUN_KEY_PREFIX) for k in keys),
        "cpu_model": adv_cpu.get("model"),
        "cpu_cores": adv_cpu.get("cores"),
        "advertised_host": advertised.get("host"),
        # Volunteer networks only: the certificate name, its reputation from replicated runs (see
        # `trust_record`) and its ledger entry (cpu_seconds, gpu_seconds, tasks, ...).
        "volunteer": who,
        "trust": w.get("depin_trust") if volunteer else None,
        "credit": credit,
    }


def trust_record(rep: Any) -> dict[str, Any]:
    """A volunteer's reputation as the panel shows it: counts, and whether it is trusted (spot-checked)."""
    from depin_jupyter import config

    rep = dict(rep) if isinstance(rep, Mapping) else {}
    streak = int(rep.get("streak", 0) or 0)
    return {"streak": streak, "valid": int(rep.get("valid", 0) or 0), "invalid": int(rep.get("invalid", 0) or 0),
            "checked": int(rep.get("checked", 0) or 0),
            "trusted": streak >= int(config.get("trust-streak"))}


def worker_label(worker: Mapping[str, Any] | None) -> str | None:
    if not worker:
        return None
    for key in ("name", "address", "host"):
        if worker.get(key):
            return str(worker[key])
    return None


def duration(timings: Mapping[str, Any]) -> float | None:
    """Wall time as the notebook saw it: total, else shipping + remote, else the cell's own run time."""
    t = {k: float(v) for k, v in timings.items() if isinstance(v, (int, float))}
    for key in ("total_s", "total"):
        if key in t:
            return t[key]
    if "remote_s" in t:
        return t["remote_s"] + t.get("ship_s", 0.0)
    return t.get("run_s")


def finite(value: Any) -> float | None:
    """A finite number as a float (JSON has no NaN or infinity), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def energy_fields(extra: Mapping[str, Any]) -> dict[str, Any]:
    """A run's energy for the panel, from the manifest's ``extra["energy"]`` (`persist.record`).

    ``energy_j``: joules the worker measured, or None (not measured, or no figures); ``energy``: the one
    line `reports.energy_summary` gives (None when the manifest has none: a run stored before energy was measured,
    or one that failed before the worker measured it); ``energy_reason``: why it was not measured.
    """
    e = extra.get("energy")
    if not isinstance(e, Mapping):
        return {"energy_j": None, "energy": None, "energy_reason": None, "gpu_power_mean_w": None}
    from depin_jupyter.reports import energy_summary as summary

    e = dict(e)
    joules = finite(e.get("energy_j"))
    try:
        text = summary(e)
    except (TypeError, ValueError):  # a figure that is not a number: say what there is, not fail the list
        text = f"{e.get('energy_j')} ({e.get('source') or e.get('reason') or 'no detail'})"
    reason = None
    if joules is None:
        reason = str(e.get("reason") or f"the worker reported no energy figure ({e.get('energy_j')!r})")
    return {"energy_j": joules, "energy": text, "energy_reason": reason,
            "gpu_power_mean_w": finite(e.get("gpu_power_mean_w"))}


def run_record(summary: Any, manifest: Any | None, problems: Mapping[str, list[str]] | None) -> dict[str, Any]:
    """One history row: the store's RunSummary, enriched from the manifest of a complete run.

    ``verified`` is None unless the request asked to verify (then: True when every chunk, the manifest
    and the ledger entry of the run re-hash to their digests). ``sealed``: the manifest matches its
    ledger entry, so the run is served. Energy (`energy_fields`) and ``pool`` (the pool the run was
    restricted to, None for any worker) come from the manifest's ``extra``.
    """
    worker = dict(manifest.worker) if manifest is not None else {}
    extra = dict(manifest.extra) if manifest is not None else {}
    gpus = worker.get("gpus") or []
    return {
        "run_id": summary.run_id,
        "name": summary.name,
        "status": summary.status,
        "complete": summary.complete,
        "sealed": summary.complete,
        "created": summary.created,
        "outputs": list(summary.outputs),
        "cache_key": summary.cache_key,
        "detail": summary.detail,
        "worker": worker_label(worker),
        "worker_address": worker.get("address"),
        "gpu": (gpus[0].get("name") if gpus and isinstance(gpus[0], dict) else None),
        "duration_s": duration(dict(manifest.timings)) if manifest is not None else None,
        "cached": bool(extra.get("cached") or extra.get("cached_from")),
        "verified": None if problems is None or not summary.complete else not problems.get(summary.run_id),
        "problems": (problems or {}).get(summary.run_id, []),
        **energy_fields(extra),
        "pool": str(extra["pool"]) if extra.get("pool") else None,
    }


def elide_digests(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest with each per-chunk digest map replaced by its count (`full=1` keeps them)."""
    def shorten(rec: Mapping[str, Any]) -> dict[str, Any]:
        rec = dict(rec)
        if isinstance(rec.get("chunk_digests"), Mapping):
            rec["chunk_digests"] = len(rec["chunk_digests"])
        if isinstance(rec.get("variables"), Mapping):
            rec["variables"] = {k: shorten(v) for k, v in rec["variables"].items()}
        return rec

    return {**doc, "outputs": {k: shorten(v) for k, v in (doc.get("outputs") or {}).items()}}
