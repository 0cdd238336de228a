"""``fedmri data``: synthesise, index and inspect site data."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import ProgressColumn, Task
from rich.table import Table
from rich.text import Text

data_app = typer.Typer(help="Register and inspect site data; synthesise hospitals.", no_args_is_help=True)


# --------------------------------------------------------------------------- index
@data_app.command("index")
def index_command(
    dicom_root: Path = typer.Argument(..., help="Folder of DICOM files, flat or nested, searched recursively (names "
                                      "do not matter; a DICOMDIR in it is followed); or a DICOMDIR file; or a BIDS "
                                      "dataset."),
    reports: Path = typer.Option(..., "--reports",
                                 help="reports.csv: accession_number,study_instance_uid,findings,impression."),
    out: Path = typer.Option(..., "--out", help="Catalog folder: catalog.sqlite, cache/, site.salt (made if needed)."),
    labels: Path | None = typer.Option(None, "--labels", help="labels.csv: series_instance_uid,findings,age,sex,mask "
                                       "(mask: a NIfTI file on any grid or a DICOM SEG file)."),
    nifti: Path | None = typer.Option(None, "--nifti", help="Folder of .nii/.nii.gz series to index as well."),
    bids: Path | None = typer.Option(None, "--bids", help="BIDS dataset to index as well: the anat and dwi images "
                                     "of sub-* (and ses-*) folders, with their JSON sidecars and participants.tsv. "
                                     "Series ids (labels.csv) are image names without extension, e.g. "
                                     "sub-01_ses-01_T1w; studies (reports.csv) are sub-01/ses-01, or sub-01 "
                                     "without sessions."),
    preset: str = typer.Option("tiny", "--preset", help="Config preset whose data.preprocess settings apply."),
    file: Path | None = typer.Option(None, "--file", "-f", help="User YAML merged over the preset."),
    workers: int = typer.Option(0, "--workers", min=0, help="Processes that read headers and preprocess series; "
                                "0 = one per usable CPU core (at most 8) when there are enough new files or series "
                                "to pay for starting them; 1 = none. Each holds one series in memory; the catalog "
                                "does not depend on it."),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. data.preprocess.cache_dtype=float32"),
) -> None:
    """Register a site's MR series, reports and labels in its catalog (incremental, all or nothing).

    Unchanged files are not read again; an interrupted run leaves the catalog as it was.
    Every input that cannot be used is listed with its reason. Headers and series
    are read on every CPU core (--workers); one process writes the catalog.

    DICOM_ROOT is the export as the PACS wrote it: a folder, flat or nested (a
    DICOMDIR in it is followed), a DICOMDIR file, or a BIDS dataset. DICOM SEG
    files among the DICOM files give the lesion mask of the series they reference.

    Exit codes: 0 = everything indexed; 3 = index completed but some inputs were
    skipped (listed); 2 = user error (bad arguments, missing folder, unreadable
    CSV), nothing changed; 130 = interrupted, nothing changed.
    """
    from fedmri.config import load_config
    from fedmri.data.indexer import index_site

    cfg = load_config(preset, file, overrides or [])
    err = Console(stderr=True)
    with (_RichProgress(err) if err.is_terminal else _LineProgress(err)) as progress:
        result = index_site(dicom_root, reports, out, labels=labels, nifti=nifti, bids=bids, cfg=cfg,
                            progress=progress, workers=workers)
    console = Console()
    table = Table(title=f"Indexed into {out}", show_header=False)
    series_s = result.seconds.get("series", 0.0)
    for name, value in (
        ("series in catalog", result.n_series),
        ("series read (new or changed)", result.n_loaded),
        ("series read per second", f"{result.n_loaded / series_s:.1f}" if result.n_loaded and series_s else "-"),
        ("series preprocessed (cache misses)", result.n_preprocessed),
        ("files seen / headers read", f"{result.n_files} / {result.n_headers_read}"),
        ("inputs skipped", len(result.skipped)),
    ):
        table.add_row(name, str(value))
    console.print(table)
    if result.skipped:
        console.print(_skipped_table(result.skipped))
    raise typer.Exit(result.exit_code)


# The indexer's stages as its progress shows them.
_STAGES = {"files": "files scanned", "series": "series processed"}


class _RichProgress:
    """Rich bars on stderr for the indexer's stages (files scanned, series processed), with their rate."""

    def __init__(self, console: Console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
                                  _RateColumn(), TimeElapsedColumn(), console=console)
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> _RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def start(self, stage: str, total: int) -> None:
        self._tasks[stage] = self._progress.add_task(_STAGES.get(stage, stage), total=total)

    def advance(self, stage: str) -> None:
        self._progress.advance(self._tasks[stage])


