"""Fixtures for the alignment tests: a private MiniLM copy, a tiny real encoder."""

from __future__ import annotations

import copy

import pytest

from fedmri.config import load_config
from fedmri.text import TextTower


@pytest.fixture
def tower_copy(minilm: TextTower) -> TextTower:
    """A private copy of MiniLM that a test may unfreeze or train."""
    return copy.deepcopy(minilm)


@pytest.fixture
def tiny_cfg():
    """The tiny preset shrunk to 32^3 inputs so that a forward pass costs milliseconds."""
    return load_config("tiny", overrides=["model.img_size=[32,32,32]", "model.depth=2", "model.embed_dim=48",
                                          "model.num_heads=2", "align.embed_dim=32"])


