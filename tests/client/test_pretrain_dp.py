"""Self-supervised pretraining under sample-level DP-SGD at a site (no Flower)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from fedmri.client.privacy.gate import PrivacyGate
from fedmri.client.site import load_site
from fedmri.client.trainers import DeclineError, TrainRequest, parse_run_config
from fedmri.client.trainers.pretrain import build_ssl_model, run_pretrain
from fedmri.client.privacy.dp_sgd import poisson_batches
from fedmri.client.trainers.pretrain_dp import make_private, ssl_sample_loss
from fedmri.ssl import collate_multicrop
from fedmri.wire import select, stage_groups

pytestmark = pytest.mark.usefixtures("one_thread")

DP = {"dp": True, "dp_noise_multiplier": 1.0, "dp_max_grad_norm": 1.0}


def _round(site_file, initial, request_values, tmp_path: Path, site_overrides=(), **overrides):
    request = TrainRequest.from_config(request_values("pretrain", **(DP | overrides)))
    run_cfg = parse_run_config(request.fedmri_config)
    down = select(initial, stage_groups("pretrain", run_cfg).down)
    site = load_site(site_file, list(site_overrides))
    gate = PrivacyGate(site, request, ledger_path=tmp_path / "ledger.sqlite")
    up, metrics = run_pretrain(site, run_cfg, down, request, privacy=gate)
    return up, metrics, down, gate


def _without_dp_center(run_yaml: str) -> str:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(run_yaml)
    cfg.ssl.dp_center.enabled = False
    return OmegaConf.to_yaml(cfg)


def test_a_private_round_moves_the_centres_and_reports_expected_counts(site_file, initial, request_values,
                                                                        tmp_path) -> None:
    up, metrics, down, gate = _round(site_file, initial, request_values, tmp_path, local_steps=3)
    plan = gate.plans["pretrain"]
    assert plan.sample_rate == pytest.approx(4 / 8) and plan.steps == 3 and plan.noise_multiplier == 1.0
    centres = [k for k in up if k.startswith("center/")]
    # The DP centre: released with the gradients, so the centres move at no extra ε.
    assert centres and all(not torch.equal(up[k], down[k]) for k in centres)
    encoder = [k for k in up if k.startswith("encoder/")]
    assert any(not torch.equal(up[k], down[k]) for k in encoder)
    assert all(torch.isfinite(v).all() for v in up.values())
    assert metrics["num-examples"] == round(3 * 4) and metrics["steps"] == 3
    assert "koleo_loss" not in metrics  # off under DP


def test_without_the_dp_centre_the_centres_stay_as_received(site_file, initial, request_values, run_yaml,
                                                            tmp_path) -> None:
    up, _, down, gate = _round(site_file, initial, request_values, tmp_path, local_steps=3,
                               fedmri_config=_without_dp_center(run_yaml))
    centres = [k for k in up if k.startswith("center/")]
    assert centres and all(torch.equal(up[k], down[k]) for k in centres)  # no data statistic leaves
    assert gate.plans["pretrain"].noise_multiplier == 1.0  # the same mechanism, the same ε


def test_the_dp_centre_tracks_the_teachers_mean_and_weighs_each_patient_once(site_file, run_yaml, initial) -> None:
    """Without noise, the released centre term is the mean over patients of each patient's mean teacher logits."""
    from omegaconf import OmegaConf

    from fedmri.client.trainers.pretrain_dp import DPCenter, dp_ssl_step

    run_cfg = parse_run_config(run_yaml)
    meta = build_ssl_model(run_cfg, select(initial, stage_groups("pretrain", run_cfg).down), "pretrain").train()
    make_private(meta)
    cfg = OmegaConf.create({"share": 0.2, "radius": 100.0, "momentum": 0.0})  # no clipping, centre := release
    center = DPCenter(meta, cfg, 0.9, max_grad_norm=1.0)
    g = torch.Generator().manual_seed(0)
    crops = [collate_multicrop([{"global_crops": [torch.randn(1, 16, 16, 16, generator=g) * (1 + i) for _ in range(2)],
                                 "local_crops": []}]) for i in range(3)]
    teacher = []
    for c in crops:
        with torch.no_grad():
            terms: dict = {}
            meta(c, None, 0.04, update_centers=False, center_terms=terms)
        teacher.append(terms["dino"])
    units = [0, 0, 1]  # patient 0 has two series, patient 1 one
    dp_ssl_step(meta, crops, 0.04, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=2.0,
                generator=None, units=units, center=center)
    expected = ((teacher[0] + teacher[1]) / 2 + teacher[2]) / 2
    assert torch.allclose(meta.dino_loss.center[0], expected, atol=1e-5)
    assert center.terms == []  # cleared for the next step


def test_the_noise_and_batches_come_from_the_sites_secret(site_file, initial, request_values, tmp_path) -> None:
    """Same request, same salt: the same release (a retry). Another salt: other noise and batches."""
    a, *_ = _round(site_file, initial, request_values, tmp_path / "a", local_steps=2)
    b, *_ = _round(site_file, initial, request_values, tmp_path / "b", local_steps=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = tmp_path / "other-site"
    shutil.copytree(site_file.parent / "catalog", other / "catalog")
    (other / "catalog" / "site.salt").write_text("01" * 32 + "\n")
    (other / "site.yaml").write_text(site_file.read_text())
    c, *_ = _round(other / "site.yaml", initial, request_values, tmp_path / "c", local_steps=2)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith("encoder/"))


