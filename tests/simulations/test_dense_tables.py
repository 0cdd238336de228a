"""The lesion heads (segmentation, anomaly) as `fedmri simulate` shows them: terminal tables and report.md."""

from __future__ import annotations

import json
from pathlib import Path

# What the evaluate stage sends for one hospital scored alone: the figure, its patient-bootstrap
# interval, and the series with a lesion target behind it.
_HELD = {"findings_auroc_macro": 0.7, "segmentation_dice": 0.4127, "segmentation_dice_ci_low": 0.27,
         "segmentation_dice_ci_high": 0.57, "segmentation_hd95": 12.5, "anomaly_miou": 0.167,
         "anomaly_miou_ci_low": 0.09, "anomaly_miou_ci_high": 0.25, "dense-examples": 150.0,
         "lesion-free-examples": 61.0, "num-examples": 150.0}
# The sites' rows are means over sites: no interval.
_SITES = {"segmentation_dice": 0.31, "anomaly_miou": 0.05, "dense-examples": 22.0, "lesion-free-examples": 6.0,
          "num-examples": 22.0}


def test_the_terminal_tables_show_dice_miou_their_intervals_and_series_within_80_columns() -> None:
    from rich.console import Console

    from fedmri.cli.simulate_cmd import DENSE_COLUMNS, HEAD_COLUMNS, _has_dense, results_table

    console = Console(width=80, record=True)
    console.print(results_table({"federated": _HELD, "random": _HELD | {"segmentation_dice": 0.2},
                                 "ceiling": {"findings_auroc_macro": 0.6}}, "lesion heads", DENSE_COLUMNS))
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80
    header = next(line for line in lines if "mode" in line)
    assert [c.strip() for c in header.split("┃")[1:-1]] == ["mode", "segmentation Dice", "anomaly mIoU", "series",
                                                             "lesion-free"]
    row = next(i for i, line in enumerate(lines) if "federated" in line)
    assert [c.strip() for c in lines[row].split("│")[1:-1]] == ["federated", "0.41", "0.17", "150", "61"]
    assert [c.strip() for c in lines[row + 1].split("│")[2:4]] == [".27-.57", ".09-.25"]  # intervals under them
    assert "0.20" in next(line for line in lines if "random" in line)
    assert [c.strip() for c in next(line for line in lines if "ceiling" in line).split("│")[2:-1]] == ["-"] * 4
    # A run without lesion heads prints no such table (no column present) and no note about them.
    assert not results_table({"federated": {"sequence_accuracy": 0.9}}, "t", DENSE_COLUMNS).columns[1:]
    assert _has_dense({"federated": _SITES}) and not _has_dense({"federated": {"sequence_accuracy": 0.9}})
    assert not {k for k, _, _ in DENSE_COLUMNS} & {k for k, _, _ in HEAD_COLUMNS}  # a table of their own


def test_the_report_has_lesion_head_tables_on_the_sites_and_the_held_out_hospital(tmp_path: Path) -> None:
    from fedmri.simulations.report import write_report

    per_site = {"site-01": {**_SITES, "segmentation_dice": 0.3}, "holdout-01": _HELD}
    (tmp_path / "federated").mkdir()
    (tmp_path / "federated" / "results.json").write_text(json.dumps({"per_site": per_site, "rounds": 2}))
    (tmp_path / "results.json").write_text(json.dumps({"modes": {"federated": _SITES, "ceiling": {}},
                                                       "holdout": {"federated": _HELD, "random": _HELD},
                                                       "holdout_sites": ["holdout-01"]}))
    md = write_report(tmp_path).read_text(encoding="utf-8")
    sites = md[md.index("### Lesion heads on the frozen encoder"):md.index("## On a hospital outside")]
    assert "| mode | segmentation Dice | anomaly mIoU | series | lesion-free |" in sites
    assert "| federated | 0.31 | 0.05 | 22 | 6 |" in sites and "| ceiling | – | – | – | – |" in sites
    held = md[md.index("## On a hospital outside the federation"):md.index("## Cross-site evaluation")]
    assert "| federated | 0.41 [0.27, 0.57] | 0.17 [0.09, 0.25] | 150 | 61 |" in held
    assert md.count("a head that finds no lesion anywhere") == 1  # the note, once, before the first such table
    assert "### segmentation Dice (higher is better)" in md and "### anomaly mIoU (higher is better)" in md
    assert (tmp_path / "plots" / "cross_site_segmentation_dice.png").is_file()


def test_the_note_comes_with_the_held_out_table_when_the_sites_have_no_lesion_figures(tmp_path: Path) -> None:
    from fedmri.simulations.report import write_report

    (tmp_path / "results.json").write_text(json.dumps({"modes": {"federated": {"sequence_accuracy": 0.9}},
                                                       "holdout": {"federated": _HELD},
                                                       "holdout_sites": ["holdout-01"]}))
    md = write_report(tmp_path).read_text(encoding="utf-8")
    assert "### Lesion heads on the frozen encoder" not in md
    held = md[md.index("## On a hospital outside the federation"):]
    assert held.index("a head that finds no lesion anywhere") < held.index("| federated | 0.41 [0.27, 0.57]")
