"""A new stage is a registry entry and a trainer function: it runs through the pipeline with nothing else changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fedmri import stages, wire
from fedmri.errors import ConfigError
from fedmri.server.config import load_federation
from fedmri.server.pipeline import Pipeline

from helpers.local_grid import LocalGrid


def nudge(site_cfg, run_cfg, state, request, *, privacy=None):
    """The toy stage's trainer: move the temperature by the round's step, report the site's name length."""
    up = {k: v + request.lr * request.local_steps for k, v in state.items()}
    return up, {"num-examples": 1.0, "name-length": float(len(site_cfg.name))}


TOY = stages.StageSpec(
    "nudge", lambda cfg: wire.StageGroups(down=(wire.LOGIT_SCALE,), up=(wire.LOGIT_SCALE,)),
    f"{__name__}:nudge", hyperparameters=("lr",), round_values=lambda r: {"lr": 0.25 * r.fraction})


def test_a_toy_stage_runs_through_the_pipeline(tmp_path: Path, federation_sites: list) -> None:
    with stages.registered(TOY):
        body = {"name": "toy", "preset": "micro", "min_sites": 2, "export": False,
                "run_root": str(tmp_path / "runs"), "wait_for_sites_s": 5,
                "stages": [{"name": "nudge", "rounds": 2, "local_steps": 2}]}
        fed = load_federation(text=OmegaConf.to_yaml(OmegaConf.create(body)))
        grid = LocalGrid({101 + i: site_file for i, (_, site_file, _) in enumerate(federation_sites)})
        pipeline = Pipeline(fed)
        pipeline.run_all(grid)

    initial = wire.initial_state(pipeline.cfg)
    key = next(k for k in initial if wire.group_of(k) == wire.LOGIT_SCALE)
    # Rounds at the schedule's middle: lr 0.25 * 0.25 then 0.25 * 0.75, two local steps each.
    assert torch.allclose(pipeline.state[key], initial[key] + 2 * 0.25 * (0.25 + 0.75))
    assert all(torch.equal(pipeline.state[k], v) for k, v in initial.items() if k != key)
    assert {m.metadata.message_type for m in grid.sent if m.content.config_records} >= {"train"}
    rows = [json.loads(line) for line in (tmp_path / "runs" / "toy" / "metrics.jsonl").read_text().splitlines()]
    assert [r["name-length"] for r in rows if r["site"] == "all"] == [7.0, 7.0]  # "site-0N", averaged
    assert "nudge" not in stages.names()  # gone with the block


def test_an_unregistered_stage_is_refused_by_the_federation_check() -> None:
    body = {"stages": [{"name": "nudge", "rounds": 1, "local_steps": 1}]}
    with pytest.raises(ConfigError, match="'nudge' is not one of pretrain, align, heads, evaluate"):
        load_federation(text=OmegaConf.to_yaml(OmegaConf.create(body)))


def test_every_registered_stage_names_a_trainer_that_imports() -> None:
    for name in stages.names():
        spec = stages.get(name)
        module, _, function = spec.trainer.partition(":")
        assert callable(getattr(__import__(module, fromlist=[function]), function)), name
        assert spec.message_type == ("train" if spec.trains else "evaluate")
