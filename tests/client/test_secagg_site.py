"""The site's side of secure aggregation refuses what would let a coordinator learn more than the sum."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedmri.client.secagg import STATE_KEY, handle_keys, handle_shares, handle_unmask
from fedmri.client.trainers import RequestError
from fedmri.protocol import SECAGG_KEY, SECAGG_KEYS, SECAGG_SHARES, SECAGG_UNMASK
from fedmri.secagg import generate_keypair

pytestmark = pytest.mark.usefixtures("module_server_identity")  # the messages here are the coordinator's


def _context(node: int) -> Context:
    return Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})


def _msg(kind: str, body: dict, node: int) -> Message:
    return Message(RecordDict({SECAGG_KEY: ConfigRecord(body)}), dst_node_id=node, message_type=kind)


def _shares_body(threshold: int, others: int = 4) -> dict:
    keys = [generate_keypair()[1] for _ in range(others)]
    return {"context": "run/1", "threshold": threshold, "nodes": list(range(2, 2 + others)), "pk-c": keys,
            "pk-s": keys}


def test_keys_then_shares_for_each_neighbour_and_the_secrets_stay_in_the_sites_state():
    ctx = _context(1)
    reply = handle_keys(_msg(SECAGG_KEYS, {"context": "run/1"}, 1), ctx)
    record = reply.content[SECAGG_KEY]
    assert len(record["pk-c"]) == len(record["pk-s"]) == 32 and "sk-c" not in record
    out = handle_shares(_msg(SECAGG_SHARES, _shares_body(3), 1), ctx).content[SECAGG_KEY]
    assert out["dst"] == [2, 3, 4, 5] and len(out["ciphertexts"]) == 4
    state = ctx.state.config_records[STATE_KEY]
    assert len(state["b"]) == 32 and state["threshold"] == 3
    assert all(bytes(state["b"]) not in bytes(c) for c in out["ciphertexts"])


def test_a_threshold_below_a_majority_is_refused():
    ctx = _context(1)
    handle_keys(_msg(SECAGG_KEYS, {"context": "run/1"}, 1), ctx)
    with pytest.raises(RequestError, match="majority"):
        handle_shares(_msg(SECAGG_SHARES, _shares_body(2), 1), ctx)  # 5 holders: 3 needed at least


def test_shares_for_another_round_are_refused():
    ctx = _context(1)
    handle_keys(_msg(SECAGG_KEYS, {"context": "run/1"}, 1), ctx)
    with pytest.raises(RequestError, match="no keys"):
        handle_shares(_msg(SECAGG_SHARES, _shares_body(3) | {"context": "run/2"}, 1), ctx)


def test_unmasking_is_answered_once_and_never_with_contradicting_lists():
    ctx = _context(1)
    handle_keys(_msg(SECAGG_KEYS, {"context": "run/1"}, 1), ctx)
    handle_shares(_msg(SECAGG_SHARES, _shares_body(3), 1), ctx)
    body = {"context": "run/1", "survivors": [1, 2, 3], "dropped": [4]}
    with pytest.raises(RequestError, match="before this site sent"):
        handle_unmask(_msg(SECAGG_UNMASK, body, 1), ctx)
    state = ctx.state.config_records[STATE_KEY]
    # As after masking: it holds its own shares and those of 2, 3 and 4.
    state["masked"] = True
    state["share-src"] = [1, 2, 3, 4]
    state["share-b"] = [b"b1", b"b2", b"b3", b"b4"]
    state["share-sk"] = [b"s1", b"s2", b"s3", b"s4"]
    with pytest.raises(RequestError, match="contradict"):
        handle_unmask(_msg(SECAGG_UNMASK, body | {"dropped": [3]}, 1), ctx)
    with pytest.raises(RequestError, match="contradict"):
        handle_unmask(_msg(SECAGG_UNMASK, {"context": "run/1", "survivors": [2, 3], "dropped": [1]}, 1), ctx)
    with pytest.raises(RequestError, match="fewer than the threshold"):
        handle_unmask(_msg(SECAGG_UNMASK, {"context": "run/1", "survivors": [1], "dropped": [2, 3, 4]}, 1), ctx)
    out = handle_unmask(_msg(SECAGG_UNMASK, body, 1), ctx).content[SECAGG_KEY]
    assert out["b-src"] == [1, 2, 3] and out["sk-src"] == [4] and out["sk-shares"] == [b"s4"]
    with pytest.raises(RequestError, match="already answered"):
        handle_unmask(_msg(SECAGG_UNMASK, body, 1), ctx)
