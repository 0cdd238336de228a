"""The results report of `fedmri simulate` from a hand-built run folder (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedmri.errors import InputError
from fedmri.simulations.report import (
    colormap_for,
    cross_site_matrix,
    lower_is_better,
    write_report,
)

SITES = ("site-01", "site-02", "site-03")
SERIES = {"site-01": 2, "site-02": 3, "site-03": 6}
# Row -> trained where, with a per-row offset so every cell is distinct and checkable.
ROWS = {"local-site-01": 0.1, "local-site-02": 0.2, "local-site-03": 0.3, "federated": 0.4, "central": 0.5}


def _per_site(offset: float, folder: str) -> dict[str, dict[str, float]]:
    per_site = {}
    for j, site in enumerate(SITES):
        per_site[site] = {"sequence_accuracy": offset + j / 10, "age_mae": 10 * offset + j,
                          "num-examples": float(SERIES[site])}
        if site != "site-02":  # AUROC undefined on site-02's split (one class)
            per_site[site]["findings_auroc_macro"] = offset + 0.05
    if folder == "local-site-02":
        del per_site["site-03"]  # a site that did not answer the evaluate round
    return per_site


@pytest.fixture
def sim_dir(tmp_path: Path) -> Path:
    root = tmp_path / "demo"
    for folder, offset in ROWS.items():
        run = root / folder
        (run / "plots").mkdir(parents=True)
        (run / "plots" / "pretrain.png").write_bytes(b"\x89PNG fake")
        per_site = _per_site(offset, folder)
        evaluation = {k: sum(s[k] for s in per_site.values() if k in s) / len(per_site)
                      for k in ("sequence_accuracy", "age_mae")}
        (run / "results.json").write_text(json.dumps({
            "name": f"demo/{folder}", "evaluation": {**evaluation, "val_loss": 4.0, "knn_sequence_acc": offset},
            "per_site": per_site, "rounds": 2, "sites_seen": list(SITES)}))
    (root / "federated" / "privacy.md").write_text("# Privacy\n")
    modes = {"central": {"sequence_accuracy": 0.61, "val_loss": 3.5, "age_mae": 12.0},
             "federated": {"sequence_accuracy": 0.73, "val_loss": 4.25, "age_mae": 9.5},
             "local": {"sequence_accuracy": 0.55, "val_loss": 4.5, "age_mae": 20.0}}
    (root / "results.json").write_text(json.dumps({"modes": modes, "runs": {}}, sort_keys=True))
    return root


def test_matrix_rows_are_training_places_and_cols_are_scored_sites(sim_dir: Path) -> None:
    rows, cols, values = cross_site_matrix(sim_dir, "sequence_accuracy")
    assert rows == ["site-01 alone", "site-02 alone", "site-03 alone", "federated", "central"]
    assert cols == list(SITES)
    assert values[0] == pytest.approx([0.1, 0.2, 0.3])
    assert values[3] == pytest.approx([0.4, 0.5, 0.6])
    assert values[1][:2] == pytest.approx([0.2, 0.3]) and values[1][2] is None  # site-03 missing


def test_matrix_has_none_where_a_site_lacks_the_metric(sim_dir: Path) -> None:
    _, cols, values = cross_site_matrix(sim_dir, "findings_auroc_macro")
    j = cols.index("site-02")
    assert all(row[j] is None for row in values)
    assert values[4][0] == pytest.approx(0.55)


def test_matrix_of_a_folder_without_runs_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no run"):
        cross_site_matrix(tmp_path, "sequence_accuracy")


def test_lower_is_better_metrics_use_the_reversed_colormap() -> None:
    for metric in ("age_mae", "t2i_medr", "val_loss"):
        assert lower_is_better(metric) and colormap_for(metric) == "RdYlGn_r"
    for metric in ("sequence_accuracy", "findings_auroc_macro", "t2i_r1", "knn_sequence_acc"):
        assert not lower_is_better(metric) and colormap_for(metric) == "RdYlGn"


def test_report_has_tables_matrices_images_and_links(sim_dir: Path) -> None:
    path = write_report(sim_dir, title="Demo report")
    assert path == sim_dir / "report.md"
    md = path.read_text(encoding="utf-8")
    assert md.startswith("# Demo report\n") and "Run `demo`" in md
    # Mode table: in the order simulate runs them, lower-is-better marked.
    assert "| mode | SSL loss ↓ | seq 1-NN |" not in md  # knn is in no mode: no empty column
    assert "| mode | SSL loss ↓ |" in md
    fed, local, central = (md.index(f"| {m} |") for m in ("federated", "local", "central"))
    assert fed < local < central
    assert "| federated | 0.73 | 9.5 |" in md  # the heads table: sequence acc, age MAE
    # Cross-site matrices, as tables and as heatmaps next to them.
    assert "| trained on \\ scored on | site-01 | site-02 | site-03 |" in md
    assert "| site-02 alone | 0.20 | 0.30 | – |" in md
    for metric in ("sequence_accuracy", "age_mae", "findings_auroc_macro"):
        assert f"](plots/cross_site_{metric}.png)" in md
        png = sim_dir / "plots" / f"cross_site_{metric}.png"
        assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 1000
    assert not (sim_dir / "plots" / "cross_site_t2i_r1.png").exists()  # measured nowhere
    # Each run's loss plots, and privacy.md only where there is one.
    assert "[pretrain](local-site-03/plots/pretrain.png)" in md
    assert "[privacy.md](federated/privacy.md)" in md and "(central/privacy.md)" not in md
    # The splits and their sizes.
    assert "site-01 2, site-02 3, site-03 6" in md and "noise" in md


def test_report_without_top_results_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="results.json"):
        write_report(tmp_path)


def test_held_out_hospital_is_the_last_column_and_random_init_a_row(sim_dir: Path) -> None:
    for folder, offset in (*ROWS.items(), ("random", 0.05)):
        run = sim_dir / folder
        (run / "plots").mkdir(parents=True, exist_ok=True)
        results = json.loads((run / "results.json").read_text()) if (run / "results.json").exists() else {
            "name": f"demo/{folder}", "evaluation": {}, "per_site": _per_site(offset, folder), "rounds": 1}
        results["per_site"]["holdout-01"] = {"sequence_accuracy": offset + 0.01, "num-examples": 12.0}
        (run / "results.json").write_text(json.dumps(results))
    top = json.loads((sim_dir / "results.json").read_text())
    top["holdout"] = {"random": {"sequence_accuracy": 0.06, "t2i_r5": 0.2},
                      "federated": {"sequence_accuracy": 0.41, "t2i_r5": 0.9, "sequence_accuracy_ci_low": 0.3,
                                    "sequence_accuracy_ci_high": 0.52}}
    top["holdout_sites"] = ["holdout-01"]
    (sim_dir / "results.json").write_text(json.dumps(top))

    rows, cols, values = cross_site_matrix(sim_dir, "sequence_accuracy")
    assert cols == [*SITES, "holdout-01"]  # sorted names would put it first
    assert rows[3:] == ["federated", "random init (federated heads)", "central"]
    assert values[rows.index("random init (federated heads)")][3] == pytest.approx(0.06)
    md = write_report(sim_dir).read_text(encoding="utf-8")
    held = md[md.index("## On a hospital outside the federation"):md.index("## Cross-site evaluation")]
    assert "holdout-01" in held
    assert held.index("| federated | 0.90 |") < held.index("| random | 0.20 |")  # t2i R@5, in mode order
    assert "| federated | 0.41 [0.30, 0.52] |" in held  # the interval the held-out site computed
    assert "| random | 0.06 |" in held  # none computed: none shown
    assert "| trained on \\ scored on | site-01 | site-02 | site-03 | holdout-01 |" in md


def test_held_out_findings_by_sequence_are_a_table_with_one_column_per_mode(sim_dir: Path) -> None:
    top = json.loads((sim_dir / "results.json").read_text())
    top["holdout"] = {"federated": {"findings_auroc_in_region/mass@FLAIR": 0.71,
                                    "findings_auroc_in_region/mass@T1post": 0.93,
                                    "findings_auroc_in_region_macro@FLAIR": 0.6},
                      "random": {"sequence_accuracy": 0.2},
                      "ceiling": {"findings_auroc_in_region/mass@FLAIR": 0.88}}
    top["holdout_sites"] = ["holdout-01"]
    (sim_dir / "results.json").write_text(json.dumps(top))
    md = write_report(sim_dir).read_text(encoding="utf-8")
    table = md[md.index("### Findings by sequence"):md.index("## Cross-site evaluation")]
    assert "| finding on sequence | federated | ceiling |" in table  # random scored no finding
    assert "| mass on FLAIR | 0.71 | 0.88 |" in table and "| mass on T1post | 0.93 | – |" in table
    assert "macro" not in table
