"""The volunteer network: `depin scheduler`, `depin worker`, `depin token ...`, `depin credits`."""

from __future__ import annotations

import sys

import click

from depin_jupyter.cli.group import main

_state_option = click.option("--state-dir", default=None, metavar="DIR",
                             help="the coordinator's directory (default: config depin.coordinator.state-dir)")


def _state(state_dir: str | None):  # type: ignore[no-untyped-def]
    from depin_jupyter.network.coordinator import StateDir

    return StateDir(state_dir)


def _fail(e: Exception) -> None:
    raise click.ClickException(str(e)) from None


@main.command()
@click.option("--host", default="0.0.0.0", show_default=True, help="interface to listen on")
@click.option("--port", default=None, type=int, help="port (default: config depin.coordinator.port)")
@click.option("--advertise", default=None, metavar="ADDRESS",
              help="address written into tokens, e.g. tls://gpu.example.org:8786 (default: this host)")
@click.option("--dashboard-address", default=None, help="Dask dashboard (default 127.0.0.1:8787; no login)")
@_state_option
def scheduler(host: str, port: int | None, advertise: str | None, dashboard_address: str | None,
              state_dir: str | None) -> None:
    """Run the coordinator: a Dask scheduler with mutual TLS and its own certificate authority."""
    import asyncio
    import signal

    from depin_jupyter import config
    from depin_jupyter.network.coordinator import serve

    state = _state(state_dir)
    port = config.get("coordinator.port") if port is None else port
    first = not state.exists

    async def run() -> None:
        sched = await serve(state, host, port, advertise, dashboard_address)
        click.echo(f"depin scheduler: listening at {sched.address}; tokens point at {state.address}", err=True)
        click.echo(f"depin scheduler: state in {state.path}", err=True)
        if "dashboard" in sched.services:
            dash = sched.services["dashboard"].port
            click.echo(f"depin scheduler: Dask dashboard on port {dash} (no login: keep it private)", err=True)
        if first:
            w = state.issue_token("worker", "volunteer")
            c = state.issue_token("client", "scientist")
            click.echo("worker join token (name 'volunteer'; give it to volunteers: depin worker TOKEN):")
            click.echo(w.encode())
            click.echo("client token (name 'scientist'; in a notebook: %depin connect TOKEN):")
            click.echo(c.encode())
            click.echo("Issue one token per person with `depin token issue`, so each can be revoked alone.",
                       err=True)
        sys.stdout.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        finished = asyncio.ensure_future(sched.finished())
        await asyncio.wait([finished, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        await sched.close()

    try:
        asyncio.run(run())
    except OSError as e:
        _fail(e)


@main.command()
@click.argument("token")
@click.option("--gpus", default="all", show_default=True, help="all, none, or device indices such as 0,2")
@click.option("--memory-limit", default="auto", show_default=True, help="host memory per worker")
@click.option("--name", default=None, help="worker name (default: the token's name)")
@click.option("--nthreads", default=None, type=int, help="task threads per worker (default 1)")
@click.option("--hours", default=None, metavar="HH:MM-HH:MM",
              help="take work only in these local-time windows, e.g. 22:00-07:00 (config depin.volunteer.hours)")
@click.option("--when-idle", is_flag=True, default=None,
              help="take work only while the machine is idle (config depin.volunteer.when-idle)")
@click.option("--exclude-gpus", default=None, metavar="LIST", help="GPU indices never shared, e.g. 1,2")
@click.option("--max-gpu-util", default=None, type=float, metavar="PCT",
              help="pause while other programs use more than PCT%% of the worker's GPU (needs NVML)")
@click.option("--max-power", default=None, type=float, metavar="W",
              help="set an NVML power limit of W watts on shared GPUs (needs permission, usually root)")
@click.option("--contact-address", default=None, hidden=True,
              help="address advertised to peers (tests use an unreachable one to act as a NATed volunteer)")
def worker(token: str, gpus: str, memory_limit: str, name: str | None, nthreads: int | None, hours: str | None,
           when_idle: bool | None, exclude_gpus: str | None, max_gpu_util: float | None, max_power: float | None,
           contact_address: str | None) -> None:
    """Join a coordinator with TOKEN (the string, or a file holding it) and share this machine's GPUs.

    You stay in control: `depin pause [--for 30m]` and `depin resume` act on running workers; --hours,
    --when-idle and --max-gpu-util pause it automatically (running cells finish, queued ones go elsewhere).
    """
    from depin_jupyter.errors import DepinError
    from depin_jupyter.worker import early

    try:
        from depin_jupyter.protocol.identity import Token

        Token.decode(token).check_valid("worker")  # a bad token fails at once, before anything starts
        started = early.begin(gpus)  # the probe and the fork server start while Dask is imported
        from depin_jupyter.worker.volunteer import run

        code = run(token, gpus=gpus, memory_limit=memory_limit, name=name, nthreads=nthreads,
                   contact_address=contact_address, hours=hours, when_idle=when_idle, exclude_gpus=exclude_gpus,
                   max_gpu_util=max_gpu_util, max_power=max_power, started=started)
    except DepinError as e:
        _fail(e)
    sys.exit(code)


def _await_workers(want_paused: bool, directory, since: float, timeout: float = 5.0) -> list[dict]:  # type: ignore[no-untyped-def]
    """The running workers' states once each has seen the control file written at ``since`` (or timeout)."""
    import time

    from depin_jupyter.worker.controls import worker_states

    deadline = time.monotonic() + timeout
    while True:
        states = worker_states(directory)
        seen = [s for s in states if s.get("time", 0) >= since and (s.get("status") == "paused") == want_paused]
        settled = all(((s.get("status") == "paused") == want_paused) or s.get("time", 0) >= since for s in states)
        if (states and len(seen) == len(states)) or (states and settled and not want_paused) \
                or time.monotonic() > deadline or not states:
            return states
        time.sleep(0.1)


@main.command()
@click.option("--for", "duration", default=None, metavar="DURATION",
              help="resume automatically after this long, e.g. 30m, 2h, 1h30m")
def pause(duration: str | None) -> None:
    """Pause the depin workers running on this machine: running cells finish, nothing new starts.

    Cells queued on them but not started are handed back to the coordinator, which runs them elsewhere.
    """
    import time

    from depin_jupyter.errors import DepinError
    from depin_jupyter.worker.controls import control_dir, parse_duration, write_control

    try:
        until = time.time() + parse_duration(duration) if duration else None
        d = control_dir()
        since = time.time()
        write_control(True, until, d)
    except DepinError as e:
        _fail(e)
    when = f" until {time.strftime('%H:%M:%S', time.localtime(until))} ({duration})" if until else \
        " until `depin resume`"
    states = _await_workers(True, d, since)
    if not states:
        click.echo(f"depin pause: no depin worker is running here; the pause is recorded{when} and applies "
                   f"to workers started meanwhile ({d}).")
        return
    paused = [s for s in states if s.get("status") == "paused"]
    names = ", ".join(sorted({str(s.get("name")) for s in paused})) or "none"
    click.echo(f"depin pause: paused {len(paused)} of {len(states)} worker(s) ({names}){when}. Running cells "
               f"finish; queued ones are handed back; the coordinator shows them as paused.")
    for s in states:
        if s.get("status") != "paused":
            click.echo(f"depin pause: worker {s.get('name')} (pid {s.get('pid')}) has not confirmed yet.")


@main.command()
def resume() -> None:
    """Resume the depin workers on this machine paused with `depin pause`."""
    import time

    from depin_jupyter.errors import DepinError
    from depin_jupyter.worker.controls import control_dir, write_control

    try:
        d = control_dir()
        since = time.time()
        write_control(False, None, d)
    except DepinError as e:
        _fail(e)
    states = _await_workers(False, d, since)
    if not states:
        click.echo(f"depin resume: the pause is lifted; no depin worker is running here ({d}).")
        return
    running = [s for s in states if s.get("status") == "running"]
    click.echo(f"depin resume: {len(running)} of {len(states)} worker(s) take work again.")
    for s in states:
        if s.get("status") == "paused":
            click.echo(f"depin resume: worker {s.get('name')} stays paused: {'; '.join(s.get('reasons') or [])}")


@main.group()
def token() -> None:
    """Issue, list and revoke the tokens of a coordinator."""


@token.command("issue")
@click.option("--role", type=click.Choice(["worker", "client"]), required=True)
@click.option("--name", default=None, help="who it is for (one name per person or machine)")
@click.option("--days", default=None, type=float, help="validity (default: config depin.coordinator.token-days)")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="write the token to this file (0600)")
@click.option("--pool", default=None, metavar="NAME",
              help="worker tokens: the pool the worker joins (default volunteer; e.g. lab). Written into the "
                   "certificate: `%%depin --pool NAME` cells run only there")
@click.option("--quota", default=None, metavar="LIMITS",
              help="client tokens (students): e.g. concurrent=1,gpu-seconds=3600,cpu-seconds=7200 (per day)")
@click.option("--educator", is_flag=True, help="client tokens: may see the lab status of every student")
@click.option("--class", "roster", default=None, type=click.Path(exists=True, dir_okay=False), metavar="CSV",
              help="a class roster (columns name[,quota]): one client token per row, written to --out-dir")
@click.option("--out-dir", default=None, type=click.Path(file_okay=False), metavar="DIR",
              help="with --class: where NAME.token files are written (0600)")
@_state_option
def token_issue(role: str, name: str | None, days: float | None, out: str | None, state_dir: str | None,
                pool: str | None = None, quota: str | None = None, educator: bool = False,
                roster: str | None = None, out_dir: str | None = None) -> None:
    """Issue a token: the coordinator's address, its CA, and a certificate for NAME in ROLE."""
    import os

    from depin_jupyter.errors import DepinError

    if roster is not None:
        return _issue_class(role, roster, out_dir, days, quota, state_dir)
    if not name:
        raise click.UsageError("--name is required (or --class ROSTER.csv for a whole class)")
    try:
        text = _state(state_dir).issue_token(role, name, days, pool=pool, quota=quota,
                                             educator=educator).encode()
    except DepinError as e:
        _fail(e)
    if out:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        click.echo(f"wrote the {role} token for {name!r} to {out}", err=True)
    else:
        click.echo(text)


def _issue_class(role: str, roster: str, out_dir: str | None, days: float | None, quota: str | None,
                 state_dir: str | None) -> None:
    """`depin token issue --class ROSTER.csv --out-dir DIR`: one client token per student, in NAME.token files."""
    import os
    import pathlib

    from depin_jupyter.errors import DepinError
    from depin_jupyter.network.lab import parse_quota, read_roster
    from depin_jupyter.reports import format_quota

    if role != "client":
        raise click.UsageError("--class issues client tokens (students): use --role client")
    if not out_dir:
        raise click.UsageError("--class needs --out-dir DIR (one NAME.token file per student, 0600)")
    try:
        rows = read_roster(roster)
        default = parse_quota(quota)
        state = _state(state_dir)
        d = pathlib.Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        for student, q in rows:
            q = q or default
            text = state.issue_token("client", student, days, quota=q or None).encode()
            path = d / f"{student}.token"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text + "\n")
            click.echo(f"{student}: {path} (quota {format_quota(q)})")
    except DepinError as e:
        _fail(e)
    click.echo(f"issued {len(rows)} student token(s) into {d}; `depin lab status` shows their use", err=True)


