"""Image-report alignment under sample-level DP-SGD: fixed public negatives, or a clear refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from fedmri.align.dp_negatives import check_dp_negatives, fixed_negative_loss, require_dp_valid
from fedmri.client.privacy.dp_sgd import per_sample_grads
from fedmri.client.privacy.gate import PrivacyGate
from fedmri.client.site import load_site
from fedmri.client.trainers import DeclineError, TrainRequest, parse_run_config
from fedmri.client.trainers.align import report_pairs, run_align, site_aligned_model
from fedmri.client.trainers.align_dp import PairTexts, negative_texts, pair_loss
from fedmri.client.trainers.data import site_dataset
from fedmri.errors import ConfigError
from fedmri.losses.clip_loss import ClipLoss
from fedmri.wire import initial_state, select, stage_groups

pytestmark = pytest.mark.usefixtures("one_thread")

# Few negatives keep the text tower's one-off encoding short; the behaviour is the same with 64.
FIXED = {"dp_negatives": "synthetic", "dp_num_negatives": 16}


def _yaml(run_yaml: str, **align: object) -> str:
    return OmegaConf.to_yaml(OmegaConf.merge(parse_run_config(run_yaml), {"align": align}))


def _round(site_file, text, request_values, ledger: Path, state=None, site_overrides=(), **overrides):
    """One DP align round; returns the update, metrics, the weights sent down and the gate."""
    values = request_values("align", fedmri_config=text, dp=True, **({"dp_noise_multiplier": 0.01} | overrides))
    request = TrainRequest.from_config(values)
    run_cfg = parse_run_config(text)
    down = state if state is not None else select(initial_state(run_cfg), stage_groups("align", run_cfg).down)
    site = load_site(site_file, list(site_overrides))
    gate = PrivacyGate(site, request, ledger_path=ledger)
    up, metrics = run_align(site, run_cfg, down, request, privacy=gate)
    return up, metrics, down, gate


def test_in_batch_negatives_are_declined_under_dp_with_the_reason(site_file, run_yaml, request_values,
                                                                  tmp_path) -> None:
    with pytest.raises(DeclineError, match="in-batch negatives") as caught:
        _round(site_file, run_yaml, request_values, tmp_path / "ledger.sqlite")
    assert "align.dp_negatives=synthetic" in str(caught.value)
    with pytest.raises(ConfigError, match=r"(?s)in-batch negatives.*align\.dp_negatives=synthetic"):
        require_dp_valid(parse_run_config(run_yaml), "test")
    require_dp_valid(parse_run_config(_yaml(run_yaml, **FIXED)), "test")


@pytest.mark.parametrize(("key", "value", "match"), [
    ("dp_negatives", "public", "dp_negatives 'public' is not one of none, synthetic"),
    ("dp_num_negatives", 0, r"dp_num_negatives 0 must be in \[1, 4096\]"),
    ("dp_num_negatives", 5000, r"dp_num_negatives 5000 must be in \[1, 4096\]"),
])
def test_bad_dp_negative_settings_are_config_errors(run_yaml, key, value, match) -> None:
    with pytest.raises(ConfigError, match=match):
        check_dp_negatives(parse_run_config(_yaml(run_yaml, **{key: value})))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_fixed_negative_loss_goes_down_under_small_noise(site_file, run_yaml, request_values, tmp_path,
                                                             seed) -> None:
    # Projections only, on a frozen encoder (as the non-private test); batch 2 of 4 pairs: q = 1/2,
    # so some Poisson batches are empty and still take a noisy step.
    text = _yaml(run_yaml, freeze_image_encoder=True, **FIXED)
    kwargs = {"site_overrides": ["batch_size=2"], "local_steps": 15, "lr": 1e-2, "seed": seed}
    up1, m1, down, gate = _round(site_file, text, request_values, tmp_path / "ledger.sqlite", **kwargs)
    plan = gate.plans["align"]
    assert plan.units == 4 and plan.sample_rate == pytest.approx(0.5) and plan.noise_multiplier == 0.01
    assert m1["num-examples"] == round(15 * plan.expected_batch_size) == 30 and m1["steps"] == 15
    _, m2, _, _ = _round(site_file, text, request_values, tmp_path / "ledger.sqlite", down | up1, round=2,
                         **kwargs)
    assert m2["align_loss"] < 0.5 * m1["align_loss"], (m1, m2)
    assert m1["loss"] == m1["align_loss"]


def test_large_noise_still_moves_the_weights_finite_and_a_retry_draws_the_same(site_file, run_yaml,
                                                                                request_values, tmp_path) -> None:
    # SigLIP's sigmoid form trains the bias too; the queue is asked for and stays off under DP.
    text = _yaml(run_yaml, loss="siglip", queue_size=8, **FIXED)
    up, metrics, down, _ = _round(site_file, text, request_values, tmp_path / "a.sqlite", local_steps=3,
                                  dp_noise_multiplier=50.0)
    assert all(torch.isfinite(v).all() for v in up.values())
    for key in ("projections/image_proj.weight", "projections/text_proj.weight"):
        assert not torch.equal(up[key], down[key])
    assert any(k.endswith("logit_bias") and not torch.equal(up[k], down[k]) for k in up)
    again, _, _, _ = _round(site_file, text, request_values, tmp_path / "b.sqlite", local_steps=3,
                            dp_noise_multiplier=50.0)
    assert all(torch.equal(up[k], again[k]) for k in up)  # noise and batches from the site's secret seed


def test_trainable_text_layers_get_private_gradients(site_file, run_yaml, request_values, tmp_path) -> None:
    text = _yaml(run_yaml, text_trainable_layers=1, freeze_image_encoder=True, dp_negatives="synthetic",
                 dp_num_negatives=4)
    up, _, down, _ = _round(site_file, text, request_values, tmp_path / "ledger.sqlite", local_steps=1,
                            dp_noise_multiplier=1.0)
    assert any(not torch.equal(up[k], down[k]) for k in up if k.startswith("text/"))


def test_a_pairs_gradient_does_not_depend_on_the_rest_of_the_batch(site_file, run_yaml, initial) -> None:
    """What makes per-sample clipping valid here, and what in-batch negatives break."""
    run_cfg = parse_run_config(_yaml(run_yaml, **FIXED))
    model = site_aligned_model(run_cfg, select(initial, stage_groups("align", run_cfg).down), torch.device("cpu"))
    dataset = site_dataset(load_site(site_file), "train")
    reports, owner = report_pairs(dataset)
    texts = PairTexts(model, run_cfg, reports, torch.device("cpu"))
    series = [[(dataset[i]["image"], u) for i in range(len(dataset)) if owner[i] == u] for u in range(len(reports))]
    assert len(series) == 4 and all(len(s) == 2 for s in series)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    batch = [series[0][0], series[1][0], series[2][0]]
    other = [series[0][0], series[3][1], series[1][1], series[2][1]]  # the same first pair, the rest changed
    torch.manual_seed(0)  # stochastic depth draws the same for the first pair
    a = per_sample_grads(pair_loss(model, texts), params, batch)
    torch.manual_seed(0)
    b = per_sample_grads(pair_loss(model, texts), params, other)
    assert all(torch.equal(a[n][0], b[n][0]) for n in params)
    assert any(a[n][1].abs().sum() > 0 and not torch.equal(a[n][1], b[n][1]) for n in params)

    def in_batch_row(items):  # CLIP's image->text term of the first pair, negatives from the batch
        out = model(torch.stack([x for x, _ in items]), text_pooled=texts.pooled[[u for _, u in items]])
        logits, _ = ClipLoss().get_logits(out["image_features"], out["text_features"], out["logit_scale"])
        return torch.autograd.grad(F.cross_entropy(logits[:1], torch.zeros(1, dtype=torch.long)),
                                   model.image_proj.weight)[0]

    model.eval()
    assert not torch.allclose(in_batch_row(batch), in_batch_row(other))


def test_negatives_are_fixed_distinct_prepared_and_no_sites_report(site_file, run_yaml) -> None:
    from fedmri.client.trainers import align_dp

    cfg = parse_run_config(_yaml(run_yaml, dp_negatives="synthetic"))
    texts = negative_texts(cfg)
    assert len(texts) == 64 == len(set(texts))
    assert all(t.startswith("Impression: ") and " Findings: " in t and "  " not in t for t in texts)
    assert negative_texts(cfg) == texts
    # Versioned: the demo's report generator no longer decides them, but it wrote them.
    from fedmri.align.dp_negatives import NEGATIVES_FILE, NEGATIVES_SHA256

    assert NEGATIVES_FILE.endswith("_v1.json.gz") and len(NEGATIVES_SHA256) == 64
    assert "fedmri.simulations" not in open(align_dp.__file__, encoding="utf-8").read()
    assert negative_texts(parse_run_config(_yaml(run_yaml, **FIXED))) == texts[:16]
    site = load_site(site_file)
    private = {r for split in ("train", "val", "test") for r in report_pairs(site_dataset(site, split))[0]}
    assert private and not private & set(texts)


def test_fixed_negative_loss_is_infonce_or_siglip_over_one_pair() -> None:
    g = torch.Generator().manual_seed(0)
    img, txt = F.normalize(torch.randn(2, 8, generator=g), dim=-1)
    neg = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-2.0)
    logits = scale * torch.cat([txt[None], neg]) @ img  # 6
    expected = F.cross_entropy(logits[None], torch.zeros(1, dtype=torch.long))
    assert fixed_negative_loss(img, txt, neg, scale).item() == pytest.approx(expected.item(), rel=1e-6)
    signs = torch.tensor([1.0, -1, -1, -1, -1, -1])
    siglip = -F.logsigmoid(signs * (logits + bias)).sum()
    assert fixed_negative_loss(img, txt, neg, scale, bias).item() == pytest.approx(siglip.item(), rel=1e-6)
    with pytest.raises(ValueError, match="negatives"):
        fixed_negative_loss(img, txt, neg[:, :4], scale)
