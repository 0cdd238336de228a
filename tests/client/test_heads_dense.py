"""The dense heads (segmentation, anomaly) in the heads stage: wire groups, lesion targets, training, metrics, DP."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from opacus.validators import ModuleValidator

from fedmri.client.site import load_site
from fedmri.client.trainers import DeclineError, TrainRequest
from fedmri.client.trainers import heads as heads_trainer
from fedmri.client.trainers.data import site_dataset
from fedmri.client.trainers.heads import evaluate_heads, run_heads, series_loss
from fedmri.client.trainers.heads_dense import DenseData, cache_options, lesion_rows
from fedmri.config import load_config, to_yaml
from fedmri.errors import ConfigError
from fedmri.heads import AnomalyHead, LightDecoder, UNETRDecoder, skip_layers
from fedmri.heads.dense import DENSE_TASKS, DenseInputs, lesion_target
from fedmri.heads.tasks import build_task_heads, load_task_heads_state, task_heads_state, task_spec
from fedmri.wire import ENCODER, HEAD_PREFIX, group_of, head_groups, initial_state, select, stage_groups

from helpers.site_factory import make_site

# 16^3 volumes with one 16^3 patch (the UNETR decoder needs patch 16), a 3-block 32-wide ViT,
# a decoder of base width 4: a local step of all three heads takes a few ms on one thread.
OVERRIDES = [
    "data.preprocess.target_shape=[16,16,16]", "data.preprocess.target_spacing=[2.0,2.0,2.0]",
    "model.img_size=[16,16,16]", "model.patch_size=16", "model.embed_dim=32", "model.depth=3", "model.num_heads=2",
    "model.layerscale_init=0", "ssl.global_crops_size=16", "ssl.local_crops_size=16", "ssl.local_crops_number=2",
    "ssl.head_n_prototypes=32", "ssl.ibot_n_prototypes=32", "ssl.head_hidden_dim=64", "ssl.head_bottleneck_dim=32",
    "align.embed_dim=32", "heads.hidden_dim=32", "heads.seg_feature_size=4", "heads.tasks=[sex,segmentation,anomaly]",
]
DENSE = ("segmentation", "anomaly")


@pytest.fixture(scope="module")
def dense_cfg() -> DictConfig:
    return load_config("tiny", overrides=OVERRIDES)


@pytest.fixture(scope="module")
def dense_site(tmp_path_factory: pytest.TempPathFactory, dense_cfg: DictConfig) -> Path:
    """site.yaml of a 6-patient hospital: every other series has a lesion mask (the blob), one has no labels row.

    Even patients list ``mass``, odd ones no finding, so the unmasked series of even
    patients are unknown and those of odd patients are all-background targets.
    """
    from fedmri.data import find_files, load_series
    from fedmri.data.indexer import index_site
    from fedmri.simulations.runner import synthetic_salt

    root = tmp_path_factory.mktemp("dense-site")
    site = make_site(root / "hospital", n_patients=6, series_per_patient=2, seed=5, with_mask=False)
    with open(site.labels, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    for k, folder in enumerate(site.series_dirs):
        if k % 2 == 0:
            volume = load_series(find_files(folder))
            mask = np.where(volume.array > 500, 2, 0).astype(np.uint8)  # label 2: any non-zero label is lesion
            nib.save(nib.Nifti1Image(mask, volume.affine), site.root / f"masks/s{k}.nii.gz")
            rows[k + 1][4] = f"masks/s{k}.nii.gz"
    with open(site.labels, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows[:-1])  # the last series has no labels row
    synthetic_salt(root / "catalog", 5, "site-d")  # the same patients in each split on every run
    index_site(site.dicom, site.reports, root / "catalog", labels=site.labels, cfg=dense_cfg)
    path = root / "site.yaml"
    path.write_text("name: site-d\ncatalog: catalog\nbatch_size: 4\n")
    return path


@pytest.fixture()
def run_cfg(dense_cfg: DictConfig, tmp_path: Path) -> DictConfig:
    return OmegaConf.merge(dense_cfg, {"heads": {"cache_dir": str(tmp_path / "features")}})


@pytest.fixture()
def site_cfg(dense_site: Path) -> DictConfig:
    return load_site(dense_site)


@pytest.fixture(scope="module")
def initial(dense_cfg: DictConfig) -> dict:
    """The coordinator's initial state: the server builds the dense heads with build_task_heads too."""
    return initial_state(dense_cfg)


