"""``fedmri config``: inspect presets and resolved configs."""

from __future__ import annotations

from pathlib import Path

import typer

from fedmri.config import list_presets, load_config, to_yaml

config_app = typer.Typer(help="Show presets and resolved configurations.", no_args_is_help=True)


@config_app.command("show")
def show(
    preset: str = typer.Argument("base", help="Preset name (see `fedmri config presets`) or a YAML file."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. model.depth=4"),
    file: Path | None = typer.Option(None, "--file", "-f", help="User YAML merged over the preset."),
) -> None:
    """Print the resolved YAML: schema defaults -> preset -> --file -> key=value."""
    cfg = load_config(preset, file, overrides or [])
    typer.echo(to_yaml(cfg), nl=False)


@config_app.command("presets")
def presets() -> None:
    """List the packaged presets."""
    for name in list_presets():
        typer.echo(name)
