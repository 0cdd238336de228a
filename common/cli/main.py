"""Root of the ``fedmri`` command: mounts the sub-command groups of each role.

Errors a user can fix (:class:`fedmri.errors.FedmriError`) print one line and
exit with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from fedmri import __version__
from fedmri.cli.certs_cmd import certs_app
from fedmri.cli.client_cmd import client_app
from fedmri.cli.config_cmd import config_app
from fedmri.cli.data_cmd import data_app
from fedmri.cli.export_cmd import export_command
from fedmri.cli.run_cmd import run_command, status_command
from fedmri.cli.search_cmd import search_command
from fedmri.cli.server_cmd import server_app
from fedmri.cli.simulate_cmd import simulate_command
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
app.add_typer(certs_app, name="certs")
app.add_typer(server_app, name="server")
app.add_typer(client_app, name="client")
app.command("run")(run_command)
app.command("status")(status_command)
app.command("export")(export_command)
app.command("search")(search_command)
app.command("simulate")(simulate_command)


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
