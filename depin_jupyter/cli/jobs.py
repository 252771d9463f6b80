"""`depin jobs` and `depin cancel`: runs in flight on a scheduler, also those whose kernel is gone."""

from __future__ import annotations

import click

from depin_jupyter.cli.group import main


def _client(scheduler: str | None):  # type: ignore[no-untyped-def]
    from distributed import Client

    from depin_jupyter import config

    address = scheduler or config.get("scheduler-address")
    if not address:
        raise click.UsageError("no scheduler: pass --scheduler tcp://host:port or set depin.scheduler-address")
    try:
        return Client(address, timeout=config.seconds("connect-timeout"), set_as_default=False)
    except (OSError, TimeoutError) as e:
        raise click.ClickException(f"no Dask scheduler answered at {address}: {e}") from None


_scheduler_option = click.option("--scheduler", "scheduler", default=None, metavar="ADDRESS",
                                  help="scheduler address (default: config depin.scheduler-address)")


@main.command()
@_scheduler_option
def jobs(scheduler: str | None) -> None:
    """List runs queued or executing on the cluster, with owner and age."""
    from depin_jupyter.kernel.jobs import format_jobs, list_jobs

    with _client(scheduler) as client:
        click.echo(format_jobs(list_jobs(client)))


@main.command()
@click.argument("runs", nargs=-1)
@click.option("--mine", is_flag=True, help="cancel every run started by this user on this host")
@click.option("--all", "all_", is_flag=True, help="cancel every run on the cluster")
@_scheduler_option
def cancel(runs: tuple[str, ...], mine: bool, all_: bool, scheduler: str | None) -> None:
    """Cancel RUNS (run ids or names), --mine or --all; their workers stop the cells."""
    from depin_jupyter.kernel.jobs import cancel_jobs, list_jobs, owner

    if not (runs or mine or all_):
        raise click.UsageError("name the runs to cancel, or give --mine or --all")
    with _client(scheduler) as client:
        live = list_jobs(client)
        chosen = [j for j in live if all_ or (mine and j.owner == owner()) or j.run_id in runs or j.name in runs]
        unknown = [r for r in runs if not any(r in (j.run_id, j.name) for j in live)]
        for j in cancel_jobs(client, chosen):
            click.echo(f"cancelled {j.run_id} ({j.name}, {j.owner}, {j.age:.0f}s old)")
        if unknown:
            raise click.ClickException(f"no run in flight is called {', '.join(unknown)} (see `depin jobs`)")
        if not chosen:
            click.echo("nothing to cancel")
