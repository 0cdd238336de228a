"""Root of the ``fedmri`` command: mounts the sub-command groups of each role.

Errors a user can fix (:class:`fedmri.errors.FedmriError`) print one line and
exit with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from fedmri import __version__
from fedmri.cli.config_cmd import config_app
from fedmri.cli.data_cmd import data_app
from fedmri.errors import FedmriError

err_console = Console(stderr=True)

app = typer.Typer(
    name="fedmri",
    help="Federated training of a 3D MRI vision-language foundation encoder.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")

# Commands that land with later work. They are listed so that `--help` shows
# the whole tool, and they say plainly that they are not there yet.
_LATER = {
    "client": "[site admin] Run this site's client daemon; show its privacy ledger (not available yet).",
    "server": "[coordinator] Run the Flower SuperLink with TLS and node authentication (not available yet).",
    "certs": "[coordinator] Issue the CA, server certificate and site keys (not available yet).",
    "run": "[coordinator] Launch a federated run on a running server (not available yet).",
    "status": "[coordinator] Show runs, stages, rounds and sites (not available yet).",
    "export": "[coordinator] Export a run's encoder (not available yet).",
    "simulate": "[researcher] Simulate a whole federation on this machine (not available yet).",
}


def _not_yet(command: str) -> None:
    raise FedmriError(
        f"`fedmri {command}` is not available in fedmri {__version__} yet; "
        "it lands with the federation work (see README, 'Status')"
    )


for _command, _help in _LATER.items():

    def _cmd(ctx: typer.Context, _name: str = _command) -> None:
        _not_yet(" ".join([_name, *ctx.args]))

    app.command(
        name=_command,
        help=_help,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )(_cmd)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fedmri {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the fedmri version and exit."),
) -> None:
    """fedmri trains one shared 3D MRI encoder where the data lives."""


def main() -> None:
    """Console entry point: run the app, turning user errors into one clean line."""
    try:
        app()
    except FedmriError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)
