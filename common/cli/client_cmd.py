"""``fedmri client``: the site admin runs this site's client daemon (a Flower SuperNode), reads its privacy ledger."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from rich.table import Table

    from fedmri.client.privacy import LedgerEntry, LedgerSummary

client_app = typer.Typer(help="[site admin] Run this site's client daemon; read its rounds and privacy ledger.",
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

    from fedmri import __version__
    from fedmri.client.daemon import prepare
    from fedmri.client.guard import CLIENTAPP

    launch = prepare(site, insecure=insecure, state=state)
    for warning in launch.warnings:
        typer.echo(warning)
    policy = launch.site.policy
    typer.echo(f"site {launch.site.name}: ready to connect to {launch.site.server.address}")
    typer.echo(f"fedmri {__version__} installed; every ClientApp runs it ({CLIENTAPP}), started through "
               "fedmri's launcher")
    typer.echo("refuses: an app bundle with files besides pyproject.toml (code of the coordinator's) or naming "
               "another ClientApp or ServerApp")
    versions = policy.get("fedmri_versions")
    typer.echo(f"refuses: a coordinator whose fedmri is outside {versions} (policy.fedmri_versions)" if versions
               else "accepts: a coordinator of any fedmri version (set policy.fedmri_versions to pin a range)")
    typer.echo(f"refuses: stages other than {', '.join(policy.stages)}; more than {policy.max_local_steps} local "
               "steps a round" + ("; training without differential privacy" if policy.dp.required else "")
               + ("; training without secure aggregation" if policy.get("secure_aggregation") else ""))
    typer.echo(f"FLWR_HOME={shlex.quote(str(launch.flwr_home))} {shlex.join(launch.command)}")


_LEDGER = typer.Option(None, "--ledger", help="The privacy ledger; default privacy-ledger.sqlite in the site's "
                       "catalog folder.")
_JSON = typer.Option(False, "--json", help="Print one JSON entry per recorded round (for scripts).")


@client_app.command("privacy")
def privacy_command(site: Path = _SITE, ledger: Path | None = _LEDGER, as_json: bool = _JSON) -> None:
    """Print the site's privacy ledger: each private round with its unit (patient or series), and the ε spent
    per run and in total."""
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
    names = ["run", "stage", "round", "unit", "noise", "sample rate", "steps", *([] if one_delta else ["δ"])]
    for name in [*names, "ε run", "ε total"]:
        table.add_column(name, justify="left" if name in ("run", "stage", "unit") else "right")
    for e in entries:
        delta = [] if one_delta else [f"{e.delta:g}"]
        table.add_row(e.run, e.stage, str(e.round), e.unit, f"{e.noise_multiplier:g}", f"{e.sample_rate:g}",
                      str(e.steps), *delta, f"{e.epsilon_run:.4f}", f"{e.epsilon_total:.4f}")
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


@client_app.command("status")
def status_command(site: Path = _SITE, last: int = typer.Option(10, "--last", help="Rounds to show, newest last."),
                   as_json: bool = typer.Option(False, "--json", help="Print one JSON document (for scripts).")
                   ) -> None:
    """The site's own view from its local files: its last rounds (stage, round, result, reason), the privacy
    ledger's totals and remaining budget, and the catalog's counts. Contacts nothing."""
    import datetime as dt
    import json
    import shutil

    from rich.console import Console

    from fedmri.client.journal import journal_path, read_journal
    from fedmri.client.site import load_site

    site_cfg = load_site(site)
    entries = read_journal(site_cfg)
    document = {"site": site_cfg.name, "journal": str(journal_path(site_cfg)), "rounds": entries[-last:] if last > 0
                else [], "rounds_total": len(entries),
                "results": {r: sum(e.get("result") == r for e in entries) for r in ("ok", "declined", "failed")},
                "privacy": _privacy_totals(site_cfg), "catalog": _catalog_counts(site_cfg)}
    if as_json:
        typer.echo(json.dumps(document, indent=2))
        return
    from rich import box
    from rich.table import Table

    console = Console(width=max(140, shutil.get_terminal_size().columns))
    results = document["results"]
    console.print(f"site {site_cfg.name}: {len(entries)} round(s) handled ({results['ok']} ok, "
                  f"{results['declined']} declined, {results['failed']} failed); journal {document['journal']}",
                  highlight=False, soft_wrap=True)
    if document["rounds"]:
        table = Table(title=f"Last {len(document['rounds'])} round(s)", title_justify="left", box=box.SIMPLE_HEAD)
        for name in ("when (UTC)", "run", "stage", "round", "result", "seconds", "reason"):
            table.add_column(name)
        for e in document["rounds"]:
            when = dt.datetime.fromtimestamp(float(e.get("time", 0)), dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            table.add_row(when, str(e.get("run") or ""), str(e.get("stage") or ""), str(e.get("round") or ""),
                          str(e.get("result")), f"{float(e.get('seconds', 0)):.1f}", str(e.get("reason") or ""))
        console.print(table)
    p = document["privacy"]
    budget = "no site budget set" if p["budget"] is None else (
        f"budget ε {p['budget']:g}, {p['remaining']:.4f} left")
    delta = "" if p["delta"] is None else f" at δ {p['delta']:g}"
    console.print(f"privacy: ε {p['epsilon_total']:.4f} spent over {p['rounds']} private round(s) of {p['runs']} "
                  f"run(s){delta}"
                  f"; {budget} (ledger {p['ledger']})", highlight=False, soft_wrap=True)
    c = document["catalog"]
    if "error" in c:
        console.print(f"catalog: {c['error']}", highlight=False)
    else:
        splits = ", ".join(f"{k} {v}" for k, v in c["by_split"].items())
        console.print(f"catalog {c['path']}: {c['n_series']} series of {c['n_patients']} patients ({splits}), "
                      f"{c['n_skipped']} input(s) skipped at indexing", highlight=False, soft_wrap=True)


def _privacy_totals(site_cfg: object) -> dict:
    from fedmri.client.privacy import PrivacyLedger, default_ledger_path

    path = default_ledger_path(site_cfg)
    out = {"ledger": str(path), "epsilon_total": 0.0, "delta": None, "rounds": 0, "runs": 0}
    if path.exists():
        with PrivacyLedger(path, create=False) as book:
            summary = book.summary()
        out.update(epsilon_total=summary.epsilon_total, delta=summary.delta, rounds=summary.rounds, runs=summary.runs)
    policy = getattr(site_cfg, "policy", None)
    dp = policy.dp if policy is not None and "dp" in policy else None
    budget = dp.epsilon_total if dp is not None else None
    out["budget"] = None if budget is None else float(budget)
    out["remaining"] = None if budget is None else max(0.0, float(budget) - out["epsilon_total"])
    return out


def _catalog_counts(site_cfg: object) -> dict:
    from fedmri.data.catalog_db import open_catalog, summary

    path = str(getattr(site_cfg, "catalog"))
    try:
        conn = open_catalog(path)
    except Exception as exc:  # noqa: BLE001 -- shown to the admin, with what to do
        return {"path": path, "error": f"{path} cannot be read ({exc}); index it with `fedmri data index`"}
    try:
        counts = summary(conn)
    finally:
        conn.close()
    return {"path": path, "n_series": counts["n_series"], "n_patients": counts["n_patients"],
            "by_split": counts["by_split"], "n_skipped": counts["n_skipped"]}
