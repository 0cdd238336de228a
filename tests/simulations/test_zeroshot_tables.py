"""Zero-shot findings as `fedmri simulate` shows them: a row under each mode, in the table and the report."""

from __future__ import annotations

from pathlib import Path

_MODE = {"findings_auroc_macro": 0.83, "findings_auroc_in_region_macro": 0.71, "sequence_accuracy": 0.9,
         "zeroshot_findings_auroc_macro": 0.74, "zeroshot_findings_auroc_in_region_macro": 0.64,
         "zeroshot_findings_auroc_in_region_macro_ci_low": 0.52,
         "zeroshot_findings_auroc_in_region_macro_ci_high": 0.75}


def test_the_terminal_table_puts_a_zero_shot_row_under_its_mode_within_80_columns() -> None:
    from rich.console import Console

    from fedmri.cli.simulate_cmd import HEAD_COLUMNS, results_table

    console = Console(width=80, record=True)
    every_head = _MODE | {"body_region_accuracy": 1.0, "age_mae": 12.3, "sex_auroc": 0.55}
    every_head |= {f"{k}_ci_{b}": 0.5 for k in every_head if not k.startswith("zeroshot_") for b in ("low", "high")}
    no_zeroshot = {k: v for k, v in every_head.items() if not k.startswith("zeroshot_")}
    console.print(results_table({"federated": every_head, "random": no_zeroshot}, "heads", HEAD_COLUMNS))
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80
    row = next(i for i, line in enumerate(lines) if "zero-shot" in line)
    assert "federated" in lines[row - 2] and "0.83" in lines[row - 2]  # the mode's figures and their intervals
    assert [c.strip() for c in lines[row].split("│")[2:5]] == ["0.74", "0.64", ""], lines[row]
    assert ".52-.75" in lines[row + 1]  # its interval, under it as under the heads' figures
    assert sum("zero-shot" in line for line in lines) == 1  # none under a mode that has none


def test_the_report_puts_a_zero_shot_row_under_its_mode_and_draws_its_cross_site_matrix(tmp_path: Path) -> None:
    import json

    from fedmri.simulations.report import write_report

    per_site = {"site-01": {**_MODE, "num-examples": 4.0}}
    (tmp_path / "federated").mkdir()
    (tmp_path / "federated" / "results.json").write_text(json.dumps({"per_site": per_site, "rounds": 1}))
    (tmp_path / "results.json").write_text(json.dumps({"modes": {"federated": _MODE}, "holdout": {"random": _MODE},
                                                       "holdout_sites": ["holdout-01"]}))
    md = write_report(tmp_path).read_text(encoding="utf-8")
    assert "| mode | findings AUROC | findings AUROC in region | sequence acc |" in md
    assert "| federated | 0.83 | 0.71 | 0.90 |\n| federated zero-shot | 0.74 | 0.64 [0.52, 0.75] |  |" in md
    held = md[md.index("## On a hospital outside the federation"):]
    assert "| random zero-shot | 0.74 | 0.64 [0.52, 0.75] |  |" in held
    assert md.count("`zero-shot` rows:") == 1 and md.index("`zero-shot` rows:") < md.index("| federated zero-shot")
    assert "### zero-shot findings AUROC in region (higher is better)" in md
    assert (tmp_path / "plots" / "cross_site_zeroshot_findings_auroc_in_region_macro.png").is_file()
