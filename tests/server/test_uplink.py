"""The bfloat16 wire: a site sends its update's difference from what it was sent, and may be sent the
groups it trains rounded to bfloat16; either way half the bytes, and a float32 copy at the coordinator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict
from omegaconf import OmegaConf

from fedmri import wire
from fedmri.errors import ConfigError
from fedmri.protocol import ARRAYS_KEY, METRICS_KEY, RequestError, TrainRequest
from fedmri.server.config import load_federation
from fedmri.server.pipeline import Pipeline
from fedmri.strategies.validation import read_reply
from fedmri.wire import bf16_to_float32

from helpers.local_grid import LocalGrid


def _reply(record) -> Message:
    content = RecordDict({ARRAYS_KEY: record, METRICS_KEY: MetricRecord({"num-examples": 4})})
    return Message(content, dst_node_id=1, message_type="train")


def _sent_and_up(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    sent = {"encoder/w": torch.randn(256, 192, generator=g), "encoder/b": torch.randn(192, generator=g)}
    up = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in sent.items()}
    return sent, up


def test_the_coordinator_reads_a_bf16_delta_within_half_a_step_of_the_delta() -> None:
    sent, up = _sent_and_up()
    record = wire.to_delta_record(up, sent)
    assert {k: str(a.numpy().dtype) for k, a in record.items()} == {k: "uint16" for k in up}
    assert record.count_bytes() <= 0.51 * wire.to_record(up).count_bytes()
    start = {k: v.numpy() for k, v in sent.items()}
    arrays, reason = read_reply(start, _reply(record), bf16_deltas=True)
    assert reason is None
    for k in up:
        delta = (up[k] - sent[k]).numpy()
        err = np.abs(arrays[k] - up[k].numpy())
        assert arrays[k].dtype == np.float32
        # round to nearest bfloat16: at most half its step (2^-8 of the value), plus float32 rounding
        assert (err <= np.abs(delta) * 2.0**-8 + 2e-7 * np.abs(up[k].numpy())).all(), k
        assert err.max() > 0  # bfloat16 did round: the test sees the encoding
    # The same reply read as a float32 uplink is refused: nothing reads raw bits as values.
    _, reason = read_reply(start, _reply(record))
    assert reason is not None and "dtype uint16" in reason


def test_an_update_below_half_a_bf16_step_of_the_weight_is_kept() -> None:
    """The coordinator's float32 copy keeps what a rounded weight cannot hold: a site sent the weights
    rounded moves them by 1e-5, well under half a bfloat16 step of a weight near 1 (2^-8)."""
    master = {"encoder/w": 1.0 + 0.01 * torch.randn(4096, generator=torch.Generator().manual_seed(1))}
    got = wire.from_record(wire.to_bf16_record(master), bf16=True)
    step = 1e-5 * torch.ones(4096)
    local = {"encoder/w": got["encoder/w"] + step}
    assert torch.equal(wire.round_bf16(local["encoder/w"]), got["encoder/w"])  # rounded weights lose it all
    arrays, reason = read_reply({k: v.numpy() for k, v in master.items()},
                                _reply(wire.to_delta_record(local, got)), bf16_deltas=True)
    assert reason is None
    moved = torch.from_numpy(arrays["encoder/w"]) - master["encoder/w"]
    assert torch.allclose(moved, step, rtol=0.02, atol=0.0), (moved - step).abs().max()


def test_bf16_bits_decode_exactly() -> None:
    values = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e-38, 1.5e38, 0.1], dtype=torch.bfloat16)
    bits = values.view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bf16_to_float32(bits), values.float().numpy())
    scalar = bf16_to_float32(bits[3:4].reshape(()))  # a 0-d key (logit_scale) stays an array
    assert isinstance(scalar, np.ndarray) and scalar.shape == () and float(scalar) == -2.5


def test_a_key_the_site_was_not_sent_goes_as_float32() -> None:
    sent, up = _sent_and_up()
    up["center/dino"] = torch.randn(8)
    record = wire.to_delta_record(up, sent)
    assert str(record["center/dino"].numpy().dtype) == "float32"
    start = {k: v.numpy() for k, v in sent.items()} | {"center/dino": np.zeros(8, np.float32)}
    arrays, reason = read_reply(start, _reply(record), bf16_deltas=True)
    assert reason is None and np.array_equal(arrays["center/dino"], up["center/dino"].numpy())


def test_a_non_finite_delta_is_rejected() -> None:
    sent, up = _sent_and_up()
    up["encoder/b"][3] = float("nan")
    _, reason = read_reply({k: v.numpy() for k, v in sent.items()}, _reply(wire.to_delta_record(up, sent)),
                           bf16_deltas=True)
    assert reason is not None and "non-finite" in reason and "encoder/b" in reason


def test_a_bf16_downlink_reads_back_as_the_rounded_values_and_only_when_announced() -> None:
    sent, _ = _sent_and_up()
    record = wire.to_bf16_record(sent)
    assert record.count_bytes() <= 0.51 * wire.to_record(sent).count_bytes()
    got = wire.from_record(record, bf16=True)
    for k, v in sent.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v.to(torch.bfloat16).float())
        assert torch.equal(got[k], wire.round_bf16(v)) and not torch.equal(got[k], v)
    with pytest.raises(ValueError, match="did not ask for a bf16 downlink"):
        wire.from_record(record)


def test_an_unknown_uplink_is_refused_by_the_site_and_by_the_config(tmp_path: Path) -> None:
    base = {"stage": "pretrain", "round": 1, "server-round": 1, "seed": 0, "run-name": "r", "fedmri-config": "",
            "local-steps": 1, "lr": 0.1, "weight-decay": 0.0, "teacher-momentum": 0.9, "teacher-temp": 0.04}
    assert TrainRequest.from_config(base | {"uplink": "bf16"}).uplink == "bf16"
    assert TrainRequest.from_config(base).uplink == "float32"  # an older coordinator does not say
    with pytest.raises(RequestError, match="uplink 'fp8'"):
        TrainRequest.from_config(base | {"uplink": "fp8"})
    with pytest.raises(ConfigError, match="uplink must be one of float32, bf16"):
        load_federation(overrides=["uplink=int8", f"run_root={tmp_path}"])
    # Rounded weights down need differences up: else the coordinator's float32 copy is lost.
    with pytest.raises(RequestError, match="downlink bf16 needs uplink bf16"):
        TrainRequest.from_config(base | {"downlink": "bf16"})
    with pytest.raises(ConfigError, match="downlink bf16 needs uplink: bf16"):
        load_federation(overrides=["downlink=bf16", f"run_root={tmp_path}"])


# --------------------------------------------------------------- a whole run, in process
STAGES = [{"name": "pretrain", "rounds": 2, "local_steps": 1}, {"name": "align", "rounds": 1, "local_steps": 1},
          {"name": "heads", "rounds": 1, "local_steps": 2}]


def _run(root: Path, sites: list, uplink: str, downlink: str = "float32") -> Pipeline:
    body = {"name": f"uplink-{uplink}", "preset": "micro", "overrides": ["heads.hidden_dim=32"], "min_sites": 2,
            "run_root": str(root), "stages": STAGES, "export": False, "wait_for_sites_s": 5, "uplink": uplink,
            "downlink": downlink}
    pipeline = Pipeline(load_federation(text=OmegaConf.to_yaml(OmegaConf.create(body))))
    pipeline.run_all(LocalGrid({101 + i: site_file for i, (_, site_file, _) in enumerate(sites)}))
    return pipeline


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, federation_sites: list, module_server_identity: None) -> dict:
    root = tmp_path_factory.mktemp("uplink")
    # bf16 both ways: the uplink's differences are what keep the rounded downlink's master float32.
    return {"float32": _run(root, federation_sites, "float32"), "bf16": _run(root, federation_sites, "bf16", "bf16"),
            "root": root}


@pytest.mark.slow
def test_a_bf16_wire_halves_the_bytes_both_ways_and_moves_the_weights_as_float32_does(runs: dict) -> None:
    fp32, bf16 = runs["float32"], runs["bf16"]
    rows = {u: [json.loads(line) for line in (runs["root"] / f"uplink-{u}" / "metrics.jsonl").read_text().splitlines()]
            for u in ("float32", "bf16")}
    for stage in ("pretrain", "align", "heads"):
        up = {u: sorted(r["bytes-up"] for r in rows[u] if r["stage"] == stage and r["site"] != "all")
              for u in rows}
        assert len(up["bf16"]) == len(up["float32"]) > 0, stage
        for b, f in zip(up["bf16"], up["float32"], strict=True):
            assert 0.49 * f <= b <= 0.51 * f, (stage, b, f)
    assert all(len(o.accepted) == 3 and not o.problems for o in bf16.outcomes)
    # Down: the student at 2 bytes a value; the teacher is rebuilt at the site from the rounded
    # student it gets (a copy in round 1, the EMA in round 2), so nothing is resent.
    student = sum(v.numel() for k, v in fp32.state.items()
                  if wire.group_of(k) in (wire.ENCODER, wire.DINO_HEAD, wire.CENTER))
    for rnd in (1, 2):
        outcome = next(o for o in bf16.outcomes if (o.stage, o.round) == ("pretrain", rnd))
        assert all(outcome.sent_to(n) == 2 * student for n in outcome.accepted), (rnd, outcome.bytes_down_by_node)
    heads = next(o for o in bf16.outcomes if o.stage == "heads")
    head_values = sum(v.numel() for k, v in fp32.state.items() if k.startswith(wire.HEAD_PREFIX))
    encoder = sum(v.numel() for k, v in fp32.state.items() if wire.group_of(k) == wire.ENCODER)
    # The encoder that alignment moved goes once, in float32 (a named group the sites cache); the heads rounded.
    assert all(heads.sent_to(n) == 4 * encoder + 2 * head_values for n in heads.accepted)
    # The trained weights: the bf16 run lands where the float32 run does (apart: 1-17% of how far
    # training moved them here; an update read against the wrong base would be 100% or a weight away).
    start = wire.initial_state(fp32.cfg)
    for group in (wire.ENCODER, wire.DINO_HEAD, wire.PROJECTIONS, *wire.head_groups(fp32.cfg)):
        keys = [k for k in fp32.state if wire.group_of(k) == group]
        moved = torch.cat([(fp32.state[k] - start[k]).flatten() for k in keys]).norm()
        apart = torch.cat([(bf16.state[k] - fp32.state[k]).flatten() for k in keys]).norm()
        assert moved > 0, group
        weights = torch.cat([fp32.state[k].flatten() for k in keys]).norm()
        # The sites compute at weights rounded to bfloat16 (as under bf16 autocast): their updates
        # differ by what a few such roundings (2^-9 of a weight) make, not by a weight or a step.
        assert apart <= 0.1 * moved + 4 * 2.0**-9 * weights, (group, float(apart), float(moved), float(weights))
