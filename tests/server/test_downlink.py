"""Sending each site only the groups it lacks (server/downlink.py): messages, resends, and a whole run."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from omegaconf import OmegaConf

from fedmri import wire
from fedmri.client.group_cache import CACHE_FOLDER
from fedmri.client.replies import decline
from fedmri.protocol import DIGESTS_KEY, MISSING_GROUPS, REBUILD_KEY, STATUS_KEY
from fedmri.server.config import load_federation
from fedmri.server.downlink import MAX_MISSES, Downlink
from fedmri.server.pipeline import Pipeline

from helpers.local_grid import LocalGrid

ENC, HEAD = "encoder", "head.sex"


def _state(seed: int = 0, head_seed: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.Generator().manual_seed(seed if head_seed is None else head_seed)
    return {f"{ENC}/w": torch.randn(64, 64, generator=g), f"{ENC}/b": torch.randn(64, generator=g),
            f"{HEAD}/w": torch.randn(2, 64, generator=h)}


def _start(downlink: Downlink, state: dict, nodes: list[int] = [1, 2]):  # noqa: B006 -- read only
    return downlink.start(state, [ENC, HEAD], ConfigRecord({"stage": "heads"}), MessageType.TRAIN, nodes,
                          lambda n: f"site-{n}")


def _groups(msg: Message) -> set[str]:
    return set(wire.groups_in(wire.from_record(msg.content["arrays"])))


def _ok(msg: Message) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)


def _missing(msg: Message, groups: list[str]) -> Message:
    reply = decline(msg, "the site's cache lacks them")
    reply.content[STATUS_KEY][MISSING_GROUPS] = groups
    return reply


def _bytes(state: dict, groups: set[str]) -> int:
    return sum(4 * t.numel() for k, t in state.items() if wire.group_of(k) in groups)


def test_the_first_round_sends_every_group_and_names_each_by_its_digest() -> None:
    state = _state()
    round_ = _start(Downlink(), state)
    assert [int(m.metadata.dst_node_id) for m in round_.messages] == [1, 2]
    for msg in round_.messages:
        assert _groups(msg) == {ENC, HEAD}
        assert dict(msg.content[DIGESTS_KEY]) == wire.group_digests(state)
    assert round_.bytes_sent == {1: _bytes(state, {ENC, HEAD}), 2: _bytes(state, {ENC, HEAD})}


def test_an_acknowledged_group_is_named_but_not_sent_again() -> None:
    downlink, state = Downlink(), _state()
    first = _start(downlink, state)
    assert first.on_reply(_ok(first.messages[0])) is None  # site-1 answered; site-2 did not
    changed = _state(head_seed=1)  # the heads moved, the encoder did not
    again = _start(downlink, changed)
    to_1, to_2 = again.messages
    assert _groups(to_1) == {HEAD} and _groups(to_2) == {ENC, HEAD}
    assert dict(to_1.content[DIGESTS_KEY]) == wire.group_digests(changed)
    assert again.bytes_sent == {1: _bytes(changed, {HEAD}), 2: _bytes(changed, {ENC, HEAD})}


@pytest.mark.parametrize("answer", [lambda m: decline(m, "over budget"),
                                    lambda m: Message(Error(code=0, reason="node unavailable"), reply_to=m)])
def test_a_decline_or_an_error_acknowledges_nothing(answer: Callable[[Message], Message]) -> None:
    downlink, state = Downlink(), _state()
    first = _start(downlink, state, [1])
    assert first.on_reply(answer(first.messages[0])) is None
    assert _groups(_start(downlink, state, [1]).messages[0]) == {ENC, HEAD}


def test_a_site_that_lacks_a_group_gets_every_group_again_in_the_same_round() -> None:
    downlink, state = Downlink(), _state()
    first = _start(downlink, state, [1])
    first.on_reply(_ok(first.messages[0]))
    second = _start(downlink, _state(head_seed=1), [1])
    resend = second.on_reply(_missing(second.messages[0], [ENC]))
    assert resend is not None and int(resend.metadata.dst_node_id) == 1
    assert _groups(resend) == {ENC, HEAD} and dict(resend.content["config"]) == {"stage": "heads"}
    assert second.sent == [second.messages[0], resend]
    assert second.bytes_sent == {1: _bytes(state, {HEAD}) + _bytes(state, {ENC, HEAD})}
    assert downlink.held == {}  # forgotten until the site answers again
    assert second.on_reply(_missing(resend, [ENC])) is None  # a full message cannot be helped: a decline
    second.on_reply(_ok(resend))
    assert downlink.held == {"site-1": wire.group_digests(_state(head_seed=1))}


def test_a_site_that_keeps_missing_gets_every_group_from_then_on() -> None:
    downlink, state = Downlink(), _state()
    for _ in range(MAX_MISSES):
        round_ = _start(downlink, state, [1])
        round_.on_reply(_ok(round_.messages[-1]))
        round_ = _start(downlink, state, [1])
        assert _groups(round_.messages[0]) == set()  # nothing changed: digests only
        round_.on_reply(_ok(round_.on_reply(_missing(round_.messages[0], [ENC]))))
    assert _groups(_start(downlink, state, [1]).messages[0]) == {ENC, HEAD}


def test_off_it_sends_every_group_and_names_no_digests() -> None:
    downlink, state = Downlink(enabled=False), _state()
    first = _start(downlink, state)
    first.on_reply(_ok(first.messages[0]))
    again = _start(downlink, state)
    for msg in again.messages:
        assert _groups(msg) == {ENC, HEAD} and DIGESTS_KEY not in msg.content
    assert again.on_reply(_missing(again.messages[0], [ENC])) is None


class _Sites:
    """A grid of sites that keep what they were sent in memory; ``wiped`` lost theirs."""

    def __init__(self, wiped: set[int]) -> None:
        self.held: dict[int, dict[str, str]] = {}
        self.wiped = wiped
        self.pending: dict[str, Message] = {}
        self.delivered: list[Message] = []

    def answer(self, msg: Message) -> Message:
        self.delivered.append(msg)
        node = int(msg.metadata.dst_node_id)
        if node in self.wiped:
            self.held.pop(node, None)
            self.wiped.discard(node)
        held = self.held.setdefault(node, {})
        digests = dict(msg.content[DIGESTS_KEY])
        lacks = [g for g, d in digests.items() if g not in _groups(msg) and held.get(g) != d]
        if lacks:
            return _missing(msg, lacks)
        held.update(digests)
        return _ok(msg)

    def push_messages(self, messages: list[Message]) -> list[str]:
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's grids do
            self.pending[msg.metadata.message_id] = msg
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids: list[str]) -> list[Message]:
        return [self.answer(self.pending.pop(i)) for i in ids if i in self.pending]

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        return [self.answer(m) for m in messages]


def _acknowledged_round(downlink: Downlink, sites: _Sites, state: dict) -> None:
    round_ = _start(downlink, state)
    for reply in sites.send_and_receive(round_.messages):
        assert round_.on_reply(reply) is None


def test_the_bound_grid_pulls_the_resends_answer_as_the_reply_to_the_first_message() -> None:
    downlink, sites, state = Downlink(), _Sites(wiped={2}), _state()
    _acknowledged_round(downlink, sites, state)
    sites.wiped.add(2)
    round_ = _start(downlink, state)
    grid = round_.bound(sites)
    pending = set(grid.push_messages(round_.messages))
    first_ids = set(pending)
    answers = []
    for _ in range(4):  # a receive loop as the pipeline's: pull what is pending, drop what is answered
        replies = grid.pull_messages(sorted(pending))
        pending -= {r.metadata.reply_to_message_id for r in replies}
        answers += replies
    assert not pending and {r.metadata.reply_to_message_id for r in answers} == first_ids
    assert sorted(int(r.metadata.src_node_id) for r in answers) == [1, 2]
    assert all(STATUS_KEY not in r.content for r in answers)
    assert sorted(int(m.metadata.dst_node_id) for m in sites.delivered[-3:-1]) == [1, 2]
    assert int(sites.delivered[-1].metadata.dst_node_id) == 2
    assert _groups(sites.delivered[-1]) == {ENC, HEAD} and round_.bytes_sent[1] == 0
    assert downlink.held.keys() == {"site-1", "site-2"}


def test_the_bound_grid_resends_within_send_and_receive() -> None:
    downlink, sites, state = Downlink(), _Sites(wiped=set()), _state()
    _acknowledged_round(downlink, sites, state)
    sites.wiped.add(1)
    round_ = _start(downlink, state)
    replies = round_.bound(sites).send_and_receive(round_.messages, timeout=5.0)
    assert sorted(int(r.metadata.src_node_id) for r in replies) == [1, 2]
    assert all(STATUS_KEY not in r.content for r in replies)
    assert round_.bytes_sent == {1: _bytes(state, {ENC, HEAD}), 2: 0}


# --------------------------------------------------------------- a whole run, in process
OVERRIDES = ["heads.hidden_dim=32"]
STAGES = [{"name": "pretrain", "rounds": 2, "local_steps": 1}, {"name": "align", "rounds": 1, "local_steps": 1},
          {"name": "heads", "rounds": 2, "local_steps": 2}, {"name": "evaluate", "rounds": 2}]
WIPED = 103  # site-03's cache is deleted after the first heads round
WIPED_IN_PRETRAINING = 102  # site-02's after the first pretraining round


def _run(root: Path, sites: list, group_cache: bool, after: Callable | None = None) -> tuple[Pipeline, LocalGrid]:
    body = {"name": f"cache-{group_cache}", "preset": "micro", "overrides": OVERRIDES, "min_sites": 2,
            "run_root": str(root), "stages": STAGES, "export": False, "wait_for_sites_s": 5,
            "group_cache": group_cache}
    pipeline = Pipeline(load_federation(text=OmegaConf.to_yaml(OmegaConf.create(body))), on_round_end=after)
    grid = LocalGrid({101 + i: site_file for i, (_, site_file, _) in enumerate(sites)})
    pipeline.run_all(grid)
    return pipeline, grid


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, federation_sites: list, module_server_identity: None) -> dict:
    root = tmp_path_factory.mktemp("downlink")
    wiped_catalog = federation_sites[WIPED - 101][2]

    def wipe(outcome) -> None:
        if (outcome.stage, outcome.round) == ("heads", 1):
            shutil.rmtree(wiped_catalog / CACHE_FOLDER)
        if (outcome.stage, outcome.round) == ("pretrain", 1):
            shutil.rmtree(federation_sites[WIPED_IN_PRETRAINING - 101][2] / CACHE_FOLDER)

    off, _ = _run(root, federation_sites, group_cache=False)
    on, grid = _run(root, federation_sites, group_cache=True, after=wipe)
    return {"off": off, "on": on, "grid": grid, "root": root}


def _outcome(pipeline: Pipeline, stage: str, rnd: int):
    return next(o for o in pipeline.outcomes if (o.stage, o.round) == (stage, rnd))


@pytest.mark.slow
def test_heads_and_evaluate_rounds_after_the_first_send_no_encoder(runs: dict) -> None:
    on, off = runs["on"], runs["off"]
    state = on.state
    encoder = _bytes(state, {ENC})
    heads = _bytes(state, set(wire.head_groups(on.cfg)))
    for node in (101, 102):
        assert _outcome(on, "heads", 1).sent_to(node) == encoder + heads  # align moved the encoder
        assert _outcome(on, "heads", 2).sent_to(node) - heads <= 0.01 * encoder
        assert _outcome(on, "evaluate", 2).sent_to(node) <= 0.01 * encoder
    assert _outcome(off, "heads", 2).sent_to(101) == encoder + heads
    for msg in runs["grid"].sent:
        stage = msg.content.config_records["config"].get("stage") if "config" in msg.content else None
        if stage in ("heads", "evaluate") and msg.content.config_records["config"]["round"] == 2 \
                and int(msg.metadata.dst_node_id) != WIPED:
            assert ENC not in _groups(msg)
    # Pretraining and alignment change every group they send: no digests, nothing cached. Heads
    # names only the frozen encoder, evaluation everything.
    for msg in runs["grid"].sent:
        stage = msg.content.config_records["config"].get("stage") if "config" in msg.content else None
        named = set(msg.content[DIGESTS_KEY]) if DIGESTS_KEY in msg.content else set()
        if stage == "pretrain":  # the teacher, rebuilt at the site; the student changes every round
            assert named == {wire.TEACHER, wire.TEACHER_HEAD}
        elif stage == "align":
            assert not named, stage
        elif stage == "heads":
            assert named == {ENC}
    # What the metrics say is what went: per site, and the round's sum.
    rows = [json.loads(line) for line in (runs["root"] / "cache-True" / "metrics.jsonl").read_text().splitlines()]
    heads_2 = [r for r in rows if r["stage"] == "heads" and r["round"] == 2]
    assert {r["site"]: r["bytes-down"] for r in heads_2 if r["site"] != "all"} == {
        on.site(n): _outcome(on, "heads", 2).sent_to(n) for n in (101, 102, 103)}
    assert next(r for r in heads_2 if r["site"] == "all")["bytes-down"] == sum(
        _outcome(on, "heads", 2).bytes_down_by_node.values())


@pytest.mark.slow
def test_pretraining_sends_the_student_and_the_sites_rebuild_the_teacher(runs: dict) -> None:
    on, off, grid = runs["on"], runs["off"], runs["grid"]
    student = _bytes(on.state, {wire.ENCODER, wire.DINO_HEAD, wire.CENTER})
    teacher = _bytes(on.state, {wire.TEACHER, wire.TEACHER_HEAD})
    for rnd in (1, 2):  # round 1: a copy of the student; round 2: the EMA of the teacher each site holds
        for node in (101, 103):
            assert _outcome(on, "pretrain", rnd).sent_to(node) == student
            assert _outcome(off, "pretrain", rnd).sent_to(node) == student + teacher
    first, second = ([m for m in grid.sent if "config" in m.content and m.content["config"]["stage"] == "pretrain"
                      and m.content["config"]["round"] == rnd][0] for rnd in (1, 2))
    assert first.content[REBUILD_KEY][wire.TEACHER] == ""  # a copy of the student
    assert second.content[REBUILD_KEY][wire.TEACHER] == first.content[DIGESTS_KEY][wire.TEACHER]
    assert 0.0 < second.content[REBUILD_KEY][f"{wire.TEACHER}.momentum"] < 1.0
    # Site-02 lost its cache after round 1: it cannot rebuild, is sent everything, and counts.
    second = _outcome(on, "pretrain", 2)
    assert WIPED_IN_PRETRAINING in second.accepted and not second.problems
    assert second.sent_to(WIPED_IN_PRETRAINING) == 2 * student + teacher


@pytest.mark.slow
def test_the_cache_changes_no_weight_and_no_score(runs: dict) -> None:
    on, off = runs["on"].state, runs["off"].state
    assert on.keys() == off.keys()
    assert all(torch.equal(on[k], off[k]) for k in on)
    clocks = {"wall-time-s", "overhead-s", "bytes-received", "bytes-down"}
    for a, b in zip(runs["on"].history, runs["off"].history, strict=True):
        assert {k: v for k, v in a["metrics"].items() if k not in clocks} == \
               {k: v for k, v in b["metrics"].items() if k not in clocks}


@pytest.mark.slow
def test_a_site_whose_cache_was_wiped_gets_every_group_and_counts(runs: dict) -> None:
    on, grid = runs["on"], runs["grid"]
    outcome = _outcome(on, "heads", 2)
    assert WIPED in outcome.accepted and not outcome.problems
    to_wiped = [m for m in grid.sent if int(m.metadata.dst_node_id) == WIPED and "config" in m.content
                and m.content["config"]["stage"] == "heads" and m.content["config"]["round"] == 2]
    assert [_groups(m) for m in to_wiped] == [set(wire.head_groups(on.cfg)), {ENC, *wire.head_groups(on.cfg)}]
    full = _bytes(on.state, {ENC, *wire.head_groups(on.cfg)})
    assert outcome.sent_to(WIPED) == outcome.sent_to(101) + full
    # The next rounds find the groups it was sent again in its cache.
    assert _outcome(on, "evaluate", 2).sent_to(WIPED) == _outcome(on, "evaluate", 2).sent_to(101)