def test_a_samples_term_does_not_depend_on_the_rest_of_the_batch(site_file, run_yaml, initial) -> None:
    """What makes per-sample clipping valid: centres fixed, KoLeo off, so crops of one series alone."""
    run_cfg = parse_run_config(run_yaml)
    meta = build_ssl_model(run_cfg, select(initial, stage_groups("pretrain", run_cfg).down), "pretrain").train()
    make_private(meta)
    assert meta.koleo_loss is None and meta.per_sample_decomposable
    centre = meta.dino_loss.center.clone()
    g = torch.Generator().manual_seed(0)
    crops = [{"global_crops": [torch.randn(1, 16, 16, 16, generator=g) for _ in range(2)],
              "local_crops": [torch.randn(1, 8, 8, 8, generator=g) for _ in range(2)]} for _ in range(3)]
    loss = ssl_sample_loss(meta, 0.04)
    first = collate_multicrop([crops[0]])
    torch.manual_seed(1)
    alone = loss({}, first)
    for other in crops[1:]:  # run other samples through the model in between
        loss({}, collate_multicrop([other]))
    torch.manual_seed(1)
    again = loss({}, first)
    assert torch.equal(alone, again)
    assert torch.equal(meta.dino_loss.center, centre)


def test_sinkhorn_centering_is_declined_with_the_reason(site_file, small_cfg, initial) -> None:
    from omegaconf import OmegaConf

    from fedmri.config import to_yaml

    sinkhorn = OmegaConf.merge(small_cfg, {"ssl": {"centering": "sinkhorn_knopp"}})
    run_cfg = parse_run_config(to_yaml(sinkhorn))
    meta = build_ssl_model(run_cfg, select(initial, stage_groups("pretrain", run_cfg).down), "pretrain")
    with pytest.raises(DeclineError, match="Sinkhorn-Knopp"):
        make_private(meta)


def test_poisson_batches_have_mean_size_q_n_and_may_be_empty() -> None:
    batches = poisson_batches(20, 0.1, 2000, seed=3)
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float32)
    assert sizes.mean().item() == pytest.approx(2.0, abs=0.15)
    assert (sizes == 0).any()
    assert batches == poisson_batches(20, 0.1, 2000, seed=3)


def test_a_round_past_the_budget_is_declined_before_any_work(site_file, initial, request_values, tmp_path) -> None:
    with pytest.raises(DeclineError, match="privacy budget"):
        _round(site_file, initial, request_values, tmp_path, ["policy.dp.epsilon_total=0.5"], local_steps=3)


def _with_public_koleo(run_yaml: str, enabled: bool = True) -> str:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(run_yaml)
    cfg.ssl.dp_public_koleo.enabled = enabled
    cfg.ssl.koleo_loss_weight = 0.1
    return OmegaConf.to_yaml(cfg)


def test_koleo_on_public_series_changes_the_update_at_no_extra_epsilon(site_file, initial, request_values, run_yaml,
                                                                       tmp_path) -> None:
    # The site's own catalog stands in for a public one here: only where the term reads from matters.
    public = [f"public_catalog={site_file.parent / 'catalog'}"]
    with_it, metrics, down, gate = _round(site_file, initial, request_values, tmp_path / "a", site_overrides=public,
                                          local_steps=3, fedmri_config=_with_public_koleo(run_yaml))
    without, _, _, plain = _round(site_file, initial, request_values, tmp_path / "b", site_overrides=public,
                                  local_steps=3, fedmri_config=_with_public_koleo(run_yaml, enabled=False))
    assert metrics["public_koleo_loss"] > 0 and "koleo_loss" not in metrics
    encoder = [k for k in with_it if k.startswith("encoder/")]
    assert any(not torch.equal(with_it[k], without[k]) for k in encoder)
    # The same batches, noise and mechanism: the public term is post-processing.
    assert gate.plans["pretrain"] == plain.plans["pretrain"]
    spent, spent_plain = gate.record(), plain.record()
    assert [e.epsilon_run for e in spent] == pytest.approx([e.epsilon_run for e in spent_plain], abs=1e-12)
    assert spent[0].epsilon_run > 0


def test_the_public_term_reads_only_the_model_and_the_public_series(site_file, run_yaml, initial) -> None:
    from fedmri.client.trainers.pretrain import MultiCropTransform
    from fedmri.client.trainers.pretrain_dp import PublicKoLeo
    from fedmri.data.dataset import SeriesDataset

    run_cfg = parse_run_config(_with_public_koleo(run_yaml))
    meta = build_ssl_model(run_cfg, select(initial, stage_groups("pretrain", run_cfg).down), "pretrain").eval()
    public = SeriesDataset(site_file.parent / "catalog", None)

    def term(seed: int) -> dict:
        koleo = PublicKoLeo(meta, public, [[0, 1, 2]], MultiCropTransform(run_cfg), seed, 0.1, torch.device("cpu"))
        return koleo.gradients()

    first, again, other = term(0), term(0), term(1)
    assert first.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)  # other crops, another gradient
    assert set(first) <= {n for n, p in meta.student.named_parameters() if p.requires_grad}


def test_a_round_asking_for_public_koleo_is_declined_by_a_site_without_public_series(
        site_file, initial, request_values, run_yaml, tmp_path) -> None:
    with pytest.raises(DeclineError, match="names no public_catalog"):
        _round(site_file, initial, request_values, tmp_path, local_steps=1,
               fedmri_config=_with_public_koleo(run_yaml))
    with pytest.raises(DeclineError, match="holds 0 series|cannot be read"):
        empty = tmp_path / "empty"
        empty.mkdir()
        _round(site_file, initial, request_values, tmp_path, site_overrides=[f"public_catalog={empty}"],
               local_steps=1, fedmri_config=_with_public_koleo(run_yaml))
