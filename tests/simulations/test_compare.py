"""Paired differences between modes on a held-out hospital."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmri.data.site_inputs import FINDING_CODES
from fedmri.simulations.compare import Hospital, ceiling_outputs, paired_differences


class _Rows:
    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)


def _hospital(n_patients: int = 40, per_patient: int = 2) -> Hospital:
    # Brain series; every other patient has a mass; ages spread over adulthood.
    rng = np.random.default_rng(0)
    rows, patients = [], []
    for p in range(n_patients):
        findings = torch.zeros(len(FINDING_CODES))
        findings[FINDING_CODES.index("mass")] = float(p % 2)
        age = float(rng.uniform(20, 80))
        for s in range(per_patient):
            rows.append({"findings": findings, "age": age, "sex": p % 2,
                         "meta": {"series_id": len(rows), "patient_id": f"p{p}", "body_region": "brain",
                                  "sequence": "T2"}})
            patients.append(f"p{p}")
    return Hospital("h", _Rows(rows), [f"h/{r['meta']['series_id']}" for r in rows], patients, ["brain"] * len(rows))


def _outputs(hospital: Hospital, mass_signal: float, age_noise: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = len(hospital.series)
    truth = torch.stack([r["findings"] for r in hospital.dataset.rows])
    ages = torch.tensor([r["age"] for r in hospital.dataset.rows])
    return {"findings": mass_signal * truth + torch.randn(n, len(FINDING_CODES), generator=g),
            "age": (ages + age_noise * torch.randn(n, generator=g)).unsqueeze(1)}


def test_a_better_model_is_significantly_better_and_a_copy_is_not() -> None:
    hospital = _hospital()
    good = _outputs(hospital, mass_signal=3.0, age_noise=2.0, seed=1)
    poor = _outputs(hospital, mass_signal=0.0, age_noise=15.0, seed=2)
    found = paired_differences(hospital, {"federated": [good], "random": [poor], "copy": [good]}, n_boot=300)
    mass = found["findings_auroc_in_region_macro"]["random"]
    assert mass.value > 0.3 and mass.low > 0  # AUROC: higher is better, significant
    age = found["age_mae"]["random"]
    assert age.value < -5 and age.high < 0  # MAE: lower is better, significant the other way
    same = found["findings_auroc_in_region_macro"]["copy"]
    assert same.value == 0 and same.low == same.high == 0 and not same.excludes(0)
    assert mass.clusters == 40 and mass.n == 80
    assert "body_region_accuracy" not in found  # no model scored regions


def test_local_is_the_mean_of_its_models() -> None:
    hospital = _hospital()
    base = _outputs(hospital, 3.0, 2.0, seed=1)
    models = [_outputs(hospital, s, 2.0, seed=3 + i) for i, s in enumerate((0.0, 6.0))]
    found = paired_differences(hospital, {"federated": [base], "local": models, "a": models[:1], "b": models[1:]},
                               n_boot=50)["findings_auroc_in_region_macro"]
    assert found["local"].value == pytest.approx((found["a"].value + found["b"].value) / 2)


def test_no_baseline_no_differences_and_the_ceiling_is_put_in_row_order() -> None:
    hospital = _hospital(n_patients=4, per_patient=1)
    assert paired_differences(hospital, {"random": [_outputs(hospital, 1.0, 1.0, 0)]}) == {}
    probabilities = np.arange(4 * len(FINDING_CODES), dtype=float).reshape(4, -1)
    reordered = ceiling_outputs(hospital, [hospital.series[i] for i in (2, 0, 3, 1)], probabilities)
    assert reordered["findings"][:, 0].tolist() == probabilities[[1, 3, 0, 2], 0].tolist()
    assert ceiling_outputs(hospital, hospital.series[:3], probabilities[:3]) is None  # one series unscored


def test_an_export_with_lesion_heads_is_scored_on_its_mlp_heads(tmp_path) -> None:
    # The demo tunes segmentation and anomaly too; they read patch tokens, not the pooled feature.
    from fedmri import save_encoder
    from fedmri.config import load_config
    from fedmri.heads.export import heads_card, save_heads
    from fedmri.heads.tasks import build_task_heads, task_heads_state
    from fedmri.models import build_encoder
    from fedmri.simulations.compare import score_export

    cfg = load_config("tiny", overrides=["model.img_size=[32,32,32]", "model.depth=3", "model.embed_dim=32",
                                         "model.num_heads=2", "align.embed_dim=32", "heads.seg_feature_size=4",
                                         "heads.tasks=[sex,segmentation,anomaly]"])
    torch.manual_seed(0)
    folder = save_encoder(tmp_path / "export", build_encoder(cfg), config=cfg, extra={"heads": heads_card(cfg, {})})
    save_heads(folder, task_heads_state(build_task_heads(cfg)))

    class _Images(_Rows):
        def __getitem__(self, i: int) -> dict:
            return {"image": torch.rand(1, 32, 32, 32, generator=torch.Generator().manual_seed(i))}

    rows = _hospital(n_patients=3, per_patient=1).dataset.rows
    hospital = Hospital("h", _Images(rows), ["h/0", "h/1", "h/2"], ["p0", "p1", "p2"], ["brain"] * 3)
    scores = score_export(folder, hospital, batch_size=2)
    assert set(scores) == {"sex"} and scores["sex"].shape == (3, 1)
