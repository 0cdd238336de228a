"""`fedmri simulate` end to end: Flower's Simulation Engine, every mode, a held-out hospital."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from simulate_process import run_simulate


@pytest.mark.slow
def test_simulate_runs_every_mode_and_scores_a_held_out_hospital(tmp_path: Path, federation_sites: list) -> None:
    (_, _, first), (_, _, second), (_, _, third) = federation_sites
    config = tmp_path / "sim.yaml"
    config.write_text(OmegaConf.to_yaml(OmegaConf.create({
        "catalogs": [str(first), str(second)],
        "holdout_catalogs": [str(third)],
        "batch_size": 2,
        "ceiling_epochs": 3,
        # The micro encoder; overrides [] replaces the demo's dense heads (simulations/runner.py).
        "federation": {"name": "smoke", "preset": "micro", "overrides": [], "run_root": str(tmp_path / "runs"),
                       "tracking": {"mlflow": {"enabled": True}},
                       "stages": [{"name": "pretrain", "rounds": 1, "local_steps": 1},
                                  {"name": "align", "rounds": 1, "local_steps": 1},
                                  {"name": "heads", "rounds": 1, "local_steps": 2},
                                  {"name": "evaluate"}]},
    })))
    out = run_simulate(["--config", str(config)], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "Traceback" not in out.stdout
    modes = ("federated", "random", "local", "central")
    for mode in modes:
        assert f"mode {mode}: 2 sites + 1 held out" in out.stdout
    table = out.stdout[out.stdout.index("fedmri simulate: smoke"):]
    assert all(mode in table for mode in modes), table
    assert "task heads on the frozen encoder" in table and "sequence acc" in table, table
    assert "held out of the federation" in table and "t2i R@5" in table, table

    root = tmp_path / "runs" / "smoke"
    results = json.loads((root / "results.json").read_text())
    assert results["holdout_sites"] == ["holdout-01"] and set(results["holdout"]) == {*modes, "ceiling"}
    assert results["machine"]["cpu_kernels"] and "torch" in results["machine"]["packages"]  # what computed it
    # The supervised ceiling scores the same held-out series, outside Flower.
    assert "mode ceiling" in out.stdout and "ceiling" in table
    assert results["holdout"]["ceiling"]["num-examples"] == results["holdout"]["federated"]["num-examples"]
    assert json.loads((root / "ceiling" / "results.json").read_text())["epochs"] == 3
    for mode in modes:
        evaluation = results["modes"][mode]
        assert evaluation["num-examples"] > 0 and "val_loss" in evaluation, (mode, evaluation)
        assert 0.0 <= evaluation["knn_sequence_acc"] <= 1.0, (mode, evaluation)
        assert results["holdout"][mode]["num-examples"] > 0, mode
    # The held-out hospital is scored apart from the sites: its series are in no site row.
    per_site = results["runs"]["federated"]["per_site"]
    assert results["holdout"]["federated"]["num-examples"] == per_site["holdout-01"]["num-examples"]
    assert results["modes"]["federated"]["num-examples"] == sum(per_site[s]["num-examples"]
                                                                for s in ("site-01", "site-02"))
    for run in ("federated", "local-site-01", "local-site-02", "central"):
        assert (root / run / "metrics.jsonl").is_file(), run
        assert (root / run / "plots" / "pretrain.png").is_file(), run
    # Random init: the same heads tuning, no pretraining or alignment.
    random_rows = [json.loads(line) for line in (root / "random" / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in random_rows} == {"heads", "evaluate"}
    # The pooled site trained alone in central mode; the real sites and the held-out hospital evaluated.
    for run in ("central", "federated", "random"):
        rows = [json.loads(line) for line in (root / run / "metrics.jsonl").read_text().splitlines()]
        trained = {r["site"] for r in rows if r["status"] == "ok" and r["stage"] != "evaluate" and r["site"] != "all"}
        assert trained == ({"pooled"} if run == "central" else {"site-01", "site-02"}), run
        assert {r["site"] for r in rows if r["status"] == "ok" and r["stage"] == "evaluate"} == {
            "site-01", "site-02", "holdout-01"}, run
    assert (root / "federated" / "encoder").is_dir()
    # The held-out hospital rescored every mode's export on its own series: the same figures as its
    # evaluate stage sent, and a paired interval around each difference.
    found = results["holdout_differences"]["holdout-01"]
    assert found["baseline"] == "federated" and found["series"] == results["holdout"]["federated"]["num-examples"]
    compared = 0
    for metric, by_mode in found["differences"].items():
        for mode, d in by_mode.items():
            assert d["low"] <= d["value"] <= d["high"] and d["significant"] == (d["low"] > 0 or d["high"] < 0)
            if mode in ("random", "central"):
                sent = results["holdout"]["federated"][metric] - results["holdout"][mode][metric]
                assert d["value"] == pytest.approx(sent, abs=1e-5), (metric, mode)
                compared += 1
    assert compared >= 4 and "age_mae" in found["differences"], found
    assert "federated - random" in out.stdout
    report = (root / "report.md").read_text()
    assert "trained on \\ scored on" in report and "site-02 alone" in report and "random init" in report
    assert "| site-01 | site-02 | holdout-01 |" in report and "## On a hospital outside the federation" in report
    assert "### Which differences are significant at holdout-01" in report and "| federated - random |" in report
    assert (root / "plots" / "cross_site_sequence_accuracy.png").stat().st_size > 1000
    # Tracking: TensorBoard events in every Flower mode's folder; in MLflow, the modes and the local
    # baselines are runs of one experiment, each with the simulation's report.
    from fedmri.server.tracking import mlflow_client

    runs = ("federated", "random", "local-site-01", "local-site-02", "central")
    assert all((root / run / "tensorboard" / "all").is_dir() for run in runs)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "federated" / "tensorboard" / "all"), size_guidance={"tensors": 0})
    events.Reload()
    shown = events.Tensors("report/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "## On a hospital outside the federation" in shown
    client = mlflow_client((tmp_path / "runs" / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("smoke")
    tracked = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in tracked) == sorted(runs)
    for r in tracked:
        assert "report.md" in {a.path for a in client.list_artifacts(r.info.run_id)}, r.info.run_name


def test_simulate_with_a_bad_override_is_one_clear_line(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "fedmri.cli", "simulate", "modes=[federated,sideways]"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "sideways" in out.stderr and "Traceback" not in out.stderr


def test_overrides_reach_into_the_list_of_stages() -> None:
    from fedmri.errors import ConfigError
    from fedmri.simulations.runner import load_simulation

    sim = load_simulation(None, ["sites=5", "federation.stages.0.rounds=10", "modes=[federated]",
                                 "federation.stages.1.strategy={name: fedprox, proximal_mu: 0.1}"])
    assert sim.sites == 5 and list(sim.modes) == ["federated"]
    assert sim.federation.stages[0].rounds == 10 and sim.federation.stages[1].strategy["proximal_mu"] == 0.1
    for bad, named in ((["federation.nope=1"], "nope"), (["sites=abc"], "sites"),
                       (["federation.stages.0.strategy={name: fedfoo}"], "fedfoo"),
                       (["holdout_sites=-1"], "holdout_sites")):
        with pytest.raises(ConfigError, match=named):
            load_simulation(None, bad)


def test_site_overrides_reach_every_simulated_site_file(tmp_path: Path) -> None:
    from fedmri.client.site import load_site
    from fedmri.errors import ConfigError
    from fedmri.simulations.runner import load_simulation, write_site_file

    (tmp_path / "catalog").mkdir()
    sim = load_simulation(None, ["site_overrides=[policy.dp.unit=series, policy.dp.epsilon_total=3.0]"])
    write_site_file(sim, tmp_path / "site.yaml", "site-01", tmp_path / "catalog")
    site = load_site(tmp_path / "site.yaml")
    assert site.policy.dp.unit == "series" and site.policy.dp.epsilon_total == 3.0 and site.name == "site-01"
    with pytest.raises(ConfigError, match="site_overrides"):
        write_site_file(load_simulation(None, ["site_overrides=[notakeyvalue]"]), tmp_path / "bad.yaml", "s",
                        tmp_path / "catalog")


def test_the_demo_tunes_the_lesion_heads_in_every_flower_mode_and_explicit_overrides_keep_their_tasks() -> None:
    from fedmri.config.schema import HeadsConfig
    from fedmri.server.config import run_config
    from fedmri.simulations.runner import FLOWER_MODES, _mode_fed, load_simulation

    sim = load_simulation(None, [])
    for mode in FLOWER_MODES:
        heads = run_config(_mode_fed(sim, mode)).heads
        assert list(heads.tasks) == [*HeadsConfig().tasks, "segmentation", "anomaly"], mode
        assert heads.seg_decoder == "light" and heads.seg_stride == 4 and heads.seg_feature_size == 8, mode
    # A simulation that names its own run-config overrides (the tests' small ones) keeps the MLP tasks.
    sim = load_simulation(None, ["federation.overrides=[ssl.lr=2e-3]"])
    assert list(run_config(sim.federation).heads.tasks) == HeadsConfig().tasks


def test_synthetic_sites_get_a_seeded_salt_and_real_ones_keep_theirs(tmp_path: Path) -> None:
    from fedmri.data.catalog_db import load_or_create_salt
    from fedmri.simulations.runner import synthetic_salt

    for run in ("a", "b"):
        synthetic_salt(tmp_path / run / "site-01", 0, "site-01")
        synthetic_salt(tmp_path / run / "site-02", 0, "site-02")
    a1, b1 = (load_or_create_salt(tmp_path / r / "site-01") for r in ("a", "b"))
    assert a1 == b1 and a1 != load_or_create_salt(tmp_path / "a" / "site-02")
    assert (tmp_path / "a" / "site-01" / "site.salt").stat().st_mode & 0o777 == 0o600
    existing = load_or_create_salt(tmp_path / "real")  # random, as `fedmri data index` makes it
    synthetic_salt(tmp_path / "real", 0, "site-01")
    assert load_or_create_salt(tmp_path / "real") == existing


def test_held_out_hospital_is_all_evaluation_data_from_its_own_seed_and_never_trains(tmp_path: Path) -> None:
    import sqlite3

    from fedmri.client.site import load_site
    from fedmri.errors import ConfigError
    from fedmri.simulations.runner import load_simulation, prepare_sites

    sim = load_simulation(None, ["sites=1", "federation.min_sites=1", "series_per_site=4", "holdout_series=6",
                                 "synth_preset=tiny", "synth_workers=1",  # in this process (test_transfer runs the pool)
                                 f"federation.run_root={tmp_path}"])
    (site,), (held,) = prepare_sites(sim, tmp_path / "data", say=lambda line: None)
    assert held.name == "holdout-01"

    def splits(catalog: Path) -> dict[str, int]:
        with sqlite3.connect(catalog / "catalog.sqlite") as db:
            return dict(db.execute("SELECT split, count(*) FROM series GROUP BY split").fetchall())

    assert splits(held.catalog) == {"val": 6}  # the evaluate stage's split holds every series
    assert sum(splits(site.catalog).values()) == 4
    assert list(load_site(held.site_file).policy.stages) == ["evaluate"]
    assert {"pretrain", "evaluate"} <= set(load_site(site.site_file).policy.stages)
    # Its own seed: other patients than the federation's site, not a copy under another name.
    seeds = {json.loads((tmp_path / "data" / "hospitals" / name / "site.json").read_text())["params"]["seed"]
             for name in (site.name, held.name)}
    assert len(seeds) == 2
    params = {name: json.loads((tmp_path / "data" / "hospitals" / name / "site.json").read_text())["params"]
              for name in (site.name, held.name)}
    assert params[held.name]["case_mix"] == "balanced" and params[site.name]["case_mix"] == "site"
    with pytest.raises(ConfigError, match="synth_workers"):
        load_simulation(None, ["synth_workers=-1"])
    with pytest.raises(ConfigError, match="holdout_series"):
        load_simulation(None, ["holdout_series=0"])


def test_ceiling_mode_alone_trains_on_the_pooled_training_splits_without_flower(tmp_path: Path) -> None:
    from fedmri.simulations.ceiling import load_split
    from fedmri.simulations.runner import load_simulation, simulate

    sim = load_simulation(None, ["sites=2", "series_per_site=10", "holdout_series=12", "synth_preset=tiny",
                                 "modes=[ceiling]", "ceiling_epochs=2", "synth_workers=1", f"federation.run_root={tmp_path}"])
    lines: list[str] = []
    summary = simulate(sim, say=lines.append)
    root = tmp_path / "demo"
    top = json.loads((root / "results.json").read_text())
    assert set(top["modes"]) == {"ceiling"} and set(top["holdout"]) == {"ceiling"}
    ceiling = json.loads((root / "ceiling" / "results.json").read_text())
    train = load_split([root / "data" / "catalogs" / f"site-0{i}" for i in (1, 2)], "train")
    assert ceiling["n_train"] == len(train) and len(ceiling["losses"]) == 2
    assert summary["ceiling @ held-out"]["num-examples"] == 12.0  # every held-out series is scored
    for key, value in summary["ceiling @ held-out"].items():
        # Overall figures carry an interval; per-sequence ones (<code>@<family>) are points, as the heads send them.
        if key.startswith("findings_auroc_in_region") and "@" not in key and not key.endswith(("_ci_low", "_ci_high")):
            held = summary["ceiling @ held-out"]
            assert held[key + "_ci_low"] <= value <= held[key + "_ci_high"]
    assert any("mode ceiling" in line for line in lines)
    assert [line for line in lines if line.startswith("[ceiling] epoch")] == [
        f"[ceiling] epoch 2/2: loss {ceiling['losses'][-1]:.4f}"]  # every 10th epoch and the last
    assert not (root / "federated").exists()  # no Flower mode ran


def test_table_cell_puts_the_interval_under_the_figure() -> None:
    from fedmri.cli.simulate_cmd import cell

    assert cell({"a": 0.834, "a_ci_low": 0.7, "a_ci_high": 0.91}, "a", "{:.2f}") == "0.83\n.70-.91"
    assert cell({"m": 16.3, "m_ci_low": 12.4, "m_ci_high": 20.8}, "m", "{:.1f}") == "16.3\n12.4-20.8"
    assert cell({"a": 0.834}, "a", "{:.2f}") == "0.83"  # no interval computed: none shown
    assert cell({}, "a", "{:.2f}") == "-"


def test_the_pool_starts_the_largest_hospital_first_and_keeps_job_order_among_equals() -> None:
    from fedmri.simulations.runner import largest_first

    jobs = [{"series": 48}, {"series": 48}, {"series": 150}, {"series": 16}]
    assert largest_first(jobs) == [2, 0, 1, 3]


def test_a_hospital_being_synthesised_reports_its_series_as_they_are_written(tmp_path: Path) -> None:
    from fedmri.server.config import run_config
    from fedmri.simulations.runner import load_simulation, synthesise_site

    lines: list[str] = []
    synthesise_site(cfg=run_config(load_simulation(None, []).federation), data_dir=tmp_path, name="site-01", index=1,
                    seed=0, say=lines.append, preset="tiny", series=3, every_s=0.0)
    assert lines[0].startswith("[data] site-01: synthesising 3 series (tiny, seed 0)"), lines
    assert [line.split(",")[0] for line in lines[1:3]] == ["[data] site-01: 1/3 series written",
                                                           "[data] site-01: 2/3 series written"], lines
    assert lines[-1].startswith("[data] site-01: 3 series indexed") and len(lines) == 4, lines