@token.command("list")
@_state_option
def token_list(state_dir: str | None) -> None:
    """List the certificates issued, with role, expiry and revocation."""
    import datetime as dt

    state = _state(state_dir)
    if not state.exists:
        raise click.ClickException(f"no coordinator in {state.path}")
    rows = [("NAME", "ROLE", "POOL", "EXPIRES", "STATUS")]
    for c in state.registry()["certificates"]:
        exp = dt.datetime.fromtimestamp(c["expires"], dt.timezone.utc)
        status = ("revoked" if c["revoked"] else "expired" if exp < dt.datetime.now(dt.timezone.utc) else "valid")
        rows.append((c["name"], c["role"], c.get("pool") or ("volunteer" if c["role"] == "worker" else "-"),
                     f"{exp:%Y-%m-%d}", status))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


@token.command("revoke")
@click.argument("name")
@_state_option
def token_revoke(name: str, state_dir: str | None) -> None:
    """Revoke every certificate of NAME: it cannot connect again, and a running coordinator drops it."""
    from depin_jupyter.errors import DepinError

    try:
        n = _state(state_dir).revoke(name)
    except DepinError as e:
        _fail(e)
    click.echo(f"revoked {n} certificate(s) of {name!r}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@_state_option
def credits(as_json: bool, state_dir: str | None) -> None:
    """Contributed compute per volunteer: raw GPU/CPU-seconds, normalized credit, energy (self-reported)."""
    import json

    from depin_jupyter.protocol.credit import CREDIT_FORMULA
    from depin_jupyter.reports import energy_ledger_text as ledger_text

    state = _state(state_dir)
    data = state.credits() if state.path.exists() else {}
    trust = state.reputation() if state.path.exists() else {}
    if as_json:
        click.echo(json.dumps({n: {**e, "trust": trust.get(n)} for n, e in data.items()}, indent=1,
                              sort_keys=True))
        return
    if not data:
        click.echo("no completed work recorded yet")
        return
    from depin_jupyter import config

    streak = int(config.get("trust-streak"))

    def trust_text(name: str) -> str:
        r = trust.get(name) or {}
        if not r.get("checked"):
            return "new"
        mode = "trusted" if r.get("streak", 0) >= streak else "replicated"
        return f"{mode} {r.get('valid', 0)}/{r.get('checked', 0)} streak {r.get('streak', 0)}"

    click.echo(f"{'VOLUNTEER':<24} {'GPU-SECONDS':>12} {'CPU-SECONDS':>12} {'CPU-USED':>10} {'CREDIT':>10} "
               f"{'TASKS':>7} {'WITHHELD-S':>10} {'ENERGY':>12}  TRUST")
    for name, e in sorted(data.items(), key=lambda kv: (-kv[1].get("credit", 0),
                                                        -(kv[1].get("gpu_seconds", 0) + kv[1].get("cpu_seconds", 0)))):
        click.echo(f"{name:<24} {e.get('gpu_seconds', 0):>12.1f} {e.get('cpu_seconds', 0):>12.1f} "
                   f"{e.get('cpu_used_seconds', 0):>10.2f} {e.get('credit', 0):>10.2f} {int(e.get('tasks', 0)):>7} "
                   f"{e.get('withheld_seconds', 0):>10.1f} {ledger_text(e):>12}  {trust_text(name)}")
    click.echo("GPU/CPU-SECONDS: wall time of finished tasks. CPU-USED: CPU time %%depin cells used. "
               "WITHHELD-S: seconds of work found invalid by replicas (no credit). TRUST: validated/checked "
               f"replicated results; 'trusted' after {streak} in a row (then spot-checked). "
               "ENERGY: measured by the volunteer's worker while its cells ran (NVML GPU board power, RAPL "
               "CPU packages), 'not measured' where it has no power counter; never estimated. "
               + CREDIT_FORMULA)
    reasons = sorted({str(e["energy_reason"]) for e in data.values() if e.get("energy_reason")})
    for why in reasons[:3]:
        click.echo(f"not measured: {why}")


@main.group()
def lab() -> None:
    """Virtual labs: the educator's view of students' use and quotas."""


@lab.command("status")
@click.option("--token", "token_text", default=None, metavar="TOKEN",
              help="an educator's client token (string or file); default: the coordinator's own certificate "
                   "from --state-dir (run on the coordinator machine)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@_state_option
def lab_status(token_text: str | None, as_json: bool, state_dir: str | None) -> None:
    """Per student: connected, cells running/queued, GPU/CPU-seconds used today vs quota."""
    import json

    from depin_jupyter.errors import DepinError
    from depin_jupyter.network.lab import fetch_lab_status
    from depin_jupyter.reports import format_lab_status

    try:
        status = fetch_lab_status(token_text=token_text, state=None if token_text else _state(state_dir))
    except DepinError as e:
        _fail(e)
    except (OSError, TimeoutError) as e:
        raise click.ClickException(f"could not reach the coordinator: {e}") from None
    click.echo(json.dumps(status, indent=1, sort_keys=True) if as_json else format_lab_status(status))
