"""Patient-level DP-SGD: a patient's whole contribution clipped to C, Poisson sampling of patients,
ε per patient equal to Opacus' RDP accountant, and the site policy that picks the unit."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import Tensor

from fedmri.client.privacy import PrivacyLedger
from fedmri.client.privacy.dp_sgd import (
    clip_and_noise,
    per_sample_grads,
    poisson_batches,
    unit_batches,
    unit_members,
)
from fedmri.client.privacy.gate import PrivacyGate
from fedmri.client.site import load_site
from fedmri.client.trainers import TrainRequest
from fedmri.client.trainers.align_dp import private_pairs
from fedmri.client.trainers.data import patient_keys, site_dataset
from fedmri.errors import ConfigError

C = 1.0
# One patient with 1 series, one with 10, and three with 2: sample i belongs to PATIENTS[i].
PATIENTS = ["one"] + ["ten"] * 10 + ["a", "a", "b", "b", "c", "c"]


def big_linear_grads(patients: list[str]) -> dict[str, Tensor]:
    """Per-series gradients of a linear model's squared output, made far larger than C, all alike."""
    w = torch.ones(4, requires_grad=True)
    xs = [torch.full((4,), 10.0) + 0.1 * i for i in range(len(patients))]
    return per_sample_grads(lambda p, x: (p["w"] @ x) ** 2, {"w": w}, xs)


def noiseless_sum(per_sample: dict[str, Tensor], keep: list[int], units: list[int] | None) -> Tensor:
    """The pre-noise clipped sum over the samples ``keep`` (σ 0, divisor 1)."""
    chosen = {k: g[keep] for k, g in per_sample.items()}
    return clip_and_noise(chosen, C, 0.0, None, expected_batch_size=1, units=units)["w"]


def positions(keys: list[str]) -> list[int]:
    """Each sample's unit position in the batch, units in first-seen order."""
    order = list(dict.fromkeys(keys))
    return [order.index(k) for k in keys]


@pytest.mark.parametrize("patient", ["one", "ten"])
def test_a_patients_whole_contribution_is_bounded_by_c(patient: str) -> None:
    grads = big_linear_grads(PATIENTS)
    assert all(g.norm() > 100 * C for g in grads["w"])
    everyone = list(range(len(PATIENTS)))
    without = [i for i in everyone if PATIENTS[i] != patient]
    moved = (noiseless_sum(grads, everyone, positions(PATIENTS))
             - noiseless_sum(grads, without, positions([PATIENTS[i] for i in without])))
    assert 0.99 * C < moved.norm() <= C + 1e-5
    # Clipped per series, the 10-series patient moves the sum by 10 C: protected only as a group of 10.
    per_series = noiseless_sum(grads, everyone, None) - noiseless_sum(grads, without, None)
    assert per_series.norm() == pytest.approx(C * PATIENTS.count(patient), rel=1e-4)


def test_unit_batches_draw_patients_with_all_their_series() -> None:
    members = unit_members(PATIENTS)
    assert members[:2] == [[0], list(range(1, 11))] and len(members) == 5
    q, steps = 0.3, 4000
    batches = unit_batches(members, q, steps, seed=7)
    drawn = torch.zeros(len(members))
    for samples, units in batches:
        assert len(samples) == len(units)
        by_unit: dict[int, list[int]] = {}
        for i, u in zip(samples, units):
            by_unit.setdefault(u, []).append(i)
        assert sorted(by_unit) == list(range(len(by_unit)))  # positions 0..U-1
        for group in by_unit.values():  # each drawn patient with every one of its series, and no other's
            assert group in members
            drawn[members.index(group)] += 1
    # q per patient, whatever their number of series (the 10-series patient is not drawn more often).
    assert torch.allclose(drawn / steps, torch.full_like(drawn, q), atol=0.03), drawn / steps
    assert any(not samples for samples, _ in batches)  # a step may be empty and is still noised
    # One series per unit: the same draws as the series-level batches of the same seed.
    singles = unit_batches([[i] for i in range(5)], q, 50, seed=7)
    assert [s for s, _ in singles] == poisson_batches(5, q, 50, seed=7)


def _gate(site_file: Path, request_values, tmp_path: Path, overrides=(), **request) -> PrivacyGate:
    values = request_values("pretrain", dp=True, dp_noise_multiplier=1.1, dp_max_grad_norm=C,
                            **({"local_steps": 5} | request))
    return PrivacyGate(load_site(site_file, list(overrides)), TrainRequest.from_config(values),
                       ledger_path=tmp_path / "ledger.sqlite")


def test_the_site_plans_per_patient_by_default(site_file, request_values, tmp_path) -> None:
    """4 training patients with 2 series each, batch 4: q = 4/8 per patient, 2 expected patients a step."""
    site = load_site(site_file)
    assert site.policy.dp.unit == "patient"
    keys = patient_keys(site_dataset(site, "train"))
    assert len(keys) == 8 and len(set(keys)) == 4
    plan = _gate(site_file, request_values, tmp_path).plan(keys, 4)
    assert (plan.unit, plan.units, plan.samples, plan.sample_rate) == ("patient", 4, 8, 0.5)
    assert plan.expected_batch_size == 2 and plan.expected_samples == 4
    assert all(len({keys[i] for i in m}) == 1 and len(m) == 2 for m in plan.members)
    series = _gate(site_file, request_values, tmp_path / "s", ["policy.dp.unit=series"]).plan(keys, 4)
    assert (series.unit, series.units, series.samples, series.sample_rate) == ("series", 8, 8, 0.5)
    assert series.members == tuple((i,) for i in range(8))
    assert "members" not in repr(plan) and keys[0] not in repr(plan)  # the patients stay out of logs


