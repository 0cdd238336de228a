"""The bfloat16 uplink: a site sends its update's difference from what it was sent, in half the bytes."""

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
from fedmri.strategies.validation import bf16_to_float32, read_reply

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


def test_bf16_bits_decode_exactly() -> None:
    values = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e-38, 1.5e38, 0.1], dtype=torch.bfloat16)
    bits = values.view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bf16_to_float32(bits), values.float().numpy())


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


def test_an_unknown_uplink_is_refused_by_the_site_and_by_the_config(tmp_path: Path) -> None:
    base = {"stage": "pretrain", "round": 1, "server-round": 1, "seed": 0, "run-name": "r", "fedmri-config": "",
            "local-steps": 1, "lr": 0.1, "weight-decay": 0.0, "teacher-momentum": 0.9, "teacher-temp": 0.04}
    assert TrainRequest.from_config(base | {"uplink": "bf16"}).uplink == "bf16"
    assert TrainRequest.from_config(base).uplink == "float32"  # an older coordinator does not say
    with pytest.raises(RequestError, match="uplink 'fp8'"):
        TrainRequest.from_config(base | {"uplink": "fp8"})
    with pytest.raises(ConfigError, match="uplink must be one of float32, bf16"):
        load_federation(overrides=["uplink=int8", f"run_root={tmp_path}"])


# --------------------------------------------------------------- a whole run, in process
STAGES = [{"name": "pretrain", "rounds": 2, "local_steps": 1}, {"name": "align", "rounds": 1, "local_steps": 1},
          {"name": "heads", "rounds": 1, "local_steps": 2}]


def _run(root: Path, sites: list, uplink: str) -> Pipeline:
    body = {"name": f"uplink-{uplink}", "preset": "micro", "overrides": ["heads.hidden_dim=32"], "min_sites": 2,
            "run_root": str(root), "stages": STAGES, "export": False, "wait_for_sites_s": 5, "uplink": uplink}
    pipeline = Pipeline(load_federation(text=OmegaConf.to_yaml(OmegaConf.create(body))))
    pipeline.run_all(LocalGrid({101 + i: site_file for i, (_, site_file, _) in enumerate(sites)}))
    return pipeline


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, federation_sites: list, module_server_identity: None) -> dict:
    root = tmp_path_factory.mktemp("uplink")
    return {uplink: _run(root, federation_sites, uplink) for uplink in ("float32", "bf16")} | {"root": root}


@pytest.mark.slow
def test_a_bf16_uplink_halves_the_bytes_up_and_moves_the_weights_as_float32_does(runs: dict) -> None:
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
    # The trained weights: the bf16 run lands where the float32 run does, up to a small fraction
    # of how far training moved them (the site's delta is rounded, the coordinator's copy is not):
    # 0.2-2.5% here, against 100% for an update read against the wrong base.
    start = wire.initial_state(fp32.cfg)
    for group in (wire.ENCODER, wire.DINO_HEAD, wire.PROJECTIONS, *wire.head_groups(fp32.cfg)):
        keys = [k for k in fp32.state if wire.group_of(k) == group]
        moved = torch.cat([(fp32.state[k] - start[k]).flatten() for k in keys]).norm()
        apart = torch.cat([(bf16.state[k] - fp32.state[k]).flatten() for k in keys]).norm()
        assert moved > 0, group
        assert apart <= 0.1 * moved, (group, float(apart / moved))
