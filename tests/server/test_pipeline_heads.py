"""The heads stage in the coordinator's pipeline over the real ClientApp: only head weights travel up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fedmri import wire
from fedmri.server.config import load_federation
from fedmri.server.pipeline import Pipeline

from helpers.local_grid import LocalGrid

# The micro preset's encoder, with narrower heads than its 256.
OVERRIDES = ["heads.hidden_dim=32"]


@pytest.mark.slow
def test_heads_stage_tunes_only_the_heads_and_evaluate_scores_them(tmp_path: Path, federation_sites: list) -> None:
    body = {"name": "heads", "preset": "micro", "overrides": OVERRIDES, "min_sites": 2,
            "run_root": str(tmp_path / "runs"), "export": False, "wait_for_sites_s": 5,
            "stages": [{"name": "heads", "rounds": 2, "local_steps": 5}, {"name": "evaluate"}]}
    fed = load_federation(text=OmegaConf.to_yaml(OmegaConf.create(body)))
    grid = LocalGrid({101 + i: site_file for i, (_, site_file, _) in enumerate(federation_sites)})
    pipeline = Pipeline(fed)
    results = pipeline.run_all(grid)
    initial = wire.initial_state(pipeline.cfg)

    heads = [k for k in initial if k.startswith(wire.HEAD_PREFIX)]
    assert heads and any(not torch.equal(initial[k], pipeline.state[k]) for k in heads)
    assert all(torch.equal(initial[k], pipeline.state[k]) for k in initial if k not in heads)  # encoder frozen
    for reply in grid.received:
        if reply.metadata.message_type == "train":
            up = wire.groups_in(wire.from_record(reply.content["arrays"]))
            assert set(up) == set(wire.head_groups(pipeline.cfg))

    rows = [json.loads(line) for line in (tmp_path / "runs" / "heads" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["stage"] == "heads" and r["site"] == "all"]
    assert len(losses) == 2 and losses[1] < losses[0]
    evaluation = results["evaluation"]
    assert 0.0 <= evaluation["sequence_accuracy"] <= 1.0 and evaluation["age_mae"] >= 0.0
    assert evaluation["heads-examples"] > 0

    # The export carries the tuned heads and their scores; they load from the folder alone.
    from fedmri.heads.export import load_heads

    folder = pipeline.export(tmp_path / "export")
    card = json.loads((folder / "config.json").read_text())["extra"]["heads"]
    assert set(card["tasks"]) == set(pipeline.cfg.heads.tasks)
    assert card["tasks"]["sequence"]["metrics"]["accuracy"] == pytest.approx(evaluation["sequence_accuracy"])
    assert card["tasks"]["sequence"]["classes"] and card["tasks"]["age"]["kind"] == "regression"
    heads = load_heads(folder)
    for key, value in wire.select(pipeline.state, wire.head_groups(pipeline.cfg)).items():
        task, name = key[len(wire.HEAD_PREFIX):].split(wire.SEP, 1)
        assert torch.equal(heads[task].state_dict()[name], value), key
