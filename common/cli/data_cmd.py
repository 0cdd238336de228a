"""``fedmri data``: synthesise, index and inspect site data."""

from __future__ import annotations

import typer

data_app = typer.Typer(help="Register and inspect site data; synthesise hospitals.", no_args_is_help=True)
