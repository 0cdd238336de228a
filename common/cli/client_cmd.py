"""``fedmri client``: the site admin runs this site's client daemon (a Flower SuperNode)."""

from __future__ import annotations

from pathlib import Path

import typer

client_app = typer.Typer(help="[site admin] Run this site's client daemon.", no_args_is_help=True)

_SITE = typer.Option(..., "--site", help="The site's site.yaml (catalog, server address, CA, node key, policy).")
_INSECURE = typer.Option(False, "--insecure", help="No TLS and no node authentication: local tests only "
                         "(same as server.insecure: true).")
_STATE = typer.Option(None, "--state", help="The SuperNode's Flower home (installed app bundles); "
                      "default .flwr next to site.yaml.")


@client_app.command("start")
def start_command(site: Path = _SITE, insecure: bool = _INSECURE, state: Path | None = _STATE) -> None:
    """Check the site file, then run the SuperNode in the foreground until Ctrl-C (or SIGTERM)."""
    from fedmri.client.daemon import prepare, serve

    raise typer.Exit(serve(prepare(site, insecure=insecure, state=state)))


@client_app.command("check")
def check_command(site: Path = _SITE, insecure: bool = _INSECURE, state: Path | None = _STATE) -> None:
    """Check the site file and what it names, and print the SuperNode command; start nothing."""
    import shlex

    from fedmri.client.daemon import prepare

    launch = prepare(site, insecure=insecure, state=state)
    for warning in launch.warnings:
        typer.echo(warning)
    typer.echo(f"site {launch.site.name}: ready to connect to {launch.site.server.address}")
    typer.echo(f"FLWR_HOME={shlex.quote(str(launch.flwr_home))} {shlex.join(launch.command)}")