class ProgressLines:
    """Progress as plain lines, for output that goes to a log file rather than a terminal.

    Rich's bars draw nothing until they stop when they cannot redraw a terminal, so an
    index of a whole PACS export run under nohup or systemd would log nothing for hours.
    Each count is printed when it starts, every ``every_s`` seconds while it moves, and
    once when it completes::

        series processed: 1200/5000, 10.2/s, 118 s
    """

    def __init__(self, console: Console, every_s: float = 30.0, clock: Any = None) -> None:
        import time

        self._console, self._every = console, every_s
        self._clock = clock or time.monotonic
        self._counts: dict[str, list[float]] = {}  # name: [done, total, started, last printed]

    def update(self, name: str, done: int, total: int) -> None:
        now = self._clock()
        count = self._counts.get(name)
        if count is None:
            self._counts[name] = count = [done, total, now, now]
            self._print(name, count, now)
            return
        finished = done >= total > count[0]
        count[0], count[1] = done, total
        if finished or now - count[3] >= self._every:
            count[3] = now
            self._print(name, count, now)

    def advance(self, name: str) -> None:
        """One more of a count that :meth:`update` started."""
        done, total = self._counts[name][:2]
        self.update(name, int(done) + 1, int(total))

    def _print(self, name: str, count: list[float], now: float) -> None:
        done, total, started = int(count[0]), int(count[1]), count[2]
        elapsed = now - started
        rate = f", {done / elapsed:.1f}/s" if done and elapsed > 0 else ""
        self._console.print(f"{name}: {done}/{total}{rate}, {elapsed:.0f} s", highlight=False, soft_wrap=True)


class _LineProgress:
    """The indexer's stages as :class:`ProgressLines` (stderr is not a terminal)."""

    def __init__(self, console: Console) -> None:
        self._lines = ProgressLines(console)

    def __enter__(self) -> _LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def start(self, stage: str, total: int) -> None:
        self._lines.update(_STAGES.get(stage, stage), 0, total)

    def advance(self, stage: str) -> None:
        self._lines.advance(_STAGES.get(stage, stage))


