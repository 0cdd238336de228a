"""``fedmri client``: the site admin runs this site's client daemon (a Flower SuperNode), reads its privacy ledger."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from rich.table import Table

    from fedmri.client.privacy import LedgerEntry, LedgerSummary

client_app = typer.Typer(help="[site admin] Run this site's client daemon; read its privacy ledger.",
                         no_args_is_help=True)

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


_LEDGER = typer.Option(None, "--ledger", help="The privacy ledger; default privacy-ledger.sqlite in the site's "
                       "catalog folder.")
_JSON = typer.Option(False, "--json", help="Print one JSON entry per recorded round (for scripts).")


@client_app.command("privacy")
def privacy_command(site: Path = _SITE, ledger: Path | None = _LEDGER, as_json: bool = _JSON) -> None:
    """Print the site's privacy ledger: each private round, and the ε spent per run and in total."""
    import json

    from rich.console import Console

    from fedmri.client.privacy import PrivacyLedger, default_ledger_path
    from fedmri.client.site import load_site

    site_cfg = load_site(site)
    path = ledger.expanduser().resolve() if ledger is not None else default_ledger_path(site_cfg)
    entries: list[LedgerEntry] = []
    if path.exists():
        with PrivacyLedger(path, create=False) as book:
            entries, summary = book.entries(), book.summary()
    if as_json:
        typer.echo(json.dumps([e.to_dict() for e in entries], indent=2))
    elif not entries:
        typer.echo(f"site {site_cfg.name}: no private rounds recorded yet (ledger {path})")
    else:
        console = Console()
        console.print(f"ledger {path}", highlight=False, soft_wrap=True)
        console.print(_rounds_table(entries, f"Private rounds of site {site_cfg.name}"))
        console.print(_spend_table(summary))


def _rounds_table(entries: list[LedgerEntry], title: str) -> Table:
    from rich import box
    from rich.table import Table

    deltas = {e.delta for e in entries}
    one_delta = len(deltas) == 1
    table = Table(title=title + (f" (δ = {entries[0].delta:g})" if one_delta else ""), title_justify="left",
                  box=box.SIMPLE_HEAD)
    names = ["run", "stage", "round", "noise", "sample rate", "steps", *([] if one_delta else ["δ"])]
    for name in [*names, "ε run", "ε total"]:
        table.add_column(name, justify="left" if name in ("run", "stage") else "right")
    for e in entries:
        delta = [] if one_delta else [f"{e.delta:g}"]
        table.add_row(e.run, e.stage, str(e.round), f"{e.noise_multiplier:g}", f"{e.sample_rate:g}", str(e.steps),
                      *delta, f"{e.epsilon_run:.4f}", f"{e.epsilon_total:.4f}")
    return table


def _spend_table(summary: LedgerSummary) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(title="ε spent per run and stage", title_justify="left", box=box.SIMPLE_HEAD,
                  caption=f"site total: ε = {summary.epsilon_total:.4f} at δ = {summary.delta:g} "
                          f"over {summary.rounds} rounds of {summary.runs} run(s) (Opacus RDP accountant)",
                  caption_justify="left")
    for name in ("run", "stage", "rounds", "steps", "ε of the run", "last update (UTC)"):
        table.add_column(name, justify="right" if name in ("rounds", "steps", "ε of the run") else "left")
    for s in summary.stages:
        table.add_row(s.run, s.stage, str(s.rounds), str(s.steps), f"{s.epsilon_run:.4f}",
                      s.last_update.replace("T", " ").removesuffix("+00:00"))
    return table
