"""Checkpoints: the newest ``keep`` rounds stay, LATEST names the last, and keep < 1 is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedmri.errors import ConfigError
from fedmri.server.checkpoint import load_checkpoint, save_checkpoint
from fedmri.server.config import load_federation


@pytest.mark.parametrize("keep", [1, 3])
def test_only_the_newest_rounds_are_kept(tmp_path: Path, keep: int) -> None:
    for r in range(1, 6):
        save_checkpoint(tmp_path, r, {"encoder/w": torch.full((2,), float(r))}, {}, {"round": r}, keep=keep)
    assert sorted(p.name for p in tmp_path.glob("round-*")) == [f"round-{r:04d}" for r in range(6 - keep, 6)]
    state, _, meta = load_checkpoint(tmp_path)
    assert meta["round"] == 5 and torch.equal(state["encoder/w"], torch.full((2,), 5.0))
    with pytest.raises(ValueError, match="keep must be >= 1"):
        save_checkpoint(tmp_path, 6, {}, {}, {}, keep=0)


@pytest.mark.parametrize(("key", "value", "message"), [("keep_checkpoints", 0, "keep_checkpoints must be >= 1"),
                                                        ("update_memory_mb", -1, "update_memory_mb must be >= 0")])
def test_the_federation_refuses_settings_that_cannot_work(key: str, value: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_federation(text=f"preset: micro\n{key}: {value}\n")