class _RateColumn(ProgressColumn):
    """Items per second of a bar ("12.3/s"): rich's own estimate over the last 30 s, the mean once done."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:6.1f}/s" if speed is not None else "     -/s", style="progress.data.speed")


def _skipped_table(skipped: Sequence[Any]) -> Table:
    table = Table(title=f"Skipped inputs ({len(skipped)})", title_style="bold yellow")
    table.add_column("path", overflow="fold")
    table.add_column("reason", overflow="fold")
    for item in skipped:
        table.add_row(item.path, item.reason)
    return table


# --------------------------------------------------------------------------- show
@data_app.command("show")
def show_command(
    catalog_dir: Path = typer.Argument(..., help="Catalog folder written by `fedmri data index`."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout (for scripts)."),
) -> None:
    """Summarise a site catalog: series by sequence, body region, vendor and split; label coverage; skipped inputs.

    With --json: the same counts plus one entry per series (id, shape, spacing,
    sequence, body_region, vendor, split) and per skipped input (path, reason).
    Shapes and spacings are the series as acquired. Exit code 2 if there is no catalog.
    """
    from fedmri.data.catalog_db import open_catalog, show_document
    from fedmri.data.dicom import Skipped

    conn = open_catalog(catalog_dir)
    try:
        document = show_document(conn)
    finally:
        conn.close()
    if as_json:
        typer.echo(json.dumps(document, indent=2))
        return
    console = Console()
    console.print(f"[bold]{catalog_dir}[/]: {document['n_series']} series, {document['n_patients']} patients")
    for title, key in (("Sequence", "by_sequence"), ("Body region", "by_body_region"), ("Vendor", "by_vendor"),
                       ("Split", "by_split")):
        console.print(_count_table(title, document[key]))
    console.print(_count_table("Label coverage", document["coverage"], of=document["n_series"]))
    if document["skipped"]:
        console.print(_skipped_table([Skipped(**s) for s in document["skipped"]]))


def _count_table(title: str, counts: Mapping[str, int], of: int | None = None) -> Table:
    table = Table(title=title)
    table.add_column(title.lower())
    table.add_column("series", justify="right")
    for name, value in counts.items():
        table.add_row(name, f"{value} / {of}" if of is not None else str(value))
    return table


# --------------------------------------------------------------------------- audit
@data_app.command("audit")
def audit_command(
    catalog_dir: Path = typer.Argument(..., help="Catalog folder written by `fedmri data index`."),
) -> None:
    """List where the catalog keeps identifiers, and check that nothing shown or sent carries them.

    Identifiers (UIDs, accession numbers, paths, report text, dates) stay in the
    catalog at the site. The audit looks for every one of them in what `fedmri
    data show` (and --json) prints and in what the site sends the coordinator
    (search replies, sample metadata), and checks that series are named there
    only by their salted pseudonyms. Findings name the field, never the value.

    Exit codes: 0 = clean; 1 = a finding (listed); 2 = no catalog there.
    """
    from fedmri.data.audit import audit_catalog

    report = audit_catalog(catalog_dir)
    console = Console()
    table = Table(title=f"Identifiers at rest in {catalog_dir}")
    for col in ("table.column", "holds", "what", "values"):
        table.add_column(col, justify="right" if col == "values" else "left")
    for c in report.columns:
        if c.holds != "none":
            table.add_row(f"{c.table}.{c.column}", c.holds, c.what, str(c.n_values))
    console.print(table)
    console.print(f"{sum(c.holds == 'none' for c in report.columns)} other columns hold no identifier.")
    for surface, n in report.checked.items():
        console.print(f"checked {surface}: {n} strings")
    for surface, n in report.site_only.items():
        console.print(f"site only, not checked: {surface}: {n} (keep `data show` output at the site)")
    if report.findings:
        found = Table(title=f"Findings ({len(report.findings)})", title_style="bold red")
        found.add_column("where", overflow="fold")
        found.add_column("problem", overflow="fold")
        for finding in report.findings:
            found.add_row(finding.where, finding.problem)
        console.print(found)
    else:
        console.print("[green]clean[/]: no identifier in what is shown or sent; series and study ids are the "
                      "site's salted pseudonyms")
    raise typer.Exit(report.exit_code)


# --------------------------------------------------------------------------- synth
@data_app.command("synth")
def synth_command(
    out: Path = typer.Option(..., "--out", help="Folder for the hospitals: OUT/site-01, OUT/site-02, ..."),
    sites: int = typer.Option(3, "--sites", help="Number of hospitals."),
    seed: int = typer.Option(0, "--seed", help="Federation seed; the same seed writes the same files."),
    preset: str = typer.Option("demo", "--preset", help="'demo' (small series, quick) or 'full' (clinical sizes)."),
    series_per_site: int = typer.Option(40, "--series-per-site", help="DICOM series per hospital."),
    workers: int = typer.Option(0, "--workers", help="Processes, one site each; 0 = one per CPU core."),
) -> None:
    """Write synthetic hospitals: real DICOM series, reports.csv, labels.csv and lesion masks per site.

    Sites differ as real hospitals do (vendor, field strength, resolution, plane,
    noise, bias field, case mix). Rerunning with the same arguments keeps the
    sites already written; a folder holding another federation is refused.
    """
    import os

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedmri.simulations.synth import generate_federation

    workers = workers if workers > 0 else max(1, min(sites, os.cpu_count() or 1))
    err = Console(stderr=True)
    if not err.is_terminal:  # a log file: lines, not bars
        lines = ProgressLines(err)
        infos = generate_federation(out, sites=sites, seed=seed, preset=preset, series_per_site=series_per_site,
                                    progress=lines.update, workers=workers)
    else:
        with Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err) as bars:
            tasks: dict[str, Any] = {}

            def progress(site: str, done: int, total: int) -> None:
                if site not in tasks:
                    tasks[site] = bars.add_task(site, total=total)
                bars.update(tasks[site], completed=done, total=total)

            infos = generate_federation(out, sites=sites, seed=seed, preset=preset,
                                        series_per_site=series_per_site, progress=progress, workers=workers)
    from fedmri.data.metadata import normalise_vendor

    table = Table(title=f"Synthetic hospitals in {out}", caption="studies per body region and per finding")
    for column in ("site", "scanner", "series", "patients", "regions", "findings"):
        table.add_column(column)
    for info in infos:
        table.add_row(
            info.name + (" (kept)" if info.reused else ""),
            f"{normalise_vendor(info.vendor)} {info.field_strength:g}T",
            str(info.n_series), str(info.n_patients),
            " ".join(f"{k} {v}" for k, v in sorted(info.regions.items())),
            " ".join(f"{k} {v}" for k, v in sorted(info.findings.items())) or "none",
        )
    Console().print(table)
