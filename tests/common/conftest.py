"""Fixtures shared by the model-side tests (text, align, export)."""

from __future__ import annotations

import pytest

from fedmri.text import TextTower, load_text_tower


@pytest.fixture(scope="session")
def minilm() -> TextTower:
    """The frozen packaged MiniLM, loaded once per session.

    Tests that change it (trainable layers, weights) must work on a deepcopy.
    """
    return load_text_tower("minilm")
