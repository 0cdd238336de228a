"""Classification and regression MLP heads: pooling, shapes, learning, DP checks."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator
from omegaconf import OmegaConf

from fedmri.errors import ConfigError
from fedmri.heads import MLPHead, build_mlp_head, pool_features, pooled_dim
from fedmri.heads.mlp import build_trunk


def _train(head: MLPHead, x: torch.Tensor, y: torch.Tensor, steps: int = 60) -> tuple[float, float]:
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    first = None
    for _ in range(steps):
        loss = head.loss(head(x), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, head.loss(head(x), y).item()


@pytest.mark.parametrize("pooling, width", [("cls", 8), ("mean", 8), ("max", 8), ("cls+mean", 16),
                                            ("cls+mean+max", 24)])
def test_pool_features_shapes_and_cached_mean(pooling: str, width: int) -> None:
    out = {"cls": torch.randn(3, 8), "patch": torch.randn(3, 5, 8)}
    pooled = pool_features(out, pooling)
    assert pooled.shape == (3, width) == (3, pooled_dim(8, pooling))
    # what the feature cache stores
    cached = {"cls": out["cls"], "mean": out["patch"].mean(1), "max": out["patch"].amax(1)}
    torch.testing.assert_close(pool_features(cached, pooling), pooled)


def test_max_pooling_keeps_one_token_that_the_mean_dilutes() -> None:
    patch = torch.zeros(2, 64, 4)
    patch[1, 17, 2] = 8.0  # one "lesion" token in the second volume
    out = {"cls": torch.zeros(2, 4), "patch": patch}
    assert pool_features(out, "max")[1, 2] - pool_features(out, "max")[0, 2] == 8.0
    assert pool_features(out, "mean")[1, 2] - pool_features(out, "mean")[0, 2] == 8.0 / 64
    parts = pool_features(out, "cls+max").reshape(2, 2, 4)
    assert torch.equal(parts[:, 0], out["cls"]) and torch.equal(parts[:, 1], patch.amax(1))


@pytest.mark.parametrize("pooling", ["gem", "cls+cls", "cls+", "CLS"])
def test_unknown_pooling_is_a_config_error(pooling: str) -> None:
    with pytest.raises(ConfigError, match="pooling"):
        pool_features({"cls": torch.zeros(1, 2)}, pooling)


@pytest.mark.parametrize("task, out_dim, hidden", [("multiclass", 4, 16), ("multilabel", 3, 0), ("regression", 1, 16)])
def test_output_shapes(task: str, out_dim: int, hidden: int) -> None:
    head = MLPHead(10, out_dim, task, hidden_dim=hidden)
    assert head(torch.randn(5, 10)).shape == (5, out_dim)


def test_multiclass_head_learns_separable_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat(20)  # 60
    x = torch.randn(60, 32, generator=g) + 3 * torch.nn.functional.one_hot(y, 32).float()
    head = MLPHead(32, 3, "multiclass", hidden_dim=16)
    first, last = _train(head, x, y)
    assert last < 0.2 * first
    assert (head(x).argmax(1) == y).float().mean() > 0.95


def test_multilabel_head_learns() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=g)
    y = torch.stack([x[:, 0] > 0, x[:, 1] > 0.5], dim=1).float()
    first, last = _train(MLPHead(16, 2, "multilabel", hidden_dim=16), x, y)
    assert last < 0.5 * first


def test_regression_head_learns_in_target_units() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 16, generator=g)
    age = 60 + 12 * x[:, 0]  # years
    head = MLPHead(16, 1, "regression", hidden_dim=16, target_mean=60.0, target_std=12.0)
    first, last = _train(head, x, age, steps=100)
    assert last < 0.2 * first
    assert (head(x).squeeze(1) - age).abs().mean() < 6.0  # predictions come out in years


def test_build_from_config_uses_the_pooled_width(cfg) -> None:
    separate = OmegaConf.merge(cfg, {"heads": {"trunk_dim": 0}})
    head = build_mlp_head(separate, "multiclass", 5)
    assert head.net[0].normalized_shape == (2 * cfg.model.embed_dim,)  # heads.pooling = cls+mean
    assert head(torch.randn(2, 2 * cfg.model.embed_dim)).shape == (2, 5)
    trunk = build_trunk(cfg)  # the default: every head reads the shared trunk
    assert trunk.net[0].normalized_shape == (2 * cfg.model.embed_dim,)
    head = build_mlp_head(cfg, "multiclass", 5)
    assert head.net[0].normalized_shape == (cfg.heads.trunk_dim,)
    assert head(trunk(torch.randn(2, 2 * cfg.model.embed_dim))).shape == (2, 5)


@pytest.mark.parametrize("task", ["multiclass", "multilabel", "regression"])
def test_heads_pass_the_opacus_validator(task: str) -> None:
    head = MLPHead(12, 3, task, hidden_dim=8, dropout=0.1)
    assert ModuleValidator.validate(head, strict=False) == []
    assert head.per_sample_decomposable


@pytest.mark.parametrize("args, kwargs", [
    ((8, 3, "ordinal"), {}),
    ((8, 1, "multiclass"), {}),
    ((0, 3, "multiclass"), {}),
    ((8, 3, "multiclass"), {"dropout": 1.0}),
    ((8, 1, "regression"), {"target_std": 0.0}),
])
def test_bad_arguments_are_config_errors(args: tuple, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        MLPHead(*args, **kwargs)
