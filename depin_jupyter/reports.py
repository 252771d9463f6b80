"""How shared records read to a person: a run's energy, a volunteer's ledger entry, a virtual lab's status.

The kernel (`%depin status`), the CLI (`depin credits`, `depin show`, `depin lab status`) and the server show
the same records; the formatting lives here once.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NOT_MEASURED", "energy_ledger_text", "energy_summary", "format_lab_status", "format_quota", "joules_text"]

NOT_MEASURED = "not measured"


def energy_summary(e: Any) -> str:
    """One line for `%depin status` and `depin show`: energy, power and CPU time, or why not measured."""
    if not isinstance(e, dict):
        return "-"
    cpu = f"CPU {float(e.get('cpu_seconds') or 0):.2f} s"
    joules = e.get("energy_j")
    if not isinstance(joules, (int, float)):
        return f"not measured ({e.get('reason', 'no power counter')}); {cpu}"
    parts = [f"{joules:.1f} J ({e.get('source')})"]
    if "gpu_power_mean_w" in e:
        parts.append(f"GPU mean {e['gpu_power_mean_w']:.0f} W, peak {e.get('gpu_power_peak_w', 0):.0f} W")
        if "gpu_util_mean" in e:
            parts.append(f"util {e['gpu_util_mean']:.0f}%")
    if "cpu_package_energy_j" in e:
        parts.append(f"CPU packages {e['cpu_package_energy_j']:.1f} J")
    return ", ".join(parts) + f"; {cpu}"


def joules_text(joules: float) -> str:
    """``12.3 J`` below a watt-hour, ``1.25 Wh`` from there on."""
    return f"{joules / 3600:.2f} Wh" if joules >= 3600 else f"{joules:.1f} J"


def energy_ledger_text(entry: Any) -> str:
    """A volunteer's energy in the coordinator's ledger (`depin credits`, `%depin status`).

    Measured joules, with how many tasks lacked a power counter if some did; "not measured" when none had
    one; "-" before any task reported.
    """
    if not isinstance(entry, dict):
        return "-"
    measured, unmeasured = int(entry.get("energy_tasks") or 0), int(entry.get("energy_unmeasured_tasks") or 0)
    if measured:
        text = joules_text(float(entry.get("energy_j") or 0.0))
        return text + (f" ({unmeasured} of {measured + unmeasured} tasks not measured)" if unmeasured else "")
    return NOT_MEASURED if unmeasured else "-"


def format_quota(quota: dict[str, float] | None) -> str:
    if not quota:
        return "-"
    return ",".join(f"{k}={int(v) if float(v).is_integer() else v}" for k, v in quota.items())


def format_lab_status(status: dict[str, Any]) -> str:
    """The educator's table: per student, connected, running/queued, seconds used today vs quota."""
    rows = [("student", "connected", "running", "queued", "GPU-s today", "CPU-s today", "quota")]
    for name, s in sorted(status.get("students", {}).items()):
        q = s.get("quota") or {}
        used = s.get("used") or {}

        def of(field: str, qk: str, q: dict[str, float] = q, used: dict[str, float] = used) -> str:
            v = f"{used.get(field, 0.0):.1f}"
            return f"{v}/{q[qk]:g}" if qk in q else v

        who = name + (" (educator)" if s.get("educator") else "") + (" (revoked)" if s.get("revoked") else "")
        rows.append((who, "yes" if s.get("connected") else "no", str(s.get("running", 0)), str(s.get("queued", 0)),
                     of("gpu_seconds", "gpu-seconds"), of("cpu_seconds", "cpu-seconds"), format_quota(q)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    head = (f"depin lab: {len(rows) - 1} student(s), day {status.get('day')} UTC ({status.get('reset')}); "
            f"over quota: {status.get('over_quota')}")
    lines = [head]
    lines += ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    return "\n".join(lines)
