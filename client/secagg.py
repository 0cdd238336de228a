"""The site's side of secure aggregation (:mod:`fedmri.secagg`): keys, shares, the masked update, unmasking.

A secure training round is four messages to the site:

1. ``query.secagg_keys``: two fresh X25519 key pairs, one to encrypt shares, one to agree
   on pairwise masks; the public halves go to the coordinator.
2. ``query.secagg_shares``: the neighbours' public keys; the site draws its self-mask
   seed ``b`` and sends Shamir shares of ``b`` and of its mask key, each encrypted
   for one neighbour (the coordinator forwards them and cannot read them).
3. the stage's ``train`` message, with the shares addressed to this site: the site
   trains, clips its update to the request's L2 norm, weights and encodes it, masks
   it (:func:`mask_update`) and sends only the masked integers.
4. ``query.secagg_unmask``: which neighbours' inputs arrived; the site sends shares
   of ``b`` for those and shares of the mask key for the others, once per round.

Between messages the private keys and received shares stay in ``context.state``,
which Flower keeps at the site's SuperNode; none of it goes to the coordinator
except what the protocol sends.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat, share_keys_plaintext_separate

from fedmri.client.trainers import RequestError
from fedmri.protocol import SECAGG_KEY, TrainRequest, config_value
from fedmri.secagg import (
    WEIGHT_KEY,
    SecAggError,
    add_mask,
    agree,
    clip_l2,
    distributed_bound,
    distributed_noise_std,
    encode,
    fernet_key,
    generate_keypair,
    share_threshold,
)

STATE_KEY = "fedmri.secagg"


def _record(msg: Message) -> ConfigRecord:
    record = msg.content.config_records.get(SECAGG_KEY)
    if record is None:
        raise RequestError(f"a secure aggregation message lacks its {SECAGG_KEY!r} record")
    return record


def _state(context: Context, record: ConfigRecord, step: str) -> ConfigRecord:
    """This round's saved secrets; a message of another round or out of order is refused."""
    state = context.state.config_records.get(STATE_KEY)
    round_id = config_value(record, "context", str)
    if state is None or state.get("context") != round_id:
        raise RequestError(f"secure aggregation {step} for {round_id!r}, but this site holds no keys for it")
    return state


def _reply(msg: Message, values: dict) -> Message:
    return Message(RecordDict({SECAGG_KEY: ConfigRecord(values)}), reply_to=msg)


def handle_keys(msg: Message, context: Context) -> Message:
    """Step 1: fresh key pairs for this round; the public keys go back."""
    record = _record(msg)
    round_id = config_value(record, "context", str)
    sk_c, pk_c = generate_keypair()
    sk_s, pk_s = generate_keypair()
    context.state[STATE_KEY] = ConfigRecord({"context": round_id, "sk-c": sk_c, "sk-s": sk_s})
    return _reply(msg, {"pk-c": pk_c, "pk-s": pk_s})


def handle_shares(msg: Message, context: Context) -> Message:
    """Step 2: shares of the self-mask seed and of the mask key, encrypted for each neighbour.

    Raises:
        RequestError: The neighbour list is malformed, or the threshold is below a majority of
            the share holders (the coordinator could then rebuild both secrets of a site).
    """
    record = _record(msg)
    state = _state(context, record, "shares")
    me = int(context.node_id)
    nodes = [int(n) for n in config_value(record, "nodes", list)]
    pk_c = list(config_value(record, "pk-c", list))
    pk_s = list(config_value(record, "pk-s", list))
    threshold = config_value(record, "threshold", int)
    if me in nodes or len(set(nodes)) != len(nodes) or not (len(nodes) == len(pk_c) == len(pk_s)):
        raise RequestError("secure aggregation: the neighbour list must name other nodes once, with both keys each")
    holders = sorted([me, *nodes])
    if threshold < share_threshold(len(holders), 0.0) or threshold > len(holders):
        raise RequestError(f"secure aggregation threshold {threshold} must be a majority of the {len(holders)} "
                           "share holders, at most all of them")
    b = os.urandom(32)
    b_shares = create_shares(b, threshold, len(holders))
    sk_shares = create_shares(bytes(state["sk-s"]), threshold, len(holders))
    keys_c = dict(zip(nodes, pk_c, strict=True))
    dst, ciphertexts = [], []
    for holder, b_share, sk_share in zip(holders, b_shares, sk_shares, strict=True):
        if holder == me:
            state["own-b-share"], state["own-sk-share"] = b_share, sk_share
            continue
        key = fernet_key(agree(bytes(state["sk-c"]), bytes(keys_c[holder]), "shares", state["context"]))
        dst.append(holder)
        ciphertexts.append(encrypt(key, share_keys_plaintext_concat(me, holder, b_share, sk_share)))
    state["b"], state["threshold"] = b, threshold
    state["nodes"], state["pk-c"], state["pk-s"] = nodes, [bytes(k) for k in pk_c], [bytes(k) for k in pk_s]
    return _reply(msg, {"dst": dst, "ciphertexts": ciphertexts})


