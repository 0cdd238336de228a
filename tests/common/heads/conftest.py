"""Fixtures for the head tests: a tiny real encoder and single-threaded torch."""

from __future__ import annotations


import pytest
import torch

from fedmri.config import load_config
from fedmri.models import ViT3D, build_encoder


@pytest.fixture
def cfg():
    """Tiny preset at 32^3 (a 2x2x2 patch grid), 4 blocks so UNETR has distinct skips."""
    return load_config("tiny", overrides=["model.img_size=[32,32,32]", "model.depth=4", "model.embed_dim=48",
                                          "model.num_heads=2", "heads.seg_feature_size=8", "heads.hidden_dim=32"])


@pytest.fixture
def encoder(cfg) -> ViT3D:
    torch.manual_seed(0)
    return build_encoder(cfg).eval().requires_grad_(False)


@pytest.fixture(autouse=True)
def _on_one_thread(one_thread: None) -> None:
    """Every head test runs on one thread (the `one_thread` fixture of tests/conftest.py)."""


def blob_volumes(n: int, seed: int, side: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Volumes (n, 1, S, S, S) with one bright ball each, and their radii (n,)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(side).float()] * 3, indexing="ij"))  # 3, S, S, S
    centres = side / 2 + (torch.rand(n, 3, generator=g) - 0.5) * side / 2  # n, 3
    radii = 2 + 6 * torch.rand(n, generator=g)  # n
    dist = ((grid[None] - centres[:, :, None, None, None]) ** 2).sum(1).sqrt()  # n, S, S, S
    balls = (dist < radii[:, None, None, None]).float()
    return (0.8 * balls + 0.05 * torch.randn(n, side, side, side, generator=g)).unsqueeze(1), radii
