"""`depin jobs` and `depin cancel`: runs in flight on a scheduler, also those whose kernel is gone."""

from __future__ import annotations

from typing import Any

import click

from depin_jupyter.cli.group import main


def _client(scheduler: str | None) -> tuple[Any, bool, str]:
    """(a Dask client, whether it is a volunteer network's, who it is: user@host or the token's name)."""
    import os

    from distributed import Client

    from depin_jupyter import config
    from depin_jupyter.kernel.jobs import owner
    from depin_jupyter.protocol.identity import TOKEN_PREFIX, Token

    address = scheduler or config.get("scheduler-address")
    if not address:
        raise click.UsageError("no scheduler: pass --scheduler tcp://host:port (or a client token), or set "
                               "depin.scheduler-address")
    timeout = config.seconds("connect-timeout")
    try:
        if address.startswith(TOKEN_PREFIX) or ("://" not in address and os.path.isfile(os.path.expanduser(address))):
            token = Token.decode(address)
            token.check_valid("client")
            client = Client(token.address, security=token.security("client"), timeout=timeout, set_as_default=False)
            return client, True, token.info.name
        return Client(address, timeout=timeout, set_as_default=False), False, owner()
    except (OSError, TimeoutError, ImportError) as e:
        raise click.ClickException(f"no Dask scheduler answered at {address}: {e}") from None


_scheduler_option = click.option("--scheduler", "scheduler", default=None, metavar="ADDRESS|TOKEN",
                                  help="scheduler address or a volunteer network's client token (or a file "
                                       "holding it); default: config depin.scheduler-address")


@main.command()
@_scheduler_option
def jobs(scheduler: str | None) -> None:
    """List runs queued or executing on the cluster, with owner and age."""
    from depin_jupyter.kernel.jobs import format_jobs, list_jobs

    client, untrusted, _ = _client(scheduler)
    with client:
        click.echo(format_jobs(list_jobs(client, untrusted)))


@main.command()
@click.argument("runs", nargs=-1)
@click.option("--mine", is_flag=True, help="cancel every run started by this user on this host")
@click.option("--all", "all_", is_flag=True, help="cancel every run on the cluster")
@_scheduler_option
def cancel(runs: tuple[str, ...], mine: bool, all_: bool, scheduler: str | None) -> None:
    """Cancel RUNS (run ids, names, or a map's name: all its batches), --mine or --all; their workers stop
    the cells."""
    from depin_jupyter.kernel.jobs import cancel_jobs, list_jobs

    if not (runs or mine or all_):
        raise click.UsageError("name the runs to cancel, or give --mine or --all")
    client, untrusted, me = _client(scheduler)
    with client:
        live = list_jobs(client, untrusted)
        chosen = [j for j in live if all_ or (mine and j.owner == me) or any(j.matches(r) for r in runs)]
        unknown = [r for r in runs if not any(j.matches(r) for j in live)]
        for j in cancel_jobs(client, chosen, untrusted):
            click.echo(f"cancelled {j.run_id} ({j.name}, {j.owner}, {j.age:.0f}s old)")
        if unknown:
            raise click.ClickException(f"no run in flight is called {', '.join(unknown)} (see `depin jobs`)")
        if not chosen:
            click.echo("nothing to cancel")
