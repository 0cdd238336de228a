"""`fedmri export RUN`: the coordinator's encoder, out of a run folder."""

from __future__ import annotations

import typer


def export_command(
    run: str = typer.Argument(..., help="Run folder (runs/<name>)."),
    out: str = typer.Option(None, "--out", "-o", help="Export folder (default: <run>/encoder)."),
) -> None:
    """[coordinator] Export a run's encoder (last complete round) as safetensors + model card,
    with its task heads when the run tuned them."""
    from fedmri.heads.export import card_summary
    from fedmri.server.pipeline import export_run

    path = export_run(run, out)
    typer.echo(f"encoder exported to {path}")
    if heads := card_summary(path):
        typer.echo(f"task heads ({path / 'heads.safetensors'}):\n{heads}")
