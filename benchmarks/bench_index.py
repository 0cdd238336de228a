"""How fast does `fedmri data index` register a site, and how cheap is re-indexing unchanged data?

Generates (or reuses) the demo federation (3 sites x 40 series by default),
indexes each site into a fresh catalog, and prints series/s and MB/s of DICOM
read for that first index; then re-indexes the unchanged data a few times and
prints the median re-index time as a fraction of the first index. Figures only,
never asserted (docs/architecture.md, "Benchmarks").

    .venv/bin/python benchmarks/bench_index.py [--out runs/bench-index] [--repeats 3]

The DICOM files were just written (or read) so they are in the OS page cache:
the first-index figures are for a warm cache, i.e. CPU-bound reading, not disk.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedmri.config import load_config
from fedmri.data.indexer import index_site
from fedmri.simulations.synth import generate_federation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-index"), help="work folder (kept for reuse)")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--series", type=int, default=40, help="series per site")
    parser.add_argument("--repeats", type=int, default=3, help="re-index repeats (median reported)")
    parser.add_argument("--preset", default="tiny", help="config preset for data.preprocess")
    args = parser.parse_args()
    console = Console(width=110)  # the table stays whole when piped to a file
    cfg = load_config(args.preset)

    start = time.perf_counter()
    infos = generate_federation(args.out / "federation", sites=args.sites, seed=0, series_per_site=args.series)
    reused = all(info.reused for info in infos)
    console.print(f"federation: {args.sites} sites x {args.series} series "
                  f"({'reused' if reused else 'generated'} in {time.perf_counter() - start:.1f} s)")

    pre = cfg.data.preprocess
    table = Table(title=f"fedmri data index, preset {args.preset} "
                        f"(target {list(pre.target_shape)} @ {list(pre.target_spacing)} mm)")
    # re-index: median of --repeats runs over the unchanged data; ratio = re-index / first.
    for col in ("site", "series", "files", "MB read", "first s", "series/s", "MB/s", "re-index s", "ratio"):
        table.add_column(col, justify="right")
    totals = {"series": 0, "bytes": 0, "first": 0.0, "again": 0.0}
    for info in infos:
        site, catalog = Path(info.path), args.out / "catalogs" / Path(info.path).name
        shutil.rmtree(catalog, ignore_errors=True)  # from scratch: no catalog, no cache
        inputs = dict(dicom_root=site / "dicom", reports=site / "reports.csv", out=catalog,
                      labels=site / "labels.csv", cfg=cfg)
        t0 = time.perf_counter()
        first = index_site(**inputs)
        first_s = time.perf_counter() - t0
        again = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            result = index_site(**inputs)
            again.append(time.perf_counter() - t0)
            if result.n_loaded or result.n_headers_read:
                console.print(f"[red]{site.name}: re-index read {result.n_headers_read} headers, "
                              f"{result.n_loaded} series: unchanged data should cost none[/]")
        again_s = statistics.median(again)
        mb = first.bytes_loaded / 1e6
        table.add_row(site.name, str(first.n_series), str(first.n_files), f"{mb:.1f}", f"{first_s:.2f}",
                      f"{first.n_series / first_s:.2f}", f"{mb / first_s:.2f}", f"{again_s:.3f}",
                      f"{again_s / first_s:.3f}")
        if first.skipped:
            console.print(f"[yellow]{site.name}: {len(first.skipped)} input(s) skipped[/]")
        totals["series"] += first.n_series
        totals["bytes"] += first.bytes_loaded
        totals["first"] += first_s
        totals["again"] += again_s
    mb = totals["bytes"] / 1e6
    table.add_row("all", str(totals["series"]), "", f"{mb:.1f}", f"{totals['first']:.2f}",
                  f"{totals['series'] / totals['first']:.2f}", f"{mb / totals['first']:.2f}",
                  f"{totals['again']:.3f}", f"{totals['again'] / totals['first']:.3f}")
    console.print(table)
    console.print(f"re-index s: median of {args.repeats} re-indexes of the unchanged data; ratio = re-index / first")


if __name__ == "__main__":
    main()