def _request(cfg: DictConfig, **values: Any) -> TrainRequest:
    return TrainRequest.from_config({"stage": "heads", "round": 1, "server-round": 1, "seed": 0, "run-name": "test",
                                     "fedmri-config": to_yaml(cfg), "local-steps": 10, "lr": 3e-3,
                                     "weight-decay": 1e-4} | values)


def test_dense_heads_build_and_travel_as_head_groups(dense_cfg: DictConfig, small_cfg: DictConfig,
                                                     initial: dict) -> None:
    torch.manual_seed(0)
    heads = build_task_heads(dense_cfg)
    assert isinstance(heads["segmentation"], UNETRDecoder) and isinstance(heads["anomaly"], AnomalyHead)
    assert not heads["segmentation"].image_skip  # heads.seg_image_skip is off by default
    assert ModuleValidator.validate(heads, strict=False) == []  # DP-safe: no batch norm
    state = task_heads_state(heads)
    assert {group_of(k) for k in state} == set(head_groups(dense_cfg)) == {"head.trunk", "head.sex",
                                                                            "head.segmentation", "head.anomaly"}
    assert set(select(initial, head_groups(dense_cfg))) == set(state)  # the server's initial heads
    other = build_task_heads(dense_cfg)
    load_task_heads_state(other, state)
    assert all(torch.equal(v, task_heads_state(other)[k]) for k, v in state.items())
    assert task_spec("segmentation").classes == ("background", "lesion")
    with pytest.raises(ConfigError, match="patch_size = 16, got 8"):
        build_task_heads(OmegaConf.merge(small_cfg, {"heads": {"tasks": ["segmentation"]}}))
    skip = OmegaConf.merge(dense_cfg, {"heads": {"seg_image_skip": True}})
    assert build_task_heads(skip)["segmentation"].image_skip


def test_cache_stores_tokens_only_for_dense_tasks(dense_cfg: DictConfig) -> None:
    def with_tasks(*tasks: str) -> dict:
        return cache_options(OmegaConf.merge(dense_cfg, {"heads": {"tasks": list(tasks)}}))

    assert with_tasks("findings", "sex") == {}
    assert with_tasks("sex", "anomaly") == {"patch_tokens": True}
    assert with_tasks("segmentation") == {"layers": skip_layers(dense_cfg), "patch_tokens": True}


def test_lesion_targets_and_unknowns(site_cfg: DictConfig) -> None:
    shape = (2, 2, 2)
    mask = torch.zeros(1, *shape, dtype=torch.uint8)
    mask[0, 0, 0, 0] = 3
    findings = {"none": torch.zeros(5), "mass": torch.tensor([1.0, 0, 0, 0, 0]), "no_row": torch.full((5,), -1.0)}
    target, known = lesion_target({"mask": mask, "labels": {"findings": findings["mass"]}}, shape)
    assert known and target.tolist() == (mask > 0).to(torch.uint8).tolist()
    target, known = lesion_target({"labels": {"findings": findings["none"]}}, shape)
    assert known and target.shape == (1, *shape) and not target.any()  # no finding: all background
    assert not lesion_target({"labels": {"findings": findings["mass"]}}, shape)[1]  # a finding, no mask
    assert not lesion_target({"labels": {"findings": findings["no_row"]}}, shape)[1]  # no labels row

    for split in ("train", "val", "test"):
        dataset = site_dataset(site_cfg, split)
        rows, masked = lesion_rows(dataset)
        samples = [dataset[i] for i in range(len(dataset))]
        assert masked == {i for i, s in enumerate(samples) if "mask" in s}
        assert rows == [i for i, s in enumerate(samples) if lesion_target(s, (16, 16, 16))[1]]
        assert all(samples[i]["mask"].max() == 2 for i in masked)


