"""How fast does `fedmri data index` register a hospital export, on 1 and 2 processes, against dcm2niix?

Indexes one synthetic export of ``--series`` series (2,000 by default) from
scratch with ``--workers 1`` (this process only) and ``--workers 2``, converts
the same files with dcm2niix (``dcm2niix -z n -b n -o OUT IN``, one process)
for scale, then re-indexes the unchanged export (median of ``--repeats``
runs), which must cost at least 20 times less than the first index. Figures
are printed, never asserted (docs/architecture.md, "Benchmarks").

    .venv/bin/python benchmarks/bench_index.py [--series 2000] [--data runs/bench-index/data]

The export is synthesised once, in blocks of 250 series (``preset="tiny"``
sites of ``fedmri.simulations.synth.generate_site``, one site each: vendors,
classic and Enhanced MR files, planes differ), and kept in ``--data``: a rerun,
or one with fewer series, reuses them. Files were just written or read, so
they are in the OS page cache: the figures are for a warm cache, i.e. CPU-bound
reading, not disk. dcm2niix only converts; fedmri also groups and selects
volumes, resamples each onto the preset's grid and writes the cache entry.
``--workers 1`` is one process, but torch resamples on all cores; the parallel
run's time includes starting its workers (one import of torch and MONAI in a
forkserver), shown apart in its notes.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedmri.config import load_config
from fedmri.data.index_pool import IndexPool
from fedmri.data.indexer import IndexResult, index_site
from fedmri.simulations.synth import generate_site

BLOCK = 250  # series per synthetic site; an export is 1..N of them
REPORT_COLUMNS = ["accession_number", "study_instance_uid", "findings", "impression"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=2000,
                        help=f"series in the export: below {BLOCK}, or a multiple of it (e.g. 200, 500, 2000)")
    parser.add_argument("--data", type=Path, default=Path("runs/bench-index/data"),
                        help="folder for the synthetic export (kept for reuse) and the catalogs")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the parallel run")
    parser.add_argument("--repeats", type=int, default=3, help="re-index repeats (median reported)")
    parser.add_argument("--preset", default="tiny", help="config preset for data.preprocess")
    args = parser.parse_args()
    if args.series < 1 or (args.series > BLOCK and args.series % BLOCK):
        parser.error(f"--series {args.series}: give a number below {BLOCK} or a multiple of {BLOCK}")
    console = Console(width=120)  # the table stays whole when piped to a file
    cfg = load_config(args.preset)

    start = time.perf_counter()
    export, reports, made = make_export(args.data, args.series)
    n_files = sum(1 for _ in export.rglob("*") if _.is_file())
    console.print(f"export: {args.series} series, {n_files} files in {export} "
                  f"({'synthesised' if made else 'reused'} in {time.perf_counter() - start:.1f} s)")

    rows: list[tuple[str, ...]] = []
    dcm_s, dcm_out = run_dcm2niix(export, args.data / "dcm2niix")
    rows.append(("dcm2niix (1 process)", str(args.series), f"{dcm_s:.1f}", f"{args.series / dcm_s:.1f}", "1.00",
                 f"{dcm_out} NIfTI files"))
    first: dict[int, tuple[IndexResult, float]] = {}
    for workers in (1, args.workers):
        catalog = args.data / f"catalog-w{workers}"
        shutil.rmtree(catalog, ignore_errors=True)  # from scratch: no catalog, no cache
        t0 = time.perf_counter()
        start_s = start_workers(workers)  # what a `fedmri data index` run pays once, timed apart
        result = index_site(export, reports, catalog, cfg=cfg, workers=workers)
        seconds = time.perf_counter() - t0
        first[workers] = (result, seconds)
        rate = result.n_loaded / seconds
        rows.append((f"fedmri index, --workers {workers}", str(result.n_loaded), f"{seconds:.1f}", f"{rate:.1f}",
                     f"{rate / (args.series / dcm_s):.2f}",
                     (f"workers start {start_s:.1f} s, " if workers > 1 else "")
                     + f"headers {result.seconds['files']:.1f} s, series {result.seconds['series']:.1f} s, "
                     f"{len(result.skipped)} skipped"))
    again = []
    catalog = args.data / f"catalog-w{args.workers}"
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        result = index_site(export, reports, catalog, cfg=cfg, workers=args.workers)
        again.append(time.perf_counter() - t0)
        if result.n_loaded or result.n_headers_read:
            console.print(f"[red]re-index read {result.n_headers_read} headers, {result.n_loaded} series: "
                          "unchanged data should cost none[/]")
    again_s = statistics.median(again)
    first_s = first[args.workers][1]
    rows.append((f"re-index, nothing new (median of {args.repeats})", "0", f"{again_s:.2f}", "-", "-",
                 f"first index / re-index = {first_s / again_s:.0f}x"))

    pre = cfg.data.preprocess
    table = Table(title=f"fedmri data index on {args.series} series, {n_files} files, preset {args.preset} "
                        f"(target {list(pre.target_shape)} @ {list(pre.target_spacing)} mm), "
                        f"{len(os.sched_getaffinity(0))} CPUs")
    for col in ("run", "series", "s", "series/s", "vs dcm2niix", "notes"):
        table.add_column(col, justify="left" if col in ("run", "notes") else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    speedup = first[1][1] / first[args.workers][1]
    console.print(f"--workers {args.workers} vs 1: {speedup:.2f}x faster; re-index {first_s / again_s:.0f}x faster "
                  f"than the first index ({'meets' if first_s / again_s >= 20 else '[red]BELOW[/]'} the 20x target)")
    same = first[1][0].n_series == first[args.workers][0].n_series
    console.print(f"catalogs: {first[1][0].n_series} series with 1 worker, {first[args.workers][0].n_series} with "
                  f"{args.workers}{'' if same else ' [red](differ)[/]'}")


def make_export(data: Path, n_series: int) -> tuple[Path, Path, bool]:
    """``(export folder, reports.csv, synthesised now)``: blocks of synthetic sites, hard-linked into one folder."""
    block = min(n_series, BLOCK)
    sites = [(data / "blocks" / f"{block}" / f"site-{k:02d}", k) for k in range(1, n_series // block + 1)]
    todo = [(path, k) for path, k in sites if not (path / "reports.csv").is_file()]
    if todo:  # one site per process; spawn: this process may hold torch threads
        with ProcessPoolExecutor(max(1, min(len(todo), os.cpu_count() or 1)), mp_context=mp.get_context("spawn")) \
                as pool:
            list(pool.map(_synth_site, [p for p, _ in todo], [k for _, k in todo], [block] * len(todo)))
    export, reports = data / f"export-{n_series}", data / f"export-{n_series}.reports.csv"
    if not reports.is_file():
        shutil.rmtree(export, ignore_errors=True)
        rows = []
        for path, _ in sites:  # hard links: the same files (and mtimes) without the disk space
            shutil.copytree(path / "dicom", export / path.name, copy_function=os.link)
            with open(path / "reports.csv", newline="", encoding="utf-8") as fh:
                rows += list(csv.DictReader(fh))
        tmp = reports.with_suffix(".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, REPORT_COLUMNS)
            writer.writeheader()
            writer.writerows({k: r[k] for k in REPORT_COLUMNS} for r in rows)
        tmp.replace(reports)  # last: an export with its reports.csv is complete
    return export, reports, bool(todo)


def start_workers(workers: int) -> float:
    """Seconds to start this process' forkserver (one import of the indexer) and ``workers`` workers from it."""
    if workers == 1:
        return 0.0
    t0 = time.perf_counter()
    with IndexPool(workers) as pool:
        list(pool.map(_nothing, [(i,) for i in range(2 * workers)]))
    return time.perf_counter() - t0


def _nothing(i: int) -> int:
    return i


def _synth_site(path: Path, index: int, n_series: int) -> None:
    generate_site(path, site_index=index, seed=0, preset="tiny", series_per_site=n_series)


def run_dcm2niix(export: Path, out: Path) -> tuple[float, int]:
    """Seconds dcm2niix takes to convert the whole export, and the NIfTI files it wrote."""
    exe = Path(sys.executable).parent / "dcm2niix"
    exe = str(exe) if exe.is_file() else shutil.which("dcm2niix")
    if exe is None:
        raise SystemExit("dcm2niix not found: pip install -e '.[test]'")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    done = subprocess.run([exe, "-z", "n", "-b", "n", "-o", str(out), str(export)], capture_output=True, text=True,
                          check=False)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"dcm2niix failed ({done.returncode}): {done.stderr[-2000:] or done.stdout[-2000:]}")
    return seconds, len(list(out.glob("*.nii")))


if __name__ == "__main__":
    main()
