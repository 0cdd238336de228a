"""Fixtures for the alignment tests: MiniLM once per session, a tiny real encoder."""

from __future__ import annotations

import copy

import pytest

from fedmri.config import load_config
from fedmri.text import TextTower, load_text_tower


@pytest.fixture(scope="session")
def minilm(request: pytest.FixtureRequest) -> TextTower:
    """The frozen packaged MiniLM; shared with other test folders through the session.

    Tests that change it (trainable layers, weights) must work on a deepcopy.
    """
    tower = getattr(request.session, "fedmri_minilm", None)
    if tower is None:
        tower = load_text_tower("minilm")
        request.session.fedmri_minilm = tower
    return tower


@pytest.fixture
def tower_copy(minilm: TextTower) -> TextTower:
    """A private copy of MiniLM that a test may unfreeze or train."""
    return copy.deepcopy(minilm)


@pytest.fixture
def tiny_cfg():
    """The tiny preset shrunk to 32^3 inputs so that a forward pass costs milliseconds."""
    return load_config("tiny", overrides=["model.img_size=[32,32,32]", "model.depth=2", "model.embed_dim=48",
                                          "model.num_heads=2", "align.embed_dim=32"])


