"""Fixtures for the text tests: the packaged MiniLM, loaded once per session."""

from __future__ import annotations

import pytest

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