def test_dense_round_sends_only_head_groups(site_cfg: DictConfig, run_cfg: DictConfig, initial: dict,
                                            one_thread: None) -> None:
    from safetensors import safe_open

    down = select(initial, stage_groups("heads", run_cfg).down)
    encoder = {k: v.clone() for k, v in down.items() if group_of(k) == ENCODER}
    up, metrics = run_heads(site_cfg, run_cfg, down, _request(run_cfg))
    assert {group_of(k) for k in up} == {"head.trunk", "head.sex", "head.segmentation", "head.anomaly"}
    assert set(up) == {k for k in down if k.startswith(HEAD_PREFIX)}
    assert all(any(not torch.equal(v, down[k]) for k, v in up.items() if group_of(k) == f"{HEAD_PREFIX}{t}")
               for t in DENSE)
    assert all(torch.equal(v, down[k]) for k, v in encoder.items())  # the encoder is frozen, and never sent
    assert {"loss_sex", "loss_segmentation", "loss_anomaly"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    entry = next(Path(run_cfg.heads.cache_dir).rglob("*.safetensors"))
    with safe_open(str(entry), framework="pt") as f:
        assert {"cls", "mean", "max", "patch", "layer0", "layer1", "layer2"} == set(f.keys())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rounds_lower_the_dense_losses(site_cfg: DictConfig, run_cfg: DictConfig, initial: dict, seed: int,
                                       one_thread: None) -> None:
    state = select(initial, stage_groups("heads", run_cfg).down)
    request = _request(run_cfg, seed=seed)
    losses: dict[str, list[float]] = {t: [] for t in DENSE}
    for r in range(1, 4):
        up, metrics = run_heads(site_cfg, run_cfg, state, dataclasses.replace(request, round=r))
        state = state | up
        for t in DENSE:
            losses[t].append(metrics[f"loss_{t}"])
    assert losses["segmentation"][-1] < 0.85 * losses["segmentation"][0], losses
    assert losses["anomaly"][-1] < 0.6 * losses["anomaly"][0], losses


def test_evaluate_heads_dense_metrics(site_cfg: DictConfig, run_cfg: DictConfig, initial: dict,
                                      one_thread: None) -> None:
    up, _ = run_heads(site_cfg, run_cfg, select(initial, stage_groups("heads", run_cfg).down), _request(run_cfg))
    metrics = evaluate_heads(site_cfg, run_cfg, initial | up, "train")
    assert metrics["heads-examples"] == 8
    assert {"segmentation_dice", "segmentation_hd95", "anomaly_miou"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0.0 <= metrics["segmentation_dice"] <= 1.0 and 0.0 <= metrics["anomaly_miou"] <= 1.0
    assert metrics["segmentation_hd95"] >= 0.0
    # The series behind the figures, and the figures' patient-bootstrap intervals (as the tables show them).
    rows, masked = lesion_rows(site_dataset(site_cfg, "train"))
    assert metrics["dense-examples"] == len(rows) > 0 and metrics["lesion-free-examples"] <= len(rows) - len(masked)
    for key in ("segmentation_dice", "anomaly_miou"):
        assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"], key
    assert "segmentation_hd95_ci_low" not in metrics  # HD95 is no mean over series: no interval


def test_light_decoder_trains_and_scores_from_tokens_and_image(site_cfg: DictConfig, run_cfg: DictConfig,
                                                                 initial: dict, one_thread: None) -> None:
    light = OmegaConf.merge(run_cfg, {"heads": {"seg_decoder": "light", "seg_stride": 2,
                                                "tasks": ["sex", "segmentation"]}})
    state = select(initial_state(light), stage_groups("heads", light).down)
    assert isinstance(build_task_heads(light)["segmentation"], LightDecoder)
    losses = []
    for r in range(1, 4):
        up, metrics = run_heads(site_cfg, light, state, dataclasses.replace(_request(light), round=r))
        state = state | up
        losses.append(metrics["loss_segmentation"])
    assert losses[-1] < 0.85 * losses[0], losses
    scores = evaluate_heads(site_cfg, light, state, "train")
    assert 0.0 <= scores["segmentation_dice"] <= 1.0


def test_dense_metrics_of_a_perfect_and_an_empty_prediction() -> None:
    target = torch.zeros(3, 1, 8, 8, 8, dtype=torch.uint8)
    target[0, 0, 2:5, 2:5, 2:5] = 1
    target[1, 0, 4:7, 1:3, 3:6] = 1  # the third series: no lesion
    seg, anomaly = DENSE_TASKS["segmentation"], DENSE_TASKS["anomaly"]
    assert seg.metrics(target.bool(), target, spacing=[2.0, 2.0, 2.0]) == {"dice": 1.0, "hd95": 0.0}
    assert anomaly.metrics(target.bool(), target) == {"miou": 1.0}
    logits = torch.stack([1 - target, target], 1)[:, :, 0].float()  # N, 2, X, Y, Z: argmax is the target
    assert torch.equal(seg.predict(logits), target.bool())
    assert torch.equal(anomaly.predict(target.float() * 2 - 1), target.bool())
    empty = torch.zeros_like(target, dtype=torch.bool)
    scores = seg.metrics(empty, target)
    assert scores["dice"] == pytest.approx(1 / 3) and scores["hd95"] == 0.0  # defined only where both are empty
    assert seg.metrics(empty[:2], target[:2]) == {"dice": 0.0}  # HD95 undefined everywhere: left out, not NaN
    assert seg.metrics(empty[:0], target[:0]) == {}


def test_dp_round_with_dense_tasks_runs(site_cfg: DictConfig, run_cfg: DictConfig, initial: dict, tmp_path: Path,
                                        one_thread: None) -> None:
    from fedmri.client.privacy.gate import PrivacyGate

    request = dataclasses.replace(_request(run_cfg), dp=True, dp_noise_multiplier=1.0, dp_max_grad_norm=1.0)
    gate = PrivacyGate(site_cfg, request, ledger_path=tmp_path / "ledger.sqlite")
    down = select(initial, stage_groups("heads", run_cfg).down)
    up, metrics = run_heads(site_cfg, run_cfg, down, request, privacy=gate)
    assert set(up) == {k for k in down if k.startswith(HEAD_PREFIX)}
    assert all(any(not torch.equal(v, down[k]) for k, v in up.items() if group_of(k) == f"{HEAD_PREFIX}{t}")
               for t in DENSE)
    assert metrics["steps"] == 10 and {"loss_segmentation", "loss_anomaly"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())


def test_dense_per_series_gradient_ignores_the_rest_of_the_batch(dense_cfg: DictConfig) -> None:
    from fedmri.client.privacy.dp_sgd import per_sample_grads

    torch.manual_seed(0)
    cfg = OmegaConf.merge(dense_cfg, {"heads": {"dropout": 0.0}})
    heads = build_task_heads(cfg)
    params = dict(heads.named_parameters())
    g = torch.Generator().manual_seed(1)
    m, n_tokens, dim = 3, 1, int(cfg.model.embed_dim)
    inputs = DenseInputs([torch.randn(m, n_tokens, dim, generator=g).half() for _ in range(3)],
                         torch.randn(m, n_tokens, dim, generator=g).half(), (1, 1, 1))
    targets = (torch.rand(m, 1, 16, 16, 16, generator=g) > 0.9).to(torch.uint8)
    dense = DenseData(list(DENSE), torch.tensor([0, -1, 1, 2]), inputs, targets)
    seen: list[dict[str, float]] = []
    loss_fn = dense.series_loss(heads, series_loss(heads, ["sex"]), seen)
    width = heads["trunk"].net[0].normalized_shape[0]  # the pooled feature the shared trunk reads

    def sample(i: int) -> tuple[Any, int]:
        x = torch.randn(width, generator=torch.Generator().manual_seed(10 + i))
        return (x, torch.tensor(float(i % 2)), torch.tensor([1.0])), int(dense.slot[i])

    batch = per_sample_grads(loss_fn, params, [sample(i) for i in range(4)])
    other = per_sample_grads(loss_fn, params, [sample(0), sample(3)])
    alone = per_sample_grads(loss_fn, params, [sample(0)])
    for name in params:
        assert torch.allclose(batch[name][0], alone[name][0], atol=1e-6), name
        assert torch.allclose(other[name][0], alone[name][0], atol=1e-6), name
    dense_params = [n for n in params if n.split(".")[0] in DENSE]
    assert all(batch[n][1].abs().sum() == 0 for n in dense_params)  # the series with no lesion target
    assert any(batch[n][0].abs().sum() > 0 for n in dense_params)
    assert len(seen) == 3 + 2 + 1 and set(seen[0]) == {"loss_segmentation", "loss_anomaly"}


def test_declines_without_any_label_or_lesion(site_cfg: DictConfig, run_cfg: DictConfig, initial: dict,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heads_trainer, "task_targets", lambda tasks, rows: {
        "sex": (torch.zeros(8), torch.zeros(8, dtype=torch.bool))})
    monkeypatch.setattr(heads_trainer, "lesion_rows", lambda dataset: ([], set()))
    with pytest.raises(DeclineError, match="no series .* has a label .*segmentation and anomaly need lesion masks"):
        run_heads(site_cfg, run_cfg, select(initial, stage_groups("heads", run_cfg).down), _request(run_cfg))
