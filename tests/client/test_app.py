"""The ClientApp called in-process with Message objects (no Ray, no SuperLink): versions, rounds, declines."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from helpers import identity

import fedmri
from fedmri.client.app import app
from fedmri.client.trainers import parse_run_config
from fedmri.protocol import PROTOCOL_VERSION
from fedmri.wire import from_record, select, stage_groups, to_record


@pytest.fixture(autouse=True)
def server_identity() -> Iterator[None]:
    """What Flower's ServerApp runtime sets before a ServerApp creates messages."""
    with identity.server_identity():
        yield


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def _message(message_type: str) -> Message:
    return Message(RecordDict({"cfg": ConfigRecord({"stage": "hello"})}), dst_node_id=7, message_type=message_type)


def test_query_reply_carries_versions_and_nothing_else() -> None:
    reply = app(_message(MessageType.QUERY), _context())
    assert reply.has_content()
    assert list(reply.content.keys()) == ["versions"]
    assert dict(reply.content["versions"]) == {"fedmri_version": fedmri.__version__,
                                               "protocol_version": PROTOCOL_VERSION}




def test_query_names_the_site_when_it_has_a_site_file(site_file) -> None:
    reply = app(_message(MessageType.QUERY), _site_context(site_file))
    assert dict(reply.content["versions"])["site_name"] == "site-a"


# --- train and evaluate -------------------------------------------------------

def _site_context(site_file: Path) -> Context:
    return Context(run_id=1, node_id=7, node_config={"site-config": str(site_file)}, state=RecordDict(),
                   run_config={})


def _round(values: dict, state: dict, message_type: str | None = None) -> Message:
    run_cfg = parse_run_config(values["fedmri-config"])
    down = select(state, stage_groups(values["stage"], run_cfg).down)
    kind = message_type or (MessageType.EVALUATE if values["stage"] == "evaluate" else MessageType.TRAIN)
    return Message(RecordDict({"arrays": to_record(down), "config": ConfigRecord(values)}), dst_node_id=7,
                   message_type=kind)


def _assert_only_numbers_and_weights(reply: Message) -> None:
    """Nothing but float32 arrays and int/float metrics leaves the site (no strings, no lists)."""
    for name, record in reply.content.items():
        if isinstance(record, ArrayRecord):
            assert name == "arrays"
            assert all(a.dtype == "float32" for a in record.values())
        else:
            assert isinstance(record, MetricRecord) and name == "metrics", name
            assert all(type(v) in (int, float) for v in record.values()), dict(record)


def _declined(reply: Message) -> str:
    assert set(reply.content.keys()) == {"metrics", "status"}
    assert dict(reply.content["metrics"]) == {"num-examples": 0, "declined": 1}
    status = dict(reply.content["status"])
    assert set(status) == {"declined", "reason"} and status["declined"] is True
    assert "\n" not in status["reason"]
    return status["reason"]


def test_train_replies_with_the_up_groups_and_numeric_metrics(site_file, initial, request_values,
                                                              one_thread) -> None:
    values = request_values("pretrain", local_steps=2)
    reply = app(_round(values, initial), _site_context(site_file))
    assert not reply.has_error() and set(reply.content.keys()) == {"arrays", "metrics"}
    _assert_only_numbers_and_weights(reply)
    up = from_record(reply.content["arrays"])
    assert list(up) == list(select(initial, stage_groups("pretrain", parse_run_config(values["fedmri-config"])).up))
    metrics = dict(reply.content["metrics"])
    assert metrics["num-examples"] == 8 and metrics["steps"] == 2
    assert {"dino_loss", "ibot_loss", "koleo_loss", "loss"} <= set(metrics)
    assert {"wall-time-s", "bytes-received", "bytes-sent"} <= set(metrics)
    assert 0 < metrics["bytes-sent"] < metrics["bytes-received"]  # the teacher does not come back


def test_evaluate_replies_with_metrics_only(site_file, initial, request_values, one_thread) -> None:
    reply = app(_round(request_values("evaluate"), initial), _site_context(site_file))
    assert list(reply.content.keys()) == ["metrics"]
    _assert_only_numbers_and_weights(reply)
    metrics = dict(reply.content["metrics"])
    assert metrics["num-examples"] == 2 and metrics["bytes-sent"] == 0
    assert {"val_loss", "i2t_r1", "t2i_medr"} <= set(metrics)


def test_simulated_sites_come_from_the_local_map(site_file, initial, request_values, tmp_path, monkeypatch,
                                                 one_thread) -> None:
    mapping = tmp_path / "sites.json"
    mapping.write_text(json.dumps({"3": str(site_file)}))
    monkeypatch.setenv("FEDMRI_SIM_SITES", str(mapping))
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 3, "num-partitions": 4},
                      state=RecordDict(), run_config={})
    reply = app(_round(request_values("evaluate"), initial), context)
    assert dict(reply.content["metrics"])["num-examples"] == 2
    context.node_config["partition-id"] = 1
    assert "partition 1 has no site file" in _declined(app(_round(request_values("evaluate"), initial), context))
    monkeypatch.delenv("FEDMRI_SIM_SITES")
    assert "no 'site-config'" in _declined(app(_round(request_values("evaluate"), initial), context))


@pytest.mark.parametrize(("change", "reason"), [
    ({"local_steps": 21}, "local-steps 21 exceeds this site's policy.max_local_steps 20"),
    ({"lr": "fast"}, "config key 'lr' must be float, got str"),
])
def test_requests_against_the_policy_or_protocol_are_declined(site_file, initial, request_values, change,
                                                              reason) -> None:
    reply = app(_round(request_values("pretrain", **change), initial), _site_context(site_file))
    assert _declined(reply) == reason


def test_weights_of_the_wrong_groups_are_declined(site_file, initial, request_values) -> None:
    values = request_values("pretrain")
    message = _round(values, initial)
    message.content["arrays"] = to_record(select(initial, ["encoder"]))
    assert _declined(app(message, _site_context(site_file))).startswith("pretrain expects groups")


def test_a_stage_in_the_wrong_message_type_is_declined(site_file, initial, request_values) -> None:
    message = _round(request_values("evaluate"), initial, MessageType.TRAIN)
    assert _declined(app(message, _site_context(site_file))) == "stage 'evaluate' came as a 'train' message"


def test_a_trainer_crash_is_declined_without_its_message(site_file, initial, request_values, monkeypatch,
                                                         caplog) -> None:
    from fedmri.client.trainers import pretrain

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cache entry /data/site/PAT0001/series.npz is missing")

    monkeypatch.setattr(pretrain, "run_pretrain", crash)  # where the stage registry finds it
    reply = app(_round(request_values("pretrain"), initial), _site_context(site_file))
    reason = _declined(reply)
    assert reason == "pretrain failed at the site (RuntimeError); the site's log has the details"
    assert "PAT0001" in caplog.text  # the traceback stays in the site's own log
