"""The aligned model: shapes, logit scale, what trains, the objective, DP checks."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from opacus.validators import ModuleValidator

from fedmri.align import AlignedModel, AlignObjective, build_align_objective, build_aligned_model
from fedmri.errors import ConfigError
from fedmri.text import TextTower

REPORTS = ["Impression: large left lesion.", "Findings: small right focus, no mass effect."]


def _with(cfg, **align):
    cfg = OmegaConf.merge(cfg, {"align": align})
    return cfg


def _batch(model: AlignedModel) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"images": torch.rand(2, 1, 32, 32, 32, generator=g), **model.text_tower.tokenize(REPORTS)}


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def _train_step(model: AlignedModel, objective: AlignObjective) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    objective(model(**_batch(model)))["align_loss"].backward()
    opt.step()


def test_forward_gives_unit_embeddings_and_the_clip_scale(tiny_cfg, tower_copy: TextTower) -> None:
    model = build_aligned_model(tiny_cfg, text_tower=tower_copy)
    out = model(**_batch(model))
    assert out["image_features"].shape == out["text_features"].shape == (2, 32)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out["text_features"].norm(dim=-1), torch.ones(2))
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert out["logit_bias"] is None


def test_siglip_starts_at_scale_10_and_bias_minus_10(tiny_cfg, tower_copy: TextTower) -> None:
    model = build_aligned_model(_with(tiny_cfg, loss="siglip"), text_tower=tower_copy)
    assert model.scale().item() == pytest.approx(10.0, rel=1e-5)
    assert model.logit_bias is not None and model.logit_bias.item() == -10.0


def test_logit_scale_is_clamped_at_100(tiny_cfg, tower_copy: TextTower) -> None:
    model = build_aligned_model(tiny_cfg, text_tower=tower_copy)
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    scale = model.scale()
    scale.backward()
    assert scale.item() == pytest.approx(100.0, rel=1e-5)
    assert model.logit_scale.grad.item() == 0.0  # clamped: no push further up


def test_pooled_text_input_equals_the_token_path(tiny_cfg, tower_copy: TextTower) -> None:
    model = build_aligned_model(tiny_cfg, text_tower=tower_copy)
    tokens = model.text_tower.tokenize(REPORTS)
    with torch.no_grad():
        pooled = model.text_tower(tokens["input_ids"], tokens["attention_mask"])
        assert torch.equal(model.encode_text(**tokens), model.encode_text(pooled=pooled))
    with pytest.raises(ValueError, match="input_ids"):
        model.encode_text()


def test_frozen_text_tower_gets_no_gradient_and_does_not_change(tiny_cfg, tower_copy: TextTower) -> None:
    model = build_aligned_model(tiny_cfg, text_tower=tower_copy)  # image trains, text frozen
    before = _snapshot(model)
    _train_step(model, AlignObjective("clip", 0, 32))
    changed = _changed(before, model)
    assert all(p.grad is None for p in model.text_tower.parameters())
    assert not any(k.startswith("text_tower.") for k in changed)
    assert {"image_proj.weight", "text_proj.weight", "logit_scale"} <= changed
    assert any(k.startswith("image_encoder.blocks.") for k in changed)


def test_frozen_image_encoder_and_top_text_layer(tiny_cfg, tower_copy: TextTower) -> None:
    cfg = _with(tiny_cfg, freeze_image_encoder=True, text_trainable_layers=1)
    model = build_aligned_model(cfg, text_tower=tower_copy)
    model.train()
    assert not model.image_encoder.training  # frozen parts run in eval mode
    before = _snapshot(model)
    _train_step(model, AlignObjective("clip", 0, 32))
    changed = _changed(before, model)
    assert all(p.grad is None for p in model.image_encoder.parameters())
    assert not any(k.startswith("image_encoder.") for k in changed)
    text_changed = {k for k in changed if k.startswith("text_tower.")}
    assert text_changed and all(k.startswith("text_tower.model.encoder.layer.5.") for k in text_changed)
    assert {"image_proj.weight", "text_proj.weight"} <= changed


def test_objective_queue_fills_and_adds_negatives(tiny_cfg, tower_copy: TextTower) -> None:
    model = build_aligned_model(tiny_cfg, text_tower=tower_copy)
    objective = build_align_objective(_with(tiny_cfg, queue_size=4))
    with torch.no_grad():
        out = model(**_batch(model))
    first = objective(out)["align_loss"]
    assert len(objective.queue) == 2
    second = objective(out)["align_loss"]  # now with the 2 queued texts as extra negatives
    assert len(objective.queue) == 4
    assert second > first  # the queued copies of the true texts are hard negatives
    assert objective.per_sample_decomposable is False


def test_siglip_objective_uses_the_bias(tiny_cfg, tower_copy: TextTower) -> None:
    model = build_aligned_model(_with(tiny_cfg, loss="siglip"), text_tower=tower_copy)
    out = model(**_batch(model))
    objective = build_align_objective(_with(tiny_cfg, loss="siglip"))
    objective(out)["align_loss"].backward()
    assert model.logit_bias.grad is not None and model.logit_bias.grad.item() != 0.0


@pytest.mark.parametrize("align, match", [
    ({"loss": "triplet"}, "align.loss"),
    ({"image_pooling": "gem"}, "pooling"),
    ({"logit_scale_init": 5.0}, "logit_scale_init"),
    ({"text_trainable_layers": 9}, "text_trainable_layers"),
])
def test_bad_align_config_is_a_config_error(tiny_cfg, tower_copy: TextTower, align: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_aligned_model(_with(tiny_cfg, **align), text_tower=tower_copy)


@pytest.mark.parametrize("align", [{"loss": "hinge"}, {"queue_size": -1}])
def test_bad_objective_config_is_a_config_error(tiny_cfg, align: dict) -> None:
    with pytest.raises(ConfigError):
        build_align_objective(_with(tiny_cfg, **align))


def test_projections_pass_the_opacus_validator(tiny_cfg, tower_copy: TextTower) -> None:
    model = build_aligned_model(tiny_cfg, text_tower=tower_copy)
    projections = torch.nn.ModuleDict({"image_proj": model.image_proj, "text_proj": model.text_proj})
    assert ModuleValidator.validate(projections, strict=False) == []
