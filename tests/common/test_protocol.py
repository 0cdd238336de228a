"""The request schema is written once: what the coordinator sends is what the site parses back."""

from __future__ import annotations

import dataclasses

import pytest
from flwr.app import ConfigRecord, RecordDict

from fedmri import stages
from fedmri.protocol import (
    MAX_TOP_K,
    SEARCH_KEY,
    RequestError,
    SearchQuery,
    TrainRequest,
    parse_search_reply,
    search_reply,
    wire_key,
)

BASE = {"round": 2, "server_round": 5, "seed": 7, "run_name": "r", "fedmri_config": "model: {}"}


@pytest.mark.parametrize("extra", [
    {"stage": "pretrain", "local_steps": 3, "lr": 1e-3, "weight_decay": 0.04, "teacher_momentum": 0.99,
     "teacher_temp": 0.04, "dp": True, "dp_noise_multiplier": 1.1, "site_dp": "local",
     "site_dp_noise_multiplier": 0.5, "site_dp_clip_norm": 2.0, "stage_rounds": 4},
    {"stage": "align", "local_steps": 1, "lr": 1e-4, "weight_decay": 0.1, "proximal_mu": 0.5},
    {"stage": "heads", "local_steps": 1, "lr": 1e-3, "weight_decay": 0.0, "dp": True, "dp_target_epsilon": 8.0},
    {"stage": "evaluate", "split": "test", "evaluate_heads": True, "evaluate_aligned": False},
])
def test_every_stage_round_trips_through_the_wire(extra: dict) -> None:
    request = TrainRequest(**BASE, **extra)
    config = request.to_config()
    assert all("_" not in key for key in config)  # kebab-case on the wire
    assert TrainRequest.from_config(config) == request


def test_a_stage_needs_its_own_hyperparameters() -> None:
    config = TrainRequest(**BASE, stage="align", local_steps=1, lr=0.1, weight_decay=0.0).to_config()
    for key in map(wire_key, stages.get("align").hyperparameters):
        missing = {k: v for k, v in config.items() if k != key}
        with pytest.raises(RequestError, match=f"lacks '{key}'"):
            TrainRequest.from_config(missing)


def test_the_coordinator_cannot_send_what_a_site_would_refuse() -> None:
    bad = TrainRequest(**BASE, stage="evaluate", dp=True, dp_noise_multiplier=1.0)
    with pytest.raises(RequestError, match="dp is for training stages"):
        bad.to_config()
    with pytest.raises(RequestError, match="'proximal_mu' is not a request key"):
        TrainRequest.fields_from_config({"proximal_mu": 0.1})
    assert TrainRequest.fields_from_config({"proximal-mu": 0.1}) == {"proximal_mu": 0.1}


def test_wire_keys_are_the_field_names_in_kebab_case() -> None:
    assert [wire_key(f.name) for f in dataclasses.fields(TrainRequest)][:3] == ["stage", "round", "server-round"]


def test_a_search_query_round_trips_and_is_checked_on_both_sides() -> None:
    query = SearchQuery(top_k=5, fedmri_config="model: {}", split="val")
    config = query.to_config()
    assert config["task"] == "search" and config["top-k"] == 5
    assert SearchQuery.from_config(config) == query
    for bad in (SearchQuery(top_k=0, fedmri_config=""), SearchQuery(top_k=MAX_TOP_K + 1, fedmri_config=""),
                SearchQuery(top_k=True, fedmri_config=""), SearchQuery(top_k=3, fedmri_config="", split="holdout")):
        with pytest.raises(RequestError):
            bad.to_config()  # the coordinator cannot send it
    with pytest.raises(RequestError, match="task 'train' is not 'search'"):
        SearchQuery.from_config({**config, "task": "train"})
    with pytest.raises(RequestError, match="protocol 99"):
        SearchQuery.from_config({**config, "protocol-version": 99})


def _reply(record: dict) -> RecordDict:
    return RecordDict({SEARCH_KEY: ConfigRecord(record)})


def test_a_search_reply_is_ids_and_cosines_and_nothing_else() -> None:
    assert parse_search_reply(_reply(search_reply(["a", "b"], [0.5, -0.25])), top_k=2) == (["a", "b"], [0.5, -0.25])
    for record, problem in [
        (search_reply(["a", "b", "c"], [0.1, 0.2, 0.3]), "top-k 2"),
        (search_reply(["a", "a"], [0.1, 0.2]), "distinct"),
        (search_reply(["a"], [1.5]), "cosine"),
        ({**search_reply(["a"], [0.1]), "patient": "x"}, "search keys"),
    ]:
        with pytest.raises(RequestError, match=problem):
            parse_search_reply(_reply(record), top_k=2)
    extra = _reply(search_reply(["a"], [0.1]))
    extra["metrics"] = ConfigRecord({"n": 1})
    with pytest.raises(RequestError, match="instead of one 'search'"):
        parse_search_reply(extra, top_k=2)
