"""The supervised ceiling: it learns a visible lesion, scores in region and per sequence, and reads real catalogs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fedmri.data.site_inputs import FINDING_CODES
from fedmri.errors import ConfigError, InputError
from fedmri.simulations.ceiling import (
    CeilingConfig,
    Split,
    build_network,
    findings_intervals,
    load_split,
    predict,
    run_ceiling,
    train_ceiling,
)

MASS = FINDING_CODES.index("mass")
EFFUSION = FINDING_CODES.index("effusion")


def _blobs(n: int, seed: int, size: int = 32) -> Split:
    """Noisy volumes; half hold a bright 8-voxel cube somewhere (a "mass"), all are "brains"."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0.3, 0.08, size=(n, 1, size, size, size)).astype(np.float32)
    y = np.zeros((n, len(FINDING_CODES)), np.float32)
    for i in range(n // 2):
        x0, y0, z0 = rng.integers(4, size - 12, 3)
        images[i, 0, x0:x0 + 8, y0:y0 + 8, z0:z0 + 8] += 0.4
        y[i, MASS] = 1.0
    return Split(torch.from_numpy(images).clamp(min=0), torch.from_numpy(y), ["brain"] * n,
                 ["FLAIR" if i % 2 else "T1" for i in range(n)], [f"p{i // 2}" for i in range(n)])


def test_ceiling_learns_a_visible_lesion(one_thread: None) -> None:
    train, test = _blobs(48, seed=0), _blobs(32, seed=1)
    model, losses = train_ceiling(train, CeilingConfig(epochs=12, batch_size=8, lr=3e-3, threads=1), say=lambda s: None)
    assert losses[-1] < losses[0]
    overall, by_seq = findings_intervals(predict(model, test), test, n_boot=200)
    assert overall["mass"].value >= 0.85, overall["mass"]
    assert overall["mass"].n == 32 and overall["mass"].clusters == 16
    assert set(by_seq["mass"]) == {"FLAIR", "T1"} and by_seq["mass"]["T1"].n == 16
    assert "macro" in overall and "effusion" not in overall  # no effusion positives: not scored


def test_intervals_score_each_finding_within_its_regions_as_sklearn() -> None:
    rng = np.random.default_rng(3)
    n = 60
    regions = ["brain"] * 30 + ["knee"] * 30
    y = np.zeros((n, len(FINDING_CODES)), np.float32)
    y[rng.choice(30, 12, replace=False), MASS] = 1.0
    y[30 + rng.choice(30, 12, replace=False), EFFUSION] = 1.0
    scores = rng.random((n, len(FINDING_CODES)))
    scores[30:, MASS] = -1.0  # knees score lowest for mass: pooled AUROC would reward that, in region does not
    split = Split(torch.zeros(n, 1, 2, 2, 2), torch.from_numpy(y), regions, ["T2"] * n, [str(i) for i in range(n)])
    overall, _ = findings_intervals(scores, split, n_boot=100)
    assert overall["mass"].value == pytest.approx(roc_auc_score(y[:30, MASS], scores[:30, MASS]))
    assert overall["effusion"].value == pytest.approx(roc_auc_score(y[30:, EFFUSION], scores[30:, EFFUSION]))
    assert overall["mass"].low <= overall["mass"].value <= overall["mass"].high
    assert overall["macro"].value == pytest.approx((overall["mass"].value + overall["effusion"].value) / 2)


def test_run_ceiling_on_real_catalogs(federation_sites: list, one_thread: None) -> None:
    catalogs = [c for _, _, c in federation_sites]
    result = run_ceiling(catalogs[:2], catalogs[2:], CeilingConfig(epochs=1, batch_size=4, n_boot=20, threads=1),
                         say=lambda s: None)
    held = load_split(catalogs[2:], None)
    assert result.n_train == len(load_split(catalogs[:2], "train"))
    assert result.scores is not None and result.scores.shape == (len(held), len(FINDING_CODES))
    assert held.images.shape[1:] == (1, 64, 64, 64) and len(set(held.patients)) <= len(held)
    assert all(p.startswith(catalogs[2].name + "/") for p in held.patients)
    assert result.to_json()["n_train"] == result.n_train


def test_bad_network_and_missing_catalog_are_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown ceiling network 'vgg'"):
        build_network("vgg", 5)
    with pytest.raises(InputError):
        load_split([tmp_path / "nowhere"], "train")
    with pytest.raises(ConfigError, match="epochs"):
        train_ceiling(_blobs(4, 0, 20), CeilingConfig(epochs=0), say=lambda s: None)


def test_task_intervals_resample_patients_of_known_rows() -> None:
    from fedmri.heads.intervals import task_intervals
    from fedmri.heads.tasks import TASKS

    rng = np.random.default_rng(0)
    n = 40
    target = torch.from_numpy((rng.random((n, len(FINDING_CODES))) < 0.4).astype(np.float32))
    known = torch.ones(n, dtype=torch.bool)
    known[:4] = False  # unlabelled series are not resampled
    scores = torch.from_numpy(rng.normal(size=(n, len(FINDING_CODES))).astype(np.float32)) + 2 * target
    regions = ["brain"] * n
    out = task_intervals(TASKS["findings"], scores, target, known, regions, [str(i // 2) for i in range(n)], n_boot=200)
    point = TASKS["findings"].region_metrics(scores, target, known, regions)["auroc_in_region_macro"]
    assert out["auroc_in_region_macro_ci_low"] <= point <= out["auroc_in_region_macro_ci_high"]
    assert 0.5 < out["auroc_in_region_macro_ci_low"]  # scores separate the classes: the interval is above chance
    assert set(out) == {"auroc_macro_ci_low", "auroc_macro_ci_high", "auroc_in_region_macro_ci_low",
                        "auroc_in_region_macro_ci_high"}
    assert task_intervals(TASKS["findings"], scores, target, torch.zeros(n, dtype=torch.bool), regions,
                          ["p"] * n) == {}
