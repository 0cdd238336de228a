"""What secure aggregation adds to a round: seconds and bytes per site and at the coordinator, against plain FedAvg.

No training and no Flower transport: each configuration runs the protocol's own code
in this process (the coordinator's :class:`fedmri.server.secagg.SecureRound` and
:class:`fedmri.strategies.secagg.SecureSum`; each site's handlers from
:mod:`fedmri.client.secagg`, with its own ``Context``), on the pretrain update groups
of a preset (encoder, DINO head, centre), every site's update the start moved by a
random step. The plain baseline is what the pipeline does without it: each update
offered to :class:`~fedmri.strategies.updates.RoundUpdates` (checks, norm, hash) and
folded by FedAvg.

Printed per configuration:

- *site s*: one site's extra work (keys, shares, clip + encode + masks, unmasking
  shares), the median over the sites; sites run in parallel in a federation, so this
  is the round's extra wall time at the sites;
- *coordinator s*: setup (graph, routing shares), folding the masked updates into the
  sum, rebuilding the secrets and removing the masks, decoding; against *plain s*, the
  same coordinator's checks and FedAvg of the plain updates;
- *extra bytes per site*: keys, shares and unmasking messages both ways, and the
  masked update's size minus the float32 update's (4 bytes more: the weight).

With ``--degrees`` a second table holds the number of sites fixed and varies the
neighbours (SecAgg+'s graph): a site's masking time grows linearly with them.

    python benchmarks/bench_secagg.py                         # tiny and small, 3, 10, 50 sites
    python benchmarks/bench_secagg.py --presets tiny --sites 3 --degrees 2,4,8,16,32
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

import _tests_path  # noqa: F401 -- tests/ on sys.path: the shared test helpers

MB = 1e6


def _record_bytes(record: Any) -> int:
    """Bytes of a ConfigRecord's values (keys, shares, node ids as 8 bytes)."""
    total = 0
    for value in record.values():
        for item in value if isinstance(value, list) else [value]:
            total += len(item) if isinstance(item, (bytes, str)) else 8
    return total


class ProtocolGrid:
    """Delivers the secure aggregation steps to each site's handlers in this process, timing each site."""

    def __init__(self, nodes: list[int]) -> None:
        from flwr.app import Context, RecordDict

        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                         for n in nodes}
        self.site_s = dict.fromkeys(nodes, 0.0)
        self.bytes = dict.fromkeys(nodes, 0)
        self.pending: dict[str, Any] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Any) -> list[str]:
        from uuid import uuid4

        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex
            self.pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Any) -> list[Any]:
        from fedmri.client import secagg as site
        from fedmri.protocol import SECAGG_KEY, SECAGG_KEYS, SECAGG_SHARES

        replies = []
        for mid in list(message_ids):
            msg = self.pending.pop(mid, None)
            if msg is None:
                continue
            node = int(msg.metadata.dst_node_id)
            handler = {SECAGG_KEYS: site.handle_keys, SECAGG_SHARES: site.handle_shares}.get(
                msg.metadata.message_type, site.handle_unmask)
            t = time.perf_counter()
            reply = handler(msg, self.contexts[node])
            self.site_s[node] += time.perf_counter() - t
            self.bytes[node] += _record_bytes(msg.content[SECAGG_KEY]) + _record_bytes(reply.content[SECAGG_KEY])
            replies.append(reply)
        return replies

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        return self.pull_messages(self.push_messages(messages))


