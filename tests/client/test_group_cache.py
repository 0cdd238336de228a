"""A site's cache of the groups it received (client/group_cache.py): digests, misses, and the ClientApp's use of it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from helpers import identity

from fedmri.client.app import app
from fedmri.client.group_cache import CACHE_FOLDER, GroupCache, MissingGroupsError, resolve_down
from fedmri.client.site import load_site
from fedmri.client.trainers import parse_run_config
from fedmri.protocol import DIGESTS_KEY, MISSING_GROUPS, RequestError
from fedmri.wire import group_digest, group_digests, select, stage_groups, teacher_is_copy, to_record, update_teacher

ENC, HEAD = "encoder", "head.sex"


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{ENC}/w": torch.randn(8, 8, generator=g), f"{ENC}/b": torch.randn(8, generator=g),
            f"{ENC}/scale": torch.tensor(2.0), f"{HEAD}/w": torch.randn(2, 8, generator=g)}


def _enc(state: dict) -> dict:
    return select(state, [ENC])


# ------------------------------------------------------------------------ digests
def test_a_digest_covers_every_key_shape_and_value_in_any_order() -> None:
    enc = _enc(_state())
    digest = group_digest(enc)
    assert digest == group_digest(dict(reversed(list(enc.items()))))
    assert digest == group_digest({k: v.double() for k, v in enc.items()})  # float32 on the wire
    changed = dict(enc)
    changed[f"{ENC}/b"] = enc[f"{ENC}/b"].clone()
    changed[f"{ENC}/b"][3] += 1e-6
    renamed = {k.replace("/b", "/bias"): v for k, v in enc.items()}
    reshaped = enc | {f"{ENC}/w": enc[f"{ENC}/w"].reshape(4, 16)}
    assert len({digest, group_digest(changed), group_digest(renamed), group_digest(reshaped)}) == 4
    assert group_digests(_state()) == {ENC: digest, HEAD: group_digest(select(_state(), [HEAD]))}


# -------------------------------------------------------------------------- cache
def test_a_group_comes_back_exactly_as_it_was_put(tmp_path: Path) -> None:
    cache, enc = GroupCache(tmp_path), _enc(_state())
    assert cache.get(ENC, group_digest(enc)) is None
    assert cache.put(ENC, group_digest(enc), enc)
    back = cache.get(ENC, group_digest(enc))
    assert back is not None and list(back) == list(enc)
    assert all(torch.equal(back[k], enc[k]) and back[k].dtype == torch.float32 for k in enc)


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "other-content"])
def test_a_damaged_entry_is_a_miss_and_is_dropped(tmp_path: Path, damage: str) -> None:
    cache, enc = GroupCache(tmp_path), _enc(_state())
    digest = group_digest(enc)
    cache.put(ENC, digest, enc)
    path = cache.path(ENC, digest)
    data = path.read_bytes()
    if damage == "flip":  # one bit of the last tensor's bytes: the file still reads
        path.write_bytes(data[:-3] + bytes([data[-3] ^ 1]) + data[-2:])
    elif damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a safetensors file")
    else:  # another version of the group under this digest's name
        other = _enc(_state(seed=1))
        cache.put(ENC, group_digest(other), other)
        shutil.copy(cache.path(ENC, group_digest(other)), path)
    assert cache.get(ENC, digest) is None
    assert not path.exists()


def test_the_newest_versions_of_a_group_are_kept(tmp_path: Path) -> None:
    cache = GroupCache(tmp_path, keep=2)
    versions = [_enc(_state(seed=i)) for i in range(4)]
    for i, enc in enumerate(versions):
        cache.put(ENC, group_digest(enc), enc)
        os.utime(cache.path(ENC, group_digest(enc)), (1000 + i, 1000 + i))
    kept = [cache.get(ENC, group_digest(enc)) is not None for enc in versions]
    assert kept == [False, False, True, True]


def test_a_disk_that_refuses_the_write_costs_the_cache_not_the_round(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    cache, enc = GroupCache(tmp_path / "file" / "groups"), _enc(_state())
    assert cache.put(ENC, group_digest(enc), enc) is False
    assert cache.get(ENC, group_digest(enc)) is None


@pytest.mark.parametrize(("group", "digest"), [("../etc", "a" * 64), (".hidden", "a" * 64), (ENC, "A" * 64),
                                               (ENC, "a" * 63), (ENC, "../" + "a" * 61)])
def test_names_that_are_no_group_or_digest_are_refused(tmp_path: Path, group: str, digest: str) -> None:
    with pytest.raises(RequestError, match="must be a group name and a SHA-256"):
        GroupCache(tmp_path).path(group, digest)
    with pytest.raises(ValueError, match="keep 0"):
        GroupCache(tmp_path, keep=0)


# -------------------------------------------------------------------- resolve_down
def test_received_groups_are_kept_and_left_out_ones_come_from_the_cache(tmp_path: Path) -> None:
    cache, state = GroupCache(tmp_path), _state()
    digests = group_digests(state)
    assert resolve_down(state, digests, [ENC, HEAD], cache) == state
    heads_only = select(state, [HEAD])
    resolved = resolve_down(heads_only, digests, [ENC, HEAD], cache)
    assert list(resolved) == list(state) and all(torch.equal(resolved[k], state[k]) for k in state)
    assert resolve_down(heads_only, None, [ENC, HEAD], cache) == heads_only  # no digests: as sent


def test_a_group_neither_sent_nor_cached_is_missing(tmp_path: Path) -> None:
    state = _state()
    with pytest.raises(MissingGroupsError, match="lacks encoder") as info:
        resolve_down(select(state, [HEAD]), group_digests(state), [ENC, HEAD], GroupCache(tmp_path))
    assert info.value.groups == [ENC]
    assert not (tmp_path / HEAD).exists()  # nothing kept from a request that could not run


@pytest.mark.parametrize(("change", "match"), [
    ("tampered", "does not match its digest"),
    ("other-groups", "names digests of"),
    ("foreign", "which the stage does not send"),
    ("neither", "neither carries nor names group 'encoder'"),
    ("not-a-string", "must be a string"),
])
def test_requests_whose_digests_do_not_fit_are_refused(tmp_path: Path, change: str, match: str) -> None:
    state, down = _state(), [ENC, HEAD]
    digests: dict = group_digests(state)
    received = dict(state)
    if change == "tampered":
        received[f"{HEAD}/w"] = received[f"{HEAD}/w"] + 1
    elif change == "other-groups":
        digests["text"] = digests[ENC]
    elif change == "foreign":
        received["text/w"] = torch.zeros(1)
    elif change == "neither":
        digests = {HEAD: digests[HEAD]}
        received = select(state, [HEAD])
    else:
        digests[ENC] = 7
    with pytest.raises(RequestError, match=match):
        resolve_down(received, digests, down, GroupCache(tmp_path))


# -------------------------------------------------------------------- the ClientApp
@pytest.fixture
def _identity() -> Iterator[None]:
    with identity.server_identity():
        yield


def _message(values: dict, state: dict, send: list[str]) -> Message:
    down = select(state, stage_groups(values["stage"], parse_run_config(values["fedmri-config"])).down)
    return Message(RecordDict({"arrays": to_record(select(down, send)), "config": ConfigRecord(values),
                               DIGESTS_KEY: ConfigRecord(group_digests(down))}),
                   dst_node_id=7, message_type=MessageType.EVALUATE)


def test_the_site_declines_what_it_lacks_and_evaluates_the_same_from_its_cache(
        site_file: Path, initial: dict, request_values, _identity: None, one_thread: None) -> None:
    cache = GroupCache.of_site(load_site(site_file))
    shutil.rmtree(cache.root, ignore_errors=True)
    assert cache.root == Path(load_site(site_file).catalog) / CACHE_FOLDER
    context = Context(run_id=1, node_id=7, node_config={"site-config": str(site_file)}, state=RecordDict(),
                      run_config={})
    values = request_values("evaluate")
    down = stage_groups("evaluate", parse_run_config(values["fedmri-config"])).down
    others = [g for g in down if g != ENC]

    lacking = app(_message(values, initial, others), context)
    status = dict(lacking.content["status"])
    assert status["declined"] is True and status[MISSING_GROUPS] == [ENC] and "lacks encoder" in status["reason"]

    full = dict(app(_message(values, initial, list(down)), context).content["metrics"])
    cached = dict(app(_message(values, initial, []), context).content["metrics"])
    clocks = {"wall-time-s", "bytes-received"}
    assert {k: v for k, v in cached.items() if k not in clocks} == {k: v for k, v in full.items() if k not in clocks}
    assert cached["bytes-received"] == 0 < full["bytes-received"]

    digest = group_digests(select(initial, [ENC]))[ENC]
    path = cache.path(ENC, digest)
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert dict(app(_message(values, initial, others), context).content["status"])[MISSING_GROUPS] == [ENC]


def test_groups_the_request_does_not_name_are_used_but_neither_hashed_nor_kept(tmp_path: Path) -> None:
    # Pretraining's groups change every round: the coordinator names none of them.
    state, cache = _state(), GroupCache(tmp_path)
    named = {HEAD: group_digests(state)[HEAD]}
    resolved = resolve_down(state, named, [ENC, HEAD], cache)
    assert all(torch.equal(resolved[k], state[k]) for k in state)
    assert (tmp_path / HEAD).exists() and not (tmp_path / ENC).exists()


# -------------------------------------------------------------- a rebuilt teacher
def _ssl_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = {"encoder/w": torch.randn(8, 8, generator=g), "encoder/b": torch.randn(8, generator=g),
               "dino_head/w": torch.randn(4, 8, generator=g)}
    teacher = {"teacher" + k[len("encoder"):] if k.startswith("encoder") else "teacher_head" + k[len("dino_head"):]:
               v.clone() for k, v in student.items()}
    return student | teacher | {"center/dino": torch.randn(4, generator=g)}


SSL_DOWN = ["encoder", "dino_head", "teacher", "teacher_head", "center"]
TEACHERS = ["teacher", "teacher_head"]
COPY = {"teacher": "", "teacher.momentum": 0.0, "teacher_head": "", "teacher_head.momentum": 0.0}


def _moved(state: dict, momentum: float, seed: int) -> tuple[dict, dict]:
    """The coordinator's next state: the student aggregated (moved at random), then the teacher's EMA."""
    g = torch.Generator().manual_seed(seed)
    after = {k: v + 0.1 * torch.randn(v.shape, generator=g) if k.split("/")[0] in ("encoder", "dino_head") else v
             for k, v in state.items()}
    before = group_digests(select(state, TEACHERS))
    update_teacher(after, momentum)
    rule = {g: before[g] for g in TEACHERS} | {f"{g}.momentum": momentum for g in TEACHERS}
    return after, rule


def test_a_teacher_is_rebuilt_from_the_student_bit_for_bit_and_kept(tmp_path: Path) -> None:
    cache, state = GroupCache(tmp_path), _ssl_state()
    assert all(teacher_is_copy(state, g) for g in TEACHERS)
    student = select(state, ["encoder", "dino_head", "center"])
    resolved = resolve_down(student, group_digests(select(state, TEACHERS)), SSL_DOWN, cache, COPY)
    assert resolved.keys() == state.keys() and all(torch.equal(resolved[k], state[k]) for k in state)
    for rnd, momentum in enumerate((0.9, 0.996), start=1):  # each round from the teacher kept the round before
        state, rule = _moved(state, momentum, seed=rnd)
        assert not teacher_is_copy(state, "teacher")
        student = select(state, ["encoder", "dino_head", "center"])
        resolved = resolve_down(student, group_digests(select(state, TEACHERS)), SSL_DOWN, cache, rule)
        assert all(torch.equal(resolved[k], state[k]) for k in state)
    assert {p.name for p in (tmp_path / "teacher").iterdir()} == {f"{group_digests(state)['teacher']}.safetensors",
                                                                 f"{rule['teacher']}.safetensors"}


@pytest.mark.parametrize("problem", ["wrong-momentum", "previous-not-held", "student-left-out"])
def test_a_teacher_that_cannot_be_rebuilt_to_its_digest_is_missing(tmp_path: Path, problem: str) -> None:
    cache, state = GroupCache(tmp_path), _ssl_state()
    resolve_down(select(state, ["encoder", "dino_head", "center"]), group_digests(select(state, TEACHERS)),
                 SSL_DOWN, cache, COPY)
    state, rule = _moved(state, 0.9, seed=1)
    sent = select(state, ["encoder", "dino_head", "center"])
    if problem == "wrong-momentum":
        rule = rule | {"teacher.momentum": 0.8}
    elif problem == "previous-not-held":
        shutil.rmtree(tmp_path / "teacher")
    else:  # the student does not come: nothing to rebuild from (its digest is named, its cache entry absent)
        sent = select(state, ["dino_head", "center"])
    digests = group_digests(select(state, TEACHERS)) | (
        {"encoder": group_digests(state)["encoder"]} if problem == "student-left-out" else {})
    with pytest.raises(MissingGroupsError) as info:
        resolve_down(sent, digests, SSL_DOWN, cache, rule)
    assert "teacher" in info.value.groups and "teacher_head" not in info.value.groups


@pytest.mark.parametrize(("rule", "match"), [
    ({"encoder": "", "encoder.momentum": 0.0}, "not a teacher group it names"),
    ({"teacher": "", "teacher.momentum": 1.5}, r"momentum in \[0, 1\]"),
    ({"teacher": ""}, r"momentum in \[0, 1\]"),
    ({"teacher": "../x", "teacher.momentum": 0.5}, "SHA-256"),
])
def test_a_malformed_rebuild_record_is_refused(tmp_path: Path, rule: dict, match: str) -> None:
    state = _ssl_state()
    with pytest.raises(RequestError, match=match):
        resolve_down(select(state, ["encoder", "dino_head", "center"]),
                     group_digests(select(state, TEACHERS)), SSL_DOWN, GroupCache(tmp_path), rule)
