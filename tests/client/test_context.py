"""Request parsing, the run config from the wire, seeds and batch draws."""

from __future__ import annotations

import numpy as np
import pytest

from fedmri.client.trainers import RequestError, TrainRequest, derive_seed, parse_run_config, round_seed
from fedmri.client.trainers.batches import balanced_batches


def test_a_pretrain_request_parses_into_typed_fields(request_values) -> None:
    req = TrainRequest.from_config(request_values("pretrain", lr=1, proximal_mu=0.5))
    assert req.stage == "pretrain" and req.local_steps == 4 and req.round == 1
    assert isinstance(req.lr, float) and req.lr == 1.0  # an int on the wire is a float here
    assert req.proximal_mu == 0.5 and req.split == "val"


def test_evaluate_needs_no_steps_or_rates(request_values) -> None:
    req = TrainRequest.from_config(request_values("evaluate", split="test"))
    assert req.local_steps == 0 and req.lr is None and req.split == "test"


@pytest.mark.parametrize(("change", "match"), [
    ({"stage": "segment"}, "unknown stage 'segment'"),
    ({"lr": None}, "lacks 'lr'"),
    ({"teacher-temp": None}, "lacks 'teacher-temp'"),
    ({"local-steps": 2.5}, "'local-steps' must be int"),
    ({"local-steps": True}, "'local-steps' must be int"),
    ({"local-steps": 0}, "local-steps 0 must be >= 1"),
    ({"round": 0}, "must be >= 1"),
    ({"lr": -1.0}, "lr -1.0 must be >= 0"),
    ({"teacher-momentum": 1.5}, "teacher-momentum 1.5 must be in"),
    ({"teacher-temp": 0.0}, "teacher-temp 0.0 must be > 0"),
    ({"proximal-mu": -0.1}, "proximal-mu -0.1 must be >= 0"),
    ({"split": "all"}, "split 'all'"),
    ({"protocol-version": 99}, "the server speaks protocol 99"),
])
def test_bad_requests_say_what_is_wrong(request_values, change: dict, match: str) -> None:
    values = request_values("pretrain")
    for key, value in change.items():
        if value is None:
            values.pop(key)
        else:
            values[key] = value
    with pytest.raises(RequestError, match=match):
        TrainRequest.from_config(values)


def test_run_config_from_the_wire_is_checked_against_the_schema(run_yaml) -> None:
    cfg = parse_run_config(run_yaml)
    assert cfg.model.embed_dim == 32
    with pytest.raises(Exception):
        cfg.model.embed_dim = 8  # read-only: a trainer cannot change the run's config
    with pytest.raises(RequestError, match="same fedmri release"):
        parse_run_config(run_yaml + "federation:\n  rounds: 3\n")
    with pytest.raises(RequestError, match="same fedmri release"):
        parse_run_config(run_yaml.replace("depth: 2", "depth: two"))
    with pytest.raises(RequestError, match="not valid YAML"):
        parse_run_config("model: [")


def test_seeds_are_fixed_functions_of_run_stage_round_and_site(request_values) -> None:
    assert derive_seed(0, "pretrain", 1, "site-a") == 8_010_827_430_416_818_649  # pinned: a change breaks reruns
    req = TrainRequest.from_config(request_values("pretrain"))
    assert round_seed(req, "site-a") == derive_seed(0, "pretrain", 1, "site-a")
    later = TrainRequest.from_config(request_values("pretrain", round=2))
    assert len({round_seed(req, "site-a"), round_seed(req, "site-b"), round_seed(later, "site-a")}) == 3


@pytest.mark.parametrize(("n", "batch", "steps"), [(8, 4, 7), (5, 3, 9), (4, 4, 3), (3, 1, 5)])
def test_balanced_batches_cycle_epochs_without_repeats_in_a_batch(n: int, batch: int, steps: int) -> None:
    batches = balanced_batches(n, batch, steps, np.random.default_rng(0))
    assert len(batches) == steps and all(len(set(b)) == batch for b in batches)
    counts = np.bincount([i for b in batches for i in b], minlength=n)
    assert counts.max() - counts.min() <= 1  # every item equally often, up to the last partial epoch
    with pytest.raises(ValueError, match="must be in"):
        balanced_batches(n, n + 1, steps, np.random.default_rng(0))