def mask_update(context: Context, msg: Message, request: TrainRequest, up: Mapping[str, torch.Tensor],
                base: Mapping[str, torch.Tensor], weight: float) -> dict[str, np.ndarray]:
    """Step 3: the site's update as masked ring elements, ready to send.

    ``up - base`` is clipped to ``request.secagg_clip_norm``, multiplied by the site's weight
    (its example count, capped at ``secagg_max_weight``), encoded at ``secagg_scale`` and masked;
    the weight rides along as :data:`~fedmri.secagg.WEIGHT_KEY`, masked the same way.

    Raises:
        RequestError: The shares do not decrypt or name other nodes.
    """
    record = _record(msg)
    state = _state(context, record, "masking")
    if "b" not in state:
        raise RequestError("secure aggregation: the update was asked for before the shares step")
    me, round_id = int(context.node_id), str(state["context"])
    keys_c = dict(zip(state["nodes"], state["pk-c"], strict=True))
    keys_s = dict(zip(state["nodes"], state["pk-s"], strict=True))
    src = [int(n) for n in config_value(record, "src", list)]
    ciphertexts = list(config_value(record, "ciphertexts", list))
    if len(src) != len(ciphertexts) or any(n not in keys_c for n in src) or len(set(src)) != len(src):
        raise RequestError("secure aggregation: the forwarded shares must come from this site's neighbours, once each")
    share_src, share_b, share_sk = [me], [bytes(state["own-b-share"])], [bytes(state["own-sk-share"])]
    for node, ciphertext in zip(src, ciphertexts, strict=True):
        key = fernet_key(agree(bytes(state["sk-c"]), bytes(keys_c[node]), "shares", round_id))
        try:
            got_src, got_dst, b_share, sk_share = share_keys_plaintext_separate(decrypt(key, bytes(ciphertext)))
        except Exception:  # noqa: BLE001 -- cryptography's InvalidToken and malformed plaintext alike
            raise RequestError(f"secure aggregation: the share from node {node} does not decrypt") from None
        if (got_src, got_dst) != (node, me):
            raise RequestError(f"secure aggregation: the share from node {node} was addressed {got_src} -> {got_dst}")
        share_src.append(node)
        share_b.append(b_share)
        share_sk.append(sk_share)
    state["share-src"], state["share-b"], state["share-sk"] = share_src, share_b, share_sk

    deltas = {k: (up[k].detach().double() - base[k].detach().double()).numpy() for k in up}
    distributed = request.site_dp == "distributed"
    clip = request.site_dp_clip_norm if distributed else request.secagg_clip_norm
    clipped, _ = clip_l2(deltas, clip)
    n = 1.0 if distributed else float(min(weight, request.secagg_max_weight))  # site-level DP: equal weights
    if distributed:  # this site's share of the sum's noise, from the OS: the run seed would let it be replayed
        std = distributed_noise_std(clip, request.site_dp_noise_multiplier, request.site_dp_sites)
        bound = distributed_bound(clip, request.site_dp_noise_multiplier, request.site_dp_sites)
        noise = np.random.default_rng()
        clipped = {k: np.clip(v + noise.normal(0.0, std, size=v.shape), -bound, bound) for k, v in clipped.items()}
    rng = np.random.default_rng([request.seed, request.server_round, me])  # rounding only: reproducible runs
    vectors = {k: encode(n * v, request.secagg_scale, rng) for k, v in clipped.items()}
    vectors[WEIGHT_KEY] = np.array([int(round(n))], dtype=np.int64).astype(np.uint32)
    add_mask(vectors, bytes(state["b"]), +1)
    for node in src:  # a neighbour that sent no shares masks nothing with this site either
        seed = agree(bytes(state["sk-s"]), bytes(keys_s[node]), "mask", round_id)
        add_mask(vectors, seed, +1 if me < node else -1)
    state["masked"] = True
    return vectors


def handle_unmask(msg: Message, context: Context) -> Message:
    """Step 4: shares of ``b`` for the neighbours whose input arrived, of the mask key for the others.

    Raises:
        RequestError: Asked twice, before masking, with a node in both lists, with this site
            called dropped, or with fewer surviving share holders than the threshold.
    """
    record = _record(msg)
    state = _state(context, record, "unmasking")
    me = int(context.node_id)
    if not state.get("masked", False):
        raise RequestError("secure aggregation: unmasking was asked for before this site sent its update")
    if state.get("unmasked", False):
        raise RequestError("secure aggregation: unmasking was already answered for this round")
    survivors = {int(n) for n in config_value(record, "survivors", list)}
    dropped = {int(n) for n in config_value(record, "dropped", list)}
    if survivors & dropped or me in dropped or me not in survivors:
        raise RequestError("secure aggregation: the survivor and dropout lists contradict each other")
    held = list(state["share-src"])
    if len(survivors & set(held)) < int(state["threshold"]):
        raise RequestError(f"secure aggregation: {len(survivors & set(held))} of this site's share holders "
                           f"survived, fewer than the threshold {state['threshold']}")
    state["unmasked"] = True
    out: dict[str, list] = {"b-src": [], "b-shares": [], "sk-src": [], "sk-shares": []}
    for node, b_share, sk_share in zip(held, state["share-b"], state["share-sk"], strict=True):
        if node in survivors:
            out["b-src"].append(node)
            out["b-shares"].append(bytes(b_share))
        elif node in dropped:
            out["sk-src"].append(node)
            out["sk-shares"].append(bytes(sk_share))
    return _reply(msg, out)


__all__ = ["STATE_KEY", "SecAggError", "handle_keys", "handle_shares", "handle_unmask", "mask_update"]
