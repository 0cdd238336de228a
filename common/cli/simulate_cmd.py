"""`fedmri simulate`: the researcher's whole federation on one machine."""

from __future__ import annotations

import time
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from fedmri.simulations.columns import ZEROSHOT_PREFIX, pick

console = Console()

# Columns of the results tables: (metric key, header, format), from the one list of the
# simulation's metrics (fedmri.simulations.columns). The encoder's own probes, then the task heads
# of the heads stage (two tables fit 80 columns), then the lesion heads, a table of their own.
def _columns(*keys: str) -> tuple[tuple[str, str, str], ...]:
    return tuple((c.key, c.short, c.fmt) for c in pick(*keys))


COLUMNS = _columns("val_loss", "knn_sequence_acc", "knn_body_region_acc", "i2t_r1", "t2i_r1", "t2i_medr",
                   "num-examples")
HEAD_COLUMNS = _columns("findings_auroc_macro", "findings_auroc_in_region_macro", "sequence_accuracy",
                        "body_region_accuracy", "age_mae", "sex_auroc")
DENSE_COLUMNS = _columns("segmentation_dice", "anomaly_miou", "dense-examples", "lesion-free-examples")
# A hospital outside the federation: transfer, and what pretraining is worth against random init.
HOLDOUT_COLUMNS = _columns("t2i_r5", "t2i_medr", "findings_auroc_macro", "findings_auroc_in_region_macro",
                           "body_region_accuracy", "age_mae")
# Under a mode's row, the findings with no head (text prompts through the aligned space, fedmri.align.zeroshot)
# in the heads' own findings columns: each figure sits under the head's, and the tables stay within 80 columns.
ZEROSHOT_ROW = "  zero-shot"


def simulate_command(
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...",
                                          help="Overrides, e.g. sites=4 federation.stages.0.rounds=2."),
    config: str = typer.Option(None, "--config", "-c", help="Simulation YAML (default: the embedded demo)."),
    mode: list[str] = typer.Option(None, "--mode", "-m",
                                   help="federated, random, local, central or ceiling; repeat for several "
                                        "(default: all five)."),
    resume: bool = typer.Option(False, "--resume", help="Continue each mode from its last complete round."),
) -> None:
    """[researcher] Simulate a whole federation on this machine: synthetic hospitals,
    pretrain -> align -> heads -> evaluate, against a random-init encoder, local-only and
    centralized baselines, scored on the sites and on a hospital held out of the federation."""
    from fedmri.simulations.runner import AT_HOLDOUT, load_simulation, simulate

    extra = list(overrides or [])
    if mode:
        extra.append("modes=[" + ",".join(mode) + "]")
    if resume:
        extra.append("federation.resume=true")
    sim = load_simulation(config, extra)
    t0 = time.monotonic()
    summary = simulate(sim, say=lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True))
    sites = {k: v for k, v in summary.items() if not k.endswith(AT_HOLDOUT)}
    held = {k[: -len(AT_HOLDOUT)]: v for k, v in summary.items() if k.endswith(AT_HOLDOUT)}
    console.print(results_table(sites, f"fedmri simulate: {sim.federation.name}"))
    for rows, title, columns in ((sites, "task heads on the frozen encoder", HEAD_COLUMNS),
                                 (sites, "lesion heads on the frozen encoder", DENSE_COLUMNS),
                                 (held, "on the hospital held out of the federation", HOLDOUT_COLUMNS),
                                 (held, "lesion heads on the held-out hospital", DENSE_COLUMNS)):
        table = results_table(rows, title, columns)
        if rows and table.columns[1:]:
            console.print(table)
    console.print("Sites: each site's validation split; held out: every series of a hospital that never "
                  "trained. Weighted by series. random = the same heads tuned on a randomly initialised "
                  "encoder. SSL = self-distillation loss; seq / region 1-NN = accuracy of the nearest training "
                  "series' sequence / body region in the encoder's CLS space; i2t / t2i = image->report / "
                  "report->image retrieval (R@k, median rank MdR); AUROC in region = findings AUROC within the body "
                  "regions where each finding occurs; zero-shot (under a mode) = its findings AUROCs with no "
                  "head, from text prompts in the aligned image-report space. low-high under a figure = its 95% "
                  "interval over resamples of the hospital's patients (computed at the site; shown where one "
                  "hospital is scored alone)." + (DENSE_NOTE if _has_dense(summary) else ""),
                  highlight=False, markup=False, soft_wrap=True)
    console.print(f"run folder: {sim.federation.run_root}/{sim.federation.name}   "
                  f"({time.monotonic() - t0:.0f} s)", highlight=False)


DENSE_NOTE = (" Lesion heads: segmentation Dice = mean Dice of the predicted lesion mask, anomaly mIoU = mean "
              "IoU of the anomaly map above 0.5, over the series with a lesion target (a mask, or a study with no "
              "finding: all background), lesion-free of them; a head that finds no lesion anywhere scores "
              "lesion-free / series on both.")


def _has_dense(summary: dict[str, dict[str, Any]]) -> bool:
    return any(key in metrics for metrics in summary.values() for key, _, _ in DENSE_COLUMNS)


def results_table(summary: dict[str, dict[str, Any]], title: str,
                  columns: tuple[tuple[str, str, str], ...] = COLUMNS) -> Table:
    """One row per mode, the evaluation metrics of ``columns`` that exist as columns.

    Under a mode whose sites scored findings zero-shot, a ``zero-shot`` row holds
    ``zeroshot_<key>`` in the column of each ``<key>`` that has one.
    """
    present = [c for c in columns if any(k in m for m in summary.values() for k in (c[0], ZEROSHOT_PREFIX + c[0]))]
    table = Table(title=title)
    table.add_column("mode", no_wrap=True, min_width=9)
    for _, header, _ in present:
        table.add_column(header, justify="right")
    for mode, metrics in summary.items():
        table.add_row(mode, *(cell(metrics, key, fmt) for key, _, fmt in present))
        zeroshot = [ZEROSHOT_PREFIX + key for key, _, _ in present]
        if any(key in metrics for key in zeroshot):
            table.add_row(ZEROSHOT_ROW, *(cell(metrics, key, fmt) if key in metrics else ""
                                          for key, (_, _, fmt) in zip(zeroshot, present)))
    return table


def cell(metrics: dict[str, Any], key: str, fmt: str) -> str:
    """``metrics[key]`` formatted, with its 95% interval below it where the site computed one; "-" if absent."""
    from fedmri.metrics.bootstrap import interval_bounds

    if key not in metrics:
        return "-"
    text = fmt.format(metrics[key])
    if (bounds := interval_bounds(metrics, key)) is None:
        return text
    # ".80-.91": no space and no leading zero, so the interval fits under its figure in 80 columns.
    return f"{text}\n{_bare(fmt.format(bounds[0]))}-{_bare(fmt.format(bounds[1]))}"


def _bare(number: str) -> str:
    return number[1:] if number.startswith("0.") else number