def test_the_ledger_epsilon_per_patient_is_opacus_rdp(site_file, request_values, tmp_path) -> None:
    keys = patient_keys(site_dataset(load_site(site_file), "train"))
    accountant = RDPAccountant()
    for round_ in (1, 2, 3):
        gate = _gate(site_file, request_values, tmp_path, round=round_, server_round=round_)
        plan = gate.plan(keys, 2)  # q = 2/8 per patient
        (entry,) = gate.record()
        for _ in range(plan.steps):
            accountant.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
        assert entry.unit == "patient" and entry.sample_rate == 0.25
        for delta in (1e-5, 1e-6):
            with PrivacyLedger(tmp_path / "ledger.sqlite") as ledger:
                assert ledger.epsilon(delta) == pytest.approx(accountant.get_epsilon(delta), abs=1e-6)
        assert abs(entry.epsilon_run - accountant.get_epsilon(entry.delta)) < 1e-6
        metrics = gate.metrics([entry])
        assert metrics["dp-unit-patient"] == 1.0 and metrics["dp-sample-rate"] == 0.25
        assert not any(isinstance(v, str) for v in metrics.values())
        assert not any(k in name for k in set(keys) for name in metrics)  # no patient key leaves


def test_series_unit_is_reported_as_such(site_file, request_values, tmp_path) -> None:
    gate = _gate(site_file, request_values, tmp_path, ["policy.dp.unit=series"])
    gate.plan(patient_keys(site_dataset(load_site(site_file), "train")), 4)
    (entry,) = gate.record()
    assert entry.unit == "series" and gate.metrics([entry])["dp-unit-patient"] == 0.0


def test_a_bad_unit_is_a_clear_config_error(site_file, request_values, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"policy\.dp\.unit must be one of patient, series.*'study'"):
        load_site(site_file, ["policy.dp.unit=study"])
    gate = _gate(site_file, request_values, tmp_path)
    gate.dp.unit = "household"  # a site object that skipped load_site's check
    with pytest.raises(ConfigError, match=r"policy\.dp\.unit must be patient or series, got 'household'"):
        gate.plan(["p"], 1)


def test_a_format_1_ledger_is_upgraded_and_its_rows_are_per_series(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("""CREATE TABLE rounds (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, run TEXT NOT NULL, stage TEXT NOT NULL, round INTEGER NOT NULL,
        noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL, steps INTEGER NOT NULL, delta REAL NOT NULL,
        epsilon_run REAL NOT NULL, epsilon_total REAL NOT NULL, accountant TEXT NOT NULL, timestamp TEXT NOT NULL,
        inputs TEXT NOT NULL DEFAULT '', UNIQUE (run, stage, round))""")
    conn.execute("INSERT INTO rounds (run, stage, round, noise_multiplier, sample_rate, steps, delta, epsilon_run, "
                 "epsilon_total, accountant, timestamp) VALUES ('old', 'pretrain', 1, 1.1, 0.01, 100, 1e-5, 0.5, 0.5, "
                 "'rdp', '2024-01-01T00:00:00+00:00')")
    conn.execute(f"PRAGMA application_id={0x664D5249}")
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()
    with PrivacyLedger(path, create=False) as ledger:  # read only: the file stays format 1
        (old,) = ledger.entries()
        assert old.unit == "series" and ledger.unit() == "series"
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 1
    with PrivacyLedger(path, create=False) as ledger:
        new = ledger.record_round("new", "pretrain", 1, 1.1, 0.01, 100, 1e-5, unit="patient")
        assert new.unit == "patient" and ledger.unit("new") == "patient" and ledger.unit() == "mixed"
        # The old row still composes into the site's total: the same triples, whatever the unit.
        assert new.epsilon_total > new.epsilon_run
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 2
    with PrivacyLedger(path) as ledger:  # a retry must repeat the unit too
        assert ledger.record_round("new", "pretrain", 1, 1.1, 0.01, 100, 1e-5, unit="patient") == new
        with pytest.raises(ValueError, match="already recorded"):
            ledger.record_round("new", "pretrain", 1, 1.1, 0.01, 100, 1e-5, unit="series")
        with pytest.raises(ValueError, match="private unit must be one of patient, series"):
            ledger.record_round("new", "pretrain", 2, 1.1, 0.01, 100, 1e-5, unit="study")


def test_alignment_pairs_are_split_by_patient_only_at_the_patient_level() -> None:
    # Report 0 is shared by two patients (the same text), report 1 belongs to patient b alone.
    series_of, patients = [[0, 1, 2], [3]], ["a", "a", "b", "b"]
    per_patient = private_pairs(series_of, patients, "patient")
    assert (per_patient.report, per_patient.series, per_patient.patient) == ([0, 0, 1], [[0, 1], [2], [3]],
                                                                              ["a", "b", "b"])
    per_pair = private_pairs(series_of, patients, "series")
    assert (per_pair.report, per_pair.series) == ([0, 1], [[0, 1, 2], [3]])
    # Patient b's two pairs form one unit: clipped together.
    assert unit_members(per_patient.patient) == [[0], [1, 2]]
