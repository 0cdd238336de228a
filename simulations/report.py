"""The results report of `fedmri simulate`: ``report.md`` and cross-site heatmaps.

Reads what :func:`fedmri.simulations.runner.simulate` leaves in ``<run_root>/<name>/``
(one folder per training run, each with its ``results.json``, plus the top
``results.json`` of the modes) and writes ``report.md`` next to them, with one
heatmap PNG per headline metric under ``plots/``.

The cross-site matrix has one row per place the encoder and heads were trained
(each site alone, the federation, the pooled data, and the randomly initialised
encoder tuned federatedly) and one column per site whose validation split was
scored, held-out hospitals included.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from fedmri.errors import InputError
from fedmri.machine import describe
from fedmri.simulations import columns
from fedmri.metrics.bootstrap import interval_bounds

# metric key -> (label, format), from the one list of the simulation's metrics
# (fedmri.simulations.columns). The encoder's own probes, the task heads, the lesion heads (over the
# series with a lesion target: ``dense-examples``), and the findings with no head (a mode's
# ``zeroshot_<key>`` shows in a row of its own under the mode, in the column of ``<key>``).
PROBES: dict[str, tuple[str, str]] = {c.key: (c.label, c.fmt) for c in columns.PROBES}
HEADS: dict[str, tuple[str, str]] = {c.key: (c.label, c.fmt) for c in columns.HEADS}
DENSE: dict[str, tuple[str, str]] = {c.key: (c.label, c.fmt) for c in columns.DENSE}
ZEROSHOT_PREFIX = columns.ZEROSHOT_PREFIX
ZEROSHOT: dict[str, tuple[str, str]] = {c.key: (c.label, c.fmt) for c in columns.ZEROSHOT}
# The cross-site matrices drawn, when the runs measured them.
HEADLINE = ("findings_auroc_macro", "findings_auroc_in_region_macro", "zeroshot_findings_auroc_in_region_macro",
            "sequence_accuracy", "body_region_accuracy", "age_mae", "segmentation_dice", "anomaly_miou", "t2i_r1",
            "t2i_r5", "knn_sequence_acc")
_MODE_ORDER = {"federated": 0, "random": 1, "local": 2, "central": 3}  # as `fedmri simulate` runs them
# Row labels of the runs that are not one site alone.
_RUN_LABELS = {"federated": "federated", "random": "random init (federated heads)", "central": "central"}
# Metrics in [0, 1] share one colour scale so that matrices compare at a glance.
_UNIT_SUFFIXES = ("_acc", "_accuracy", "_auroc", "_auroc_macro", "_in_region_macro", "_f1", "_f1_macro", "_r1", "_r5",
                  "_r10", "_dice", "_miou")


def lower_is_better(metric: str) -> bool:
    """True for losses, errors, ranks and distances (``val_loss``, ``age_mae``, ``t2i_medr``, ``segmentation_hd95``)."""
    return metric.endswith(("loss", "_mae", "_medr", "_hd95"))


def colormap_for(metric: str) -> str:
    """A red-to-green matplotlib colormap whose green end is the better value of ``metric``."""
    return "RdYlGn_r" if lower_is_better(metric) else "RdYlGn"


def _label(metric: str) -> str:
    return {**PROBES, **HEADS, **DENSE, **ZEROSHOT}.get(metric, (metric, ""))[0]


def _fmt(metric: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return {**PROBES, **HEADS, **DENSE, **ZEROSHOT}.get(metric, ("", "{:.3g}"))[1].format(value)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}; rerun `fedmri simulate` for this run") from exc


def _runs(sim_dir: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    """{row label: (folder name, results.json)} in row order: each site alone, federated, random, central."""
    local = sorted(p for p in sim_dir.glob("local-*") if (p / "results.json").is_file())
    ordered = [(p.name[len("local-"):] + " alone", p) for p in local]
    ordered += [(label, sim_dir / m) for m, label in _RUN_LABELS.items() if (sim_dir / m / "results.json").is_file()]
    return {label: (p.name, _read_json(p / "results.json")) for label, p in ordered}


def cross_site_matrix(sim_dir: Path, metric: str) -> tuple[list[str], list[str], list[list[float | None]]]:
    """The cross-site evaluation matrix of ``metric``.

    Args:
        sim_dir: The run folder of `fedmri simulate` (``<run_root>/<name>``).
        metric: A per-site evaluation key, e.g. ``findings_auroc_macro``.

    Returns:
        (rows, cols, values): rows are where the model was trained (``"site-01 alone"``, ...,
        ``"federated"``, ``"central"``), cols the sites whose validation split was scored,
        ``values[i][j]`` the metric or None where that site did not report it.
    """
    runs = _runs(Path(sim_dir))
    if not runs:
        raise InputError(f"no run with a results.json under {sim_dir}; is it a `fedmri simulate` run folder?")
    top = Path(sim_dir) / "results.json"
    held = set(_read_json(top).get("holdout_sites", [])) if top.is_file() else set()
    # The federation's sites, then the held-out hospitals.
    cols = sorted({site for _, res in runs.values() for site in res.get("per_site", {})}, key=lambda c: (c in held, c))
    values = [[_value(res.get("per_site", {}).get(c, {}).get(metric)) for c in cols] for _, res in runs.values()]
    return list(runs), cols, values


def _value(v: Any) -> float | None:
    return None if v is None else float(v)


def plot_matrix(path: Path, rows: list[str], cols: list[str], values: list[list[float | None]],
                metric: str) -> Path:
    """An annotated heatmap of one cross-site matrix; missing cells are grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    unit = metric.endswith(_UNIT_SUFFIXES)
    finite = data[np.isfinite(data)]
    lo, hi = (0.0, 1.0) if unit or finite.size == 0 else (float(finite.min()), float(finite.max()))
    if hi <= lo:  # one value everywhere: keep a visible scale
        lo, hi = lo - 0.5, hi + 0.5
    cmap = plt.get_cmap(colormap_for(metric)).with_extremes(bad="#d9d9d9")  # missing cells grey
    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * len(cols), 0.9 + 0.5 * len(rows)))
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            shade = (data[i, j] - lo) / (hi - lo) if np.isfinite(data[i, j]) else 0.5
            ax.text(j, i, _fmt(metric, values[i][j]), ha="center", va="center", fontsize=8,
                    color="white" if shade < 0.15 or shade > 0.85 else "black")  # the colormap's dark ends
    ax.set_xticks(range(len(cols)), cols, fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("validation split scored")
    better = "lower" if lower_is_better(metric) else "higher"
    ax.set_title(f"{_label(metric)} ({better} is better)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _table(header: list[str], rows: list[list[str]], numbers: bool = True) -> list[str]:
    """A markdown table; ``numbers`` right-aligns every column but the first."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + ("---:|" if numbers else "---|") * (len(header) - 1)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _mode_table(modes: dict[str, dict[str, Any]], columns: dict[str, tuple[str, str]]) -> list[str]:
    present = [k for k in columns if any(k in m or ZEROSHOT_PREFIX + k in m for m in modes.values())]
    if not present:
        return []
    header = ["mode"] + [columns[k][0] + (" ↓" if lower_is_better(k) else "") for k in present]
    rows = []
    for mode, m in modes.items():
        rows.append([mode] + [_cell(k, m) for k in present])
        zeroshot = [ZEROSHOT_PREFIX + k for k in present]
        if any(k in m for k in zeroshot):
            rows.append([f"{mode} zero-shot"] + [_cell(k, m) if k in m else "" for k in zeroshot])
    return _table(header, rows) + [""]


def _cell(metric: str, metrics: dict[str, Any]) -> str:
    """The figure, with its 95% patient-bootstrap interval where the scoring site computed one."""
    text = _fmt(metric, metrics.get(metric))
    if (bounds := interval_bounds(metrics, metric)) is None:
        return text
    return f"{text} [{_fmt(metric, bounds[0])}, {_fmt(metric, bounds[1])}]"


DENSE_NOTE = ("Lesion heads (`heads.tasks` segmentation, anomaly) on the encoder's cached tokens: segmentation Dice "
              "is the mean Dice of the predicted lesion mask, anomaly mIoU the mean IoU of the anomaly map above 0.5, "
              "over the `series` with a lesion target (a mask, or a study with no finding: all background; the "
              "others are unknown), `lesion-free` of them: a head that finds no lesion anywhere scores "
              "lesion-free / series on both. "
              "Intervals: 95%, over resamples of the hospital's patients, where one hospital is scored alone.")


def _zeroshot_note(modes: dict[str, dict[str, Any]]) -> list[str]:
    if not any(k in m for k in ZEROSHOT for m in modes.values()):
        return []
    return ["`zero-shot` rows: the mode's findings AUROCs with no head, from text prompts (\"No acute infarct.\" "
            "against \"Acute infarct in the left basal ganglia.\") in the space the align stage shares between "
            "images and reports, scored on the same series as the heads.", ""]


def _in_mode_order(modes: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return dict(sorted(modes.items(), key=lambda kv: (_MODE_ORDER.get(kv[0], len(_MODE_ORDER)), kv[0])))


def write_report(sim_dir: Path, title: str | None = None) -> Path:
    """Write ``<sim_dir>/report.md`` and ``<sim_dir>/plots/cross_site_<metric>.png``.

    Args:
        sim_dir: The run folder of `fedmri simulate` (``<run_root>/<name>``).
        title: The report's heading (default: ``fedmri simulate: <name>``).

    Returns:
        The path of ``report.md``.
    """
    sim_dir = Path(sim_dir)
    top = sim_dir / "results.json"
    if not top.is_file():
        raise InputError(f"{top} is missing; rerun `fedmri simulate` for this run")
    summary = _read_json(top)
    modes, holdout = (_in_mode_order(summary.get(key, {})) for key in ("modes", "holdout"))
    held = ", ".join(summary.get("holdout_sites", [])) or "the held-out hospitals"
    runs = _runs(sim_dir)
    date = time.strftime("%Y-%m-%d %H:%M", time.localtime(top.stat().st_mtime))
    n_local = sum(1 for label in runs if label.endswith(" alone"))

    machine = summary.get("machine")
    computed = (f" Computed with {describe(machine)}: the same seed repeats these figures exactly with the "
                "same packages on the same kind of CPU (another instruction set or vendor rounds differently, "
                "and training carries the difference on)." if machine else "")
    md = [f"# {title or f'fedmri simulate: {sim_dir.name}'}", "",
          f"Run `{sim_dir.name}`, finished {date}.{computed}", "",
          "## Results per mode", "",
          "On the validation splits of the federation's sites, weighted by series. `local` is the mean of the "
          f"{n_local} models each trained on one site alone; `random` tunes the same heads the same way on a "
          "randomly initialised encoder. ↓: lower is better.", ""]
    if probes := _mode_table(modes, PROBES):
        md += ["### Encoder probes", ""] + probes
    note = _zeroshot_note(modes)  # said once, before the first table with zero-shot rows
    if heads := _mode_table(modes, HEADS):
        md += ["### Task heads on the frozen encoder", ""] + note + heads
    if dense := _mode_table(modes, DENSE):
        md += ["### Lesion heads on the frozen encoder", "", DENSE_NOTE, ""] + dense
    if holdout:
        md += ["## On a hospital outside the federation", "",
               f"Every series of {held}: synthesised from a seed of its own, with the next scanner "
               "archetypes; it never trains, so this is transfer to a new hospital. `random` is the same "
               "heads tuning on a randomly initialised encoder: the gap is what federated pretraining and "
               "alignment are worth.", ""]
        md += _mode_table(holdout, PROBES) + ([] if note else _zeroshot_note(holdout)) + _mode_table(holdout, HEADS)
        if held_dense := _mode_table(holdout, DENSE):
            md += ([] if dense else [DENSE_NOTE, ""]) + held_dense
        md += _differences_section(summary.get("holdout_differences") or {})
        md += _by_sequence_section(holdout)

    md += ["## Cross-site evaluation", "",
           "Rows: where the encoder and heads were trained; columns: the site whose validation split "
           "was scored (a held-out hospital: all its series). The diagonal of the `alone` rows is in-site, "
           "the rest is transfer. – : the site did not report the metric (e.g. AUROC on a split where a "
           "label has one class only).", ""]
    for metric in HEADLINE if runs else ():
        rows, cols, values = cross_site_matrix(sim_dir, metric)
        if all(v is None for row in values for v in row):
            continue
        png = plot_matrix(sim_dir / "plots" / f"cross_site_{metric}.png", rows, cols, values, metric)
        better = "lower" if lower_is_better(metric) else "higher"
        md += [f"### {_label(metric)} ({better} is better)", ""]
        md += _table(["trained on \\ scored on", *cols], [[r] + [_fmt(metric, v) for v in row]
                                                         for r, row in zip(rows, values)])
        md += ["", f"![{_label(metric)}]({png.relative_to(sim_dir).as_posix()})", ""]

    md += ["## Runs", ""]
    run_rows = []
    for label, (folder, res) in runs.items():
        plots = sorted((sim_dir / folder / "plots").glob("*.png"))
        links = " · ".join(f"[{p.stem}]({folder}/plots/{p.name})" for p in plots) or "–"
        privacy = f"[privacy.md]({folder}/privacy.md)" if (sim_dir / folder / "privacy.md").is_file() else "–"
        run_rows.append([f"`{folder}`", label, str(res.get("rounds", "–")), links, privacy])
    md += _table(["folder", "trained on", "rounds", "loss plots", "privacy"], run_rows, numbers=False) + [""]

    md += ["## Splits", "", _splits_paragraph(runs), ""]
    path = sim_dir / "report.md"
    path.write_text("\n".join(md), encoding="utf-8")
    return path


BY_SEQUENCE = "findings_auroc_in_region/"


def _by_sequence_section(modes: dict[str, dict[str, Any]]) -> list[str]:
    """Each finding's in-region AUROC per sequence family, one column per mode."""
    keys = sorted({k for m in modes.values() for k in m if k.startswith(BY_SEQUENCE) and "@" in k and "_ci_" not in k})
    if not keys:
        return []
    names = [mode for mode, m in modes.items() if any(k in m for k in keys)]
    rows = [[f"{k[len(BY_SEQUENCE):].replace('@', ' on ')}"] + [_fmt("findings_auroc_in_region_macro", modes[n].get(k))
                                                               for n in names] for k in keys]
    return ["### Findings by sequence", "",
            "Labels are per study, so every series of a study with a mass is positive; whether the lesion "
            "shows depends on the sequence (it enhances on T1 post-contrast; an acute infarct is bright on "
            "DWI and dark on ADC). Each finding's in-region AUROC among the series of one sequence family:", ""] \
        + _table(["finding on sequence", *names], rows) + [""]


def _differences_section(differences: dict[str, Any]) -> list[str]:
    """Which differences on each held-out hospital are significant (:mod:`fedmri.simulations.compare`)."""
    from fedmri.simulations.compare import verdict

    md: list[str] = []
    for hospital, found in differences.items():
        rows = []
        for metric, by_mode in found.get("differences", {}).items():
            for mode, d in by_mode.items():
                said = verdict(d)
                rows.append([_label(metric), f"federated - {mode}",
                             f"{d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]",
                             f"**{said}**" if d["significant"] else said])
        if not rows:
            continue
        md += [f"### Which differences are significant at {hospital}", "",
               f"Paired: {hospital} scores every mode's exported encoder and heads on its own "
               f"{found['series']} series, and the same {found['patients']} patients are resampled for both "
               "sides of each difference (95% interval; significant when it leaves out 0). Intervals of two "
               "rows above can overlap while their paired difference is significant.", ""]
        md += _table(["metric", "difference", "value [95% CI]", ""], rows) + [""]
    return md


def _splits_paragraph(runs: dict[str, tuple[str, dict[str, Any]]]) -> str:
    counts: dict[str, float] = {}
    for _, res in runs.values():
        for site, metrics in res.get("per_site", {}).items():
            if "num-examples" in metrics:
                counts.setdefault(site, metrics["num-examples"])
    sizes = ", ".join(f"{site} {counts[site]:.0f}" for site in sorted(counts)) or "not recorded"
    smallest = min((c for c in counts.values() if c > 0), default=0)
    step = f" (up to {100 / smallest:.0f} points of accuracy on the smallest split)" if smallest else ""
    return ("Every model is scored on each site's own validation split, the same series for every row "
            f"(series per split: {sizes}). Each site keeps its split on site; only the metrics travel. "
            f"At these sizes one series more or less right is a large step{step}, so differences of one "
            "series between rows are noise, not a finding.")
