"""`depin doctor`: what this machine can do as a volunteer or a scientist's kernel, each gap with its fix.

Checks, in order: versions, the sandbox (bubblewrap, the user cells run as, a real sandboxed probe cell),
GPUs (CUDA through cupy, dask-cuda, NVML), and with ``--scheduler TOKEN`` the coordinator (reachable,
round-trip time, clock skew, versions against its own). Exit status 1 when any check fails, 0 otherwise
(warnings included), so scripts can gate on it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any

import click

from depin_jupyter.cli.group import main

__all__ = ["Check", "checks"]

_SKEW_WARN_S = 2.0    # tokens, reservations and expiry compare clocks: a few seconds is harmless
_SKEW_FAIL_S = 300.0  # certificates are checked against the clock: minutes of skew break TLS


@dataclasses.dataclass
class Check:
    """One line of the report: ``status`` is ok, warn, fail or info; ``fix`` what to do when not ok."""

    name: str
    status: str
    detail: str
    fix: str = ""


def _local_versions() -> list[Check]:
    from depin_jupyter.protocol.versions import stack_versions

    v = stack_versions()
    missing = [d for d in ("dask", "distributed", "numpy", "zarr") if d not in v]
    detail = ", ".join(f"{k} {val}" for k, val in v.items())
    if missing:
        return [Check("versions", "fail", f"{', '.join(missing)} not installed ({detail})",
                      f"pip install -e '.[test]' (or pip install depin-jupyter) in {sys.prefix}")]
    return [Check("versions", "ok", detail)]


def _sandbox(probe_cell: bool) -> list[Check]:
    from depin_jupyter.worker import probe
    from depin_jupyter.worker.sandbox import Limits, describe

    limits = Limits.from_config()
    d = describe(limits)
    out = []
    bw = d["bubblewrap"]
    if bw["active"]:
        out.append(Check("bubblewrap", "ok", bw["why"]))
    else:
        out.append(Check("bubblewrap", "warn", bw["why"],
                         "apt-get install bubblewrap (Debian/Ubuntu) or dnf install bubblewrap: cells then see a "
                         "read-only file system without home directories or network"))
    user = d["user"]
    out.append(Check("sandbox user", "ok" if user["switch"] or os.geteuid() != 0 else "warn", user["why"],
                     "" if user["switch"] or os.geteuid() != 0 else "set depin.sandbox.user (default nobody)"))
    if not probe_cell:
        return out
    from depin_jupyter.gpu import detect
    from depin_jupyter.worker.early import advertised_versions

    modules = set(advertised_versions())
    report = probe.probe(modules, gpu=bool(detect()[0]))
    if not report.usable:
        out.append(Check("sandbox probe", "fail", "a sandboxed cell cannot run here: "
                         + (report.failure or report.errors.get("numpy", "")), probe.fix_for(report)))
        return out
    detail = f"a sandboxed cell (uid {report.uid}) imports numpy and draws random numbers"
    if report.missing:
        detail += (f"; {len(report.missing)} of {len(modules)} installed modules cannot be found from the sandbox "
                   f"({', '.join(sorted(report.missing)[:6])}{' ...' if len(report.missing) > 6 else ''})")
    out.append(Check("sandbox probe", "ok", detail))
    if "cupy" in report.errors:
        out.append(Check("cupy in the sandbox", "fail", report.errors["cupy"],
                         "install bubblewrap (the GPU devices are bound into it) or check the CUDA libraries' "
                         "permissions"))
    return out


def _gpus() -> list[Check]:
    from depin_jupyter.gpu import describe, detect

    n, why = detect()
    if not n:
        return [Check("gpu", "info", f"none: {why}; this machine serves CPU cells (numpy)",
                      "for GPU cells: an NVIDIA driver and pip install 'depin-jupyter[gpu]'")]
    info: dict[str, Any] = dict(describe() or {})
    out = [Check("gpu", "ok", f"{why}: {info.get('name', '?')}, {int(info.get('memory') or 0) / 2**30:.0f} GiB, "
                 f"compute capability {info.get('arch', '?')}")]
    out.append(Check("cuda", "ok", f"driver API {info.get('driver')}, runtime {info.get('runtime')}"))
    if info.get("nvidia_driver"):
        out.append(Check("nvml", "ok", f"NVIDIA driver {info['nvidia_driver']}"))
    else:
        out.append(Check("nvml", "warn", "NVML is not usable: no energy figures, no idle detection by GPU use",
                         "pip install nvidia-ml-py"))
    return out


def _coordinator(token_text: str) -> list[Check]:
    import asyncio

    from depin_jupyter.protocol.identity import Token

    try:
        token = Token.decode(token_text)
    except Exception as e:  # noqa: BLE001 - a bad token is this check's finding
        return [Check("coordinator", "fail", f"not a depin token: {e}", "pass the token `depin token issue` printed")]
    role = token.info.role or "client"
    try:
        token.check_valid(role)
    except Exception as e:  # noqa: BLE001 - expired, wrong role
        return [Check("token", "fail", str(e), "ask the coordinator for a new token")]
    try:
        hello, rtts, t_mid = asyncio.run(_hello(token, role))
    except Exception as e:  # noqa: BLE001 - unreachable, refused: the finding
        return [Check("coordinator", "fail", f"{token.address} did not answer ({type(e).__name__}: {e})",
                      "check that `depin scheduler` runs there, that its port is reachable from here "
                      "(firewall, NAT), and that the token is not revoked")]
    out = [Check("token", "ok", f"{role} {token.info.name!r}, valid")]
    rtt = statistics.median(rtts)
    out.append(Check("coordinator", "ok", f"{token.address} answers; round trip {rtt * 1000:.1f} ms "
                     f"(median of {len(rtts)})"))
    if hello is None:
        out.append(Check("clock and versions", "warn", "the coordinator is an older depin without depin_hello",
                         "upgrade depin-jupyter on the coordinator"))
        return out
    skew = float(hello["time"]) - t_mid
    status = "ok" if abs(skew) < _SKEW_WARN_S else "warn" if abs(skew) < _SKEW_FAIL_S else "fail"
    out.append(Check("clock skew", status, f"this clock is {-skew:+.2f} s from the coordinator's (±{rtt / 2:.3f} s)",
                     "" if status == "ok" else "enable NTP on both machines (timedatectl set-ntp true)"))
    out += _compare_versions(dict(hello.get("versions") or {}))
    return out


async def _hello(token: Any, role: str) -> tuple[dict[str, Any] | None, list[float], float]:
    """(the coordinator's hello or None, round-trip times, local time at the hello's midpoint)."""
    from distributed.core import rpc

    args = token.security(role).get_connection_args(role)
    async with rpc(token.address, connection_args=args, timeout=15) as r:
        await r.identity()  # connect and hand-shake: not part of the round-trip figure
        rtts, hello, t_mid = [], None, time.time()
        for _ in range(5):
            t0 = time.time()
            try:
                hello = await r.depin_hello()
            except Exception:  # noqa: BLE001 - an older coordinator: time its identity op instead
                await r.identity()
            t1 = time.time()
            rtts.append(t1 - t0)
            t_mid = (t0 + t1) / 2
        return hello, rtts, t_mid


def _compare_versions(theirs: dict[str, str]) -> list[Check]:
    from depin_jupyter.protocol.versions import MUST_MATCH, stack_versions

    ours = stack_versions()
    bad = [f"{d} {ours.get(d, 'missing')} here, {theirs[d]} there" for d in MUST_MATCH
           if d in theirs and ours.get(d) != theirs[d]]
    py_ours, py_theirs = ours["python"].rsplit(".", 1)[0], str(theirs.get("python", "")).rsplit(".", 1)[0]
    out = []
    if bad:
        pins = " ".join(f"{d}=={theirs[d]}" for d in MUST_MATCH if d in theirs and ours.get(d) != theirs[d])
        out.append(Check("versions vs coordinator", "fail", "; ".join(bad), f"pip install {pins}"))
    else:
        out.append(Check("versions vs coordinator", "ok", "dask, distributed, depin-jupyter, msgpack and "
                         "cloudpickle match the coordinator's"))
    if py_theirs and py_ours != py_theirs:
        out.append(Check("python vs coordinator", "warn", f"Python {ours['python']} here, {theirs['python']} there",
                         f"use Python {py_theirs} so functions travel by value between both ends"))
    return out


def checks(token_text: str | None = None, probe_cell: bool = True) -> list[Check]:
    """Every check `depin doctor` makes, in order."""
    out = _local_versions() + _sandbox(probe_cell) + _gpus()
    if token_text:
        out += _coordinator(token_text)
    return out


_MARK = {"ok": "ok  ", "warn": "warn", "fail": "FAIL", "info": "--  "}


@main.command()
@click.option("--scheduler", "token_text", default=None, metavar="TOKEN",
              help="a worker or client token (or a file holding it): also check that coordinator")
@click.option("--no-probe", is_flag=True, help="skip the sandboxed probe cell (about a second)")
@click.option("--json", "as_json", is_flag=True, help="the checks as JSON")
def doctor(token_text: str | None, no_probe: bool, as_json: bool) -> None:
    """Check this machine for volunteering and for notebooks: each problem with its fix; exit 1 on failures."""
    found = checks(token_text, probe_cell=not no_probe)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(c) for c in found], indent=1))
    else:
        for c in found:
            click.echo(f"{_MARK.get(c.status, c.status)} {c.name}: {c.detail}")
            if c.fix and c.status != "ok":
                click.echo(f"     fix: {c.fix}")
        fails = sum(c.status == "fail" for c in found)
        warns = sum(c.status == "warn" for c in found)
        fine = sum(c.status == "ok" for c in found)
        click.echo(f"{fails} failed, {warns} warning(s), {fine} fine")
    sys.exit(1 if any(c.status == "fail" for c in found) else 0)