def one(preset: str, n: int, degree: int) -> dict[str, float]:
    import torch
    from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

    from fedmri import stages, wire
    from fedmri.client.secagg import mask_update
    from fedmri.config import load_config
    from fedmri.protocol import SECAGG_KEY, TrainRequest
    from fedmri.server.secagg import SecureRound
    from fedmri.strategies import build_aggregator
    from fedmri.strategies.secagg import SecureSum
    from fedmri.strategies.updates import RoundUpdates
    from helpers.identity import server_identity

    cfg = load_config(preset)
    up = wire.select(wire.initial_state(cfg), stages.get("pretrain").groups(cfg).up)
    nodes = list(range(1, n + 1))
    rng = np.random.default_rng(0)
    step = {k: torch.from_numpy(rng.normal(scale=1e-3, size=tuple(v.shape)).astype(np.float32)) for k, v in up.items()}
    current = wire.to_record(up)
    float_bytes = sum(4 * v.numel() for v in up.values())
    with server_identity():
        grid = ProtocolGrid(nodes)
        secure = SecureRound(context="bench/1", nodes=nodes, degree=degree, threshold=0.5, clip_norm=10.0,
                             max_weight=1000.0, seed=0, timeout_s=60.0)
        t = time.perf_counter()
        training = secure.setup(grid)
        coordinator = time.perf_counter() - t
        total = SecureSum({k: tuple(a.shape) for k, a in current.items()}, secure.context)
        request = TrainRequest(stage="pretrain", round=1, server_round=1, seed=0, run_name="bench", fedmri_config="",
                               local_steps=1, secagg=True, secagg_clip_norm=10.0, secagg_max_weight=1000.0,
                               secagg_scale=secure.scale)
        masked_bytes = 0
        for node in training:
            local = {k: v + step[k] * (1 + node % 5) for k, v in up.items()}
            msg = Message(RecordDict({SECAGG_KEY: secure.extras(node)[SECAGG_KEY]}), dst_node_id=node,
                          message_type=MessageType.TRAIN)
            t = time.perf_counter()
            masked = mask_update(grid.contexts[node], msg, request, local, up, 20.0)
            grid.site_s[node] += time.perf_counter() - t
            grid.bytes[node] += _record_bytes(msg.content[SECAGG_KEY])
            masked_bytes = sum(a.nbytes for a in masked.values())
            t = time.perf_counter()
            assert total.add(node, masked) is None
            coordinator += time.perf_counter() - t
        t = time.perf_counter()
        secure.unmask(grid, total)
        mean, weight = total.mean(secure.scale)
        coordinator += time.perf_counter() - t
        assert weight == 20 * n and all(np.isfinite(v).all() for v in mean.values())

        # Plain: the same updates offered and folded by FedAvg.
        aggregator = build_aggregator({"name": "fedavg"})
        t = time.perf_counter()
        with RoundUpdates(current) as updates:
            for node in nodes:
                local = {k: (v + step[k] * (1 + node % 5)).numpy() for k, v in up.items()}
                ask = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
                reply = Message(RecordDict({"arrays": ArrayRecord({k: Array(a) for k, a in local.items()}),
                                            "metrics": MetricRecord({"num-examples": 20})}), reply_to=ask)
                assert updates.offer(reply) is None
            aggregator.aggregate(1, current, updates)
        plain = time.perf_counter() - t
    return {"update_mb": float_bytes / MB, "site_s": statistics.median(grid.site_s.values()),
            "site_max_s": max(grid.site_s.values()), "coordinator_s": coordinator, "plain_s": plain,
            "extra_kb": statistics.median(grid.bytes.values()) / 1e3 + (masked_bytes - float_bytes) / 1e3,
            "neighbours": float(statistics.median(len(v) for v in secure.graph.values()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--sites", default="3,10,50")
    parser.add_argument("--degree", type=int, default=0, help="neighbours per site (0: every other site)")
    parser.add_argument("--degrees", default="", help="second table: these degrees at --degrees-sites sites")
    parser.add_argument("--degrees-sites", type=int, default=50)
    parser.add_argument("--degrees-preset", default="tiny")
    args = parser.parse_args()
    print("| preset | update MB | sites | neighbours | site s (median, max) | coordinator s | plain s | "
          "coordinator extra s | extra kB per site |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
          flush=True)
    for preset in args.presets.split(","):
        for n in (int(s) for s in args.sites.split(",")):
            r = one(preset, n, args.degree)
            print(f"| {preset} | {r['update_mb']:.1f} | {n} | {r['neighbours']:.0f} | {r['site_s']:.2f} "
                  f"({r['site_max_s']:.2f}) | {r['coordinator_s']:.2f} | {r['plain_s']:.2f} | "
                  f"{r['coordinator_s'] - r['plain_s']:+.2f} | {r['extra_kb']:.1f} |", flush=True)
    if args.degrees:
        print(f"\n{args.degrees_preset}, {args.degrees_sites} sites: a site's secure aggregation work against its "
              "neighbours\n\n| neighbours | site s (median) | per neighbour s | extra kB per site |\n"
              "| --- | --- | --- | --- |", flush=True)
        for k in (int(d) for d in args.degrees.split(",")):
            r = one(args.degrees_preset, args.degrees_sites, k)
            print(f"| {r['neighbours']:.0f} | {r['site_s']:.3f} | {r['site_s'] / max(r['neighbours'], 1):.4f} | "
                  f"{r['extra_kb']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
