"""The coordinator's pipeline driven in-process over the real ClientApp (no Ray, no SuperLink)."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, RecordDict
from omegaconf import OmegaConf

from fedmri import wire
from fedmri.server.config import load_federation
from fedmri.server.pipeline import Pipeline, checkpoint_mismatch

from helpers.local_grid import LocalGrid


def _fed(tmp_path: Path, stages: list[dict], **extra: object) -> object:
    # The micro preset (tiny's 64^3 volumes, a 2-block 32-wide encoder) keeps a round to seconds.
    body = {"name": "t", "preset": "micro", "min_sites": 2, "run_root": str(tmp_path / "runs"),
            "stages": stages, "export": False, "wait_for_sites_s": 5} | extra
    return load_federation(text=OmegaConf.to_yaml(OmegaConf.create(body)))


def _grid(sites: list, tamper=None) -> LocalGrid:
    return LocalGrid({101 + i: site_file for i, (_, site_file, _) in enumerate(sites)}, tamper)


def assert_tensorboard_matches_metrics(run: Path) -> None:
    """The run's TensorBoard events, read back with TensorBoard's reader, hold metrics.jsonl row for row."""
    import math

    from fedmri.server.tracking import read_rows, scalar_fields

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    got = {(r["server_round"], r["site"], r["stage"]): r for r in read_rows(run)}
    assert len(got) == len(rows) and len(rows) > 0
    for row in rows:
        back = got[(row["server_round"], row["site"], row["stage"])]
        assert (back["status"], back.get("reason")) == (row["status"], row.get("reason")), row
        want = {k: v for k, v in scalar_fields(row).items() if math.isfinite(v)}
        assert set(back) - {"site", "stage", "server_round", "status", "reason"} == set(want), row
        for key, value in want.items():  # TensorBoard keeps float32
            assert back[key] == pytest.approx(value, rel=1e-6, abs=1e-6), (row, key)


def assert_mlflow_matches(run: Path, store: Path) -> None:
    """The MLflow run (file store) holds metrics.jsonl's numbers row for row, the configs and the reports."""
    import math

    from fedmri.server.tracking import read_mlflow_rows, scalar_fields

    client, run_id, back = read_mlflow_rows(run)
    assert store.is_dir()
    got = {(r["server_round"], r["site"], r["stage"]): r for r in back}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        want = {k: v for k, v in scalar_fields(row).items() if math.isfinite(v)}
        if not want:
            continue  # a row with no number (a decline) has no metric in MLflow
        have = got.pop((row["server_round"], row["site"], row["stage"]))
        assert set(have) - {"site", "stage", "server_round"} == set(want), row
        for key, value in want.items():
            assert have[key] == pytest.approx(value, rel=1e-9, abs=1e-9), (row, key)
    assert not got  # nothing MLflow holds that metrics.jsonl does not
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == "t"
    params = mlflow_run.data.params
    assert params["federation.preset"] == "micro" and params["federation.stages.pretrain.rounds"] == "2"
    assert params["config.model.embed_dim"] == "32"
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "encoder")}
    assert {"privacy.md", "results.json", "encoder/config.json"} <= artifacts


PRETRAIN = {"name": "pretrain", "rounds": 2, "local_steps": 2}
ALIGN = {"name": "align", "rounds": 1, "local_steps": 2}
EVALUATE = {"name": "evaluate"}


@pytest.mark.slow
def test_whole_pipeline_in_process(tmp_path: Path, federation_sites: list) -> None:
    fed = _fed(tmp_path, [PRETRAIN, ALIGN, EVALUATE], export=True, tracking={"mlflow": {"enabled": True}})
    grid = _grid(federation_sites)
    pipeline = Pipeline(fed)
    results = pipeline.run_all(grid)
    initial = wire.initial_state(pipeline.cfg)

    # The global encoder, the server-side teacher and the projections moved.
    for group in (wire.ENCODER, wire.TEACHER, wire.PROJECTIONS):
        keys = [k for k in initial if wire.group_of(k) == group]
        assert any(not torch.equal(initial[k], pipeline.state[k]) for k in keys), group
    assert all(torch.isfinite(v).all() for v in pipeline.state.values())

    # Only each stage's groups travelled, down and up.
    for msg in grid.sent:
        if msg.metadata.message_type == "query":
            assert not msg.content.array_records
            continue
        stage = msg.content.config_records["config"]["stage"]
        groups = wire.stage_groups(stage, pipeline.cfg)
        carried = set(wire.groups_in(wire.from_record(msg.content["arrays"])))
        named = set(msg.content.config_records["digests"]) if "digests" in msg.content else set()
        assert carried <= set(groups.down) and carried | named == set(groups.down), stage
    for reply in grid.received:
        if reply.metadata.message_type in ("train", "evaluate"):
            arrays = reply.content.array_records.get("arrays")
            groups_up = set(wire.groups_in(wire.from_record(arrays))) if arrays is not None else set()
            if reply.metadata.message_type == "evaluate":
                assert groups_up == set()
            else:
                assert groups_up in ({"encoder", "dino_head", "center"}, {"encoder", "projections", "logit_scale"})

    run = tmp_path / "runs" / "t"
    for name in ("federation.yaml", "config.yaml", "metrics.jsonl", "results.json", "state.json",
                 "plots/pretrain.png", "plots/align.png", "encoder"):
        assert (run / name).exists(), name
    assert sorted(p.name for p in (run / "ckpt").glob("round-*")) == ["round-0003", "round-0004"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["server_round"] for r in rows} == {1, 2, 3, 4}
    assert {r["site"] for r in rows if r["status"] == "ok"} == {"site-01", "site-02", "site-03"}
    assert results["evaluation"]["num-examples"] > 0
    assert sorted(results["per_site"]) == ["site-01", "site-02", "site-03"]
    assert json.loads((run / "state.json").read_text())["status"] == "finished"
    assert sorted(p.name for p in (run / "tensorboard").iterdir()) == ["all", "site-01", "site-02", "site-03"]
    assert_tensorboard_matches_metrics(run)
    assert_mlflow_matches(run, tmp_path / "runs" / "mlruns")


def _tamper_with(node: int, how: str):
    def tamper(n: int, reply: Message) -> Message | None:
        if n != node or reply.metadata.message_type != "train" or reply.has_error():
            return reply
        arrays = wire.from_record(reply.content["arrays"])
        key = next(k for k in arrays if wire.group_of(k) == "encoder" and arrays[k].ndim == 2)
        if how == "nan":
            arrays[key][0, 0] = float("nan")
        elif how == "shape":
            arrays[key] = arrays[key][:, :-1]
        elif how == "norm":
            arrays = {k: v * 1000.0 for k, v in arrays.items()}
        content = RecordDict({"arrays": ArrayRecord({k: v.contiguous() for k, v in arrays.items()}),
                              "metrics": reply.content["metrics"]})
        return Message(content=content, metadata=copy.copy(reply.metadata))  # same sender, corrupted payload
    return tamper


@pytest.mark.slow
@pytest.mark.parametrize("how", ["nan", "shape", "norm"])
def test_bad_update_is_rejected_and_the_round_goes_on(tmp_path: Path, federation_sites: list, how: str) -> None:
    fed = _fed(tmp_path, [{"name": "pretrain", "rounds": 1, "local_steps": 1}])
    pipeline = Pipeline(fed)
    grid = _grid(federation_sites, _tamper_with(103, how))
    pipeline.run_all(grid)
    outcome = pipeline.outcomes[0]
    assert list(outcome.rejected) == [103], outcome
    assert outcome.accepted == [101, 102] and outcome.updated
    # The live view ends the round with the rejection and its reason (fedmri status --watch).
    shown = json.loads((tmp_path / "runs" / "t" / "round.json").read_text())["sites"]
    assert shown["site-03"]["status"] == "rejected" and shown["site-03"]["reason"] == outcome.rejected[103]
    assert shown["site-01"]["status"] == shown["site-02"]["status"] == "replied"
    assert all(torch.isfinite(v).all() for v in pipeline.state.values())
    rows = [json.loads(line) for line in (tmp_path / "runs/t/metrics.jsonl").read_text().splitlines()]
    rejected = [r for r in rows if r["status"] == "rejected"]
    assert len(rejected) == 1 and rejected[0]["site"] == "site-03" and rejected[0]["reason"]


@pytest.mark.slow
def test_a_site_that_never_answers_is_left_out(tmp_path: Path, federation_sites: list) -> None:
    # The round waits round_timeout_s for the silent site.
    fed = _fed(tmp_path, [{"name": "pretrain", "rounds": 1, "local_steps": 1}], round_timeout_s=3)
    pipeline = Pipeline(fed)
    drop = lambda n, reply: None if n == 102 and reply.metadata.message_type == "train" else reply  # noqa: E731
    pipeline.run_all(_grid(federation_sites, drop))
    outcome = pipeline.outcomes[0]
    assert list(outcome.failed) == [102] and "no reply" in outcome.failed[102]
    assert outcome.accepted == [101, 103] and outcome.updated


@pytest.mark.slow
def test_updates_spilled_to_disk_give_the_weights_of_updates_kept_in_memory(tmp_path: Path,
                                                                            federation_sites: list) -> None:
    stages = [{"name": "pretrain", "rounds": 2, "local_steps": 1}]
    kept = Pipeline(_fed(tmp_path / "a", stages))
    kept.run_all(_grid(federation_sites))
    spilled = Pipeline(_fed(tmp_path / "b", stages, update_memory_mb=0))
    seen: list[list[str]] = []
    # During the round the spilled updates are on disk in the run folder; after it, gone.
    spilled.on_round_end = lambda outcome: seen.append(sorted(p.name for p in spilled.run.path.glob("updates-*")))
    spilled.run_all(_grid(federation_sites))
    assert [(o.updates_in_memory, o.updates_spilled) for o in kept.outcomes] == [(3, 0), (3, 0)]
    assert [(o.updates_in_memory, o.updates_spilled) for o in spilled.outcomes] == [(0, 3), (0, 3)]
    assert seen == [[], []]
    for key, value in kept.state.items():
        assert torch.equal(value, spilled.state[key]), key


@pytest.mark.slow
def test_too_few_useful_replies_leave_the_weights_unchanged(tmp_path: Path, federation_sites: list) -> None:
    fed = _fed(tmp_path, [{"name": "pretrain", "rounds": 1, "local_steps": 1}], min_sites=3)
    pipeline = Pipeline(fed)
    pipeline.run_all(_grid(federation_sites, _tamper_with(101, "nan")))
    initial = wire.initial_state(pipeline.cfg)
    assert not pipeline.outcomes[0].updated
    assert all(torch.equal(initial[k], pipeline.state[k]) for k in initial)


@pytest.mark.slow
def test_resume_after_a_stop_gives_the_uninterrupted_weights(tmp_path: Path, federation_sites: list,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    stages = [{"name": "pretrain", "rounds": 2, "local_steps": 1,
               "strategy": {"name": "fedadam", "eta": 0.01, "tau": 0.001}},
              {"name": "align", "rounds": 2, "local_steps": 1}]
    straight = Pipeline(_fed(tmp_path / "a", stages))
    straight.run_all(_grid(federation_sites))

    class Stopped(Exception):
        """In place of a kill right after round 3's checkpoint."""

    def stop_after_round_3(outcome) -> None:
        if outcome.server_round == 3:
            raise Stopped

    with pytest.raises(Stopped):
        Pipeline(_fed(tmp_path / "b", stages), on_round_end=stop_after_round_3).run_all(_grid(federation_sites))
    resumed = Pipeline(_fed(tmp_path / "b", stages, resume=True))
    resumed.run_all(_grid(federation_sites))

    assert len(resumed.outcomes) == 1  # only round 4 ran again
    assert set(resumed.state) == set(straight.state)
    for k in straight.state:
        assert torch.equal(straight.state[k], resumed.state[k]), k
    rows = [json.loads(line) for line in (tmp_path / "b/runs/t/metrics.jsonl").read_text().splitlines()]
    assert sorted({r["server_round"] for r in rows}) == [1, 2, 3, 4]
    # The resumed run's events: round 4 once, as metrics.jsonl has it.
    assert_tensorboard_matches_metrics(tmp_path / "b/runs/t")


@pytest.mark.slow
def test_coordinator_killed_mid_run_resumes_to_the_uninterrupted_weights(tmp_path: Path,
                                                                        federation_sites: list) -> None:
    """A real SIGKILL of the coordinator process after round 2, then --resume."""
    stages = [{"name": "pretrain", "rounds": 3, "local_steps": 3,
               "strategy": {"name": "fedadam", "eta": 0.01, "tau": 0.001}}]
    straight = Pipeline(_fed(tmp_path / "a", stages))
    straight.run_all(_grid(federation_sites))

    fed_file, sites_file = tmp_path / "b.yaml", tmp_path / "sites.json"
    fed_file.write_text(OmegaConf.to_yaml(_fed(tmp_path / "b", stages)))
    sites_file.write_text(json.dumps({101 + i: str(f) for i, (_, f, _) in enumerate(federation_sites)}))
    latest = tmp_path / "b/runs/t/ckpt/LATEST"
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "run_coordinator.py"), str(fed_file),
                             str(sites_file)], start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (latest.is_file() and latest.read_text().strip() == "round-0002"):
            assert proc.poll() is None, "the coordinator ended before it could be killed"
            assert time.monotonic() < deadline, "round 2 never completed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    resumed = Pipeline(_fed(tmp_path / "b", stages, resume=True))
    resumed.run_all(_grid(federation_sites))

    assert [o.server_round for o in resumed.outcomes] == [3]
    for k in straight.state:
        assert torch.equal(straight.state[k], resumed.state[k]), k


def test_round_request_carries_schedules_and_strategy_settings(tmp_path: Path) -> None:
    fed = _fed(tmp_path, [{"name": "pretrain", "rounds": 4, "local_steps": 3},
                          {"name": "align", "rounds": 2, "local_steps": 3,
                           "strategy": {"name": "fedprox", "proximal_mu": 0.5}}])
    pipeline = Pipeline(fed)
    first, last = pipeline.round_request(0, 1, 1).to_config(), pipeline.round_request(0, 4, 4).to_config()
    assert first["stage"] == "pretrain" and first["local-steps"] == 3
    assert {"lr", "weight-decay", "teacher-momentum", "teacher-temp"} <= set(first)
    assert OmegaConf.create(first["fedmri-config"]).model.embed_dim == 32
    align = pipeline.round_request(1, 2, 6).to_config()
    assert align["proximal-mu"] == 0.5 and align["lr"] < pipeline.cfg.align.lr
    assert np.isfinite(last["lr"])


def test_evaluation_is_told_which_stages_came_before_it(tmp_path: Path) -> None:
    # Zero-shot findings are scored only after an align stage, the heads only after a heads stage.
    stages = [{"name": "pretrain", "rounds": 1, "local_steps": 1}, {"name": "evaluate", "rounds": 1},
              {"name": "align", "rounds": 1, "local_steps": 1}, {"name": "evaluate", "rounds": 1}]
    pipeline = Pipeline(_fed(tmp_path, stages))
    before, after = pipeline.round_request(1, 1, 2).to_config(), pipeline.round_request(3, 1, 4).to_config()
    assert (before["evaluate-aligned"], after["evaluate-aligned"]) == (False, True)
    assert before["evaluate-heads"] is after["evaluate-heads"] is False


def test_site_level_dp_draws_each_site_on_its_own(tmp_path: Path) -> None:
    # Under central site DP with fraction q < 1 each site is drawn with probability q (Poisson, as the
    # accountant assumes), with no top-up to min_sites; without DP, a fixed-size sample of at least min_sites.
    dp_stage = {"name": "pretrain", "rounds": 1, "local_steps": 1, "fraction": 0.3,
                "site_dp": {"mode": "central", "noise_multiplier": 1.0, "clip_norm": 1.0}}
    nodes = list(range(1, 1001))
    dp = Pipeline(_fed(tmp_path / "dp", [dp_stage], min_sites=2))
    sizes = [len(dp._sample(nodes, 0)) for _ in range(20)]
    assert dp._site_rate(0) == 0.3
    assert len(set(sizes)) > 1 and abs(np.mean(sizes) - 300) < 30  # binomial(1000, 0.3): std 14.5
    assert min(len(dp._sample([1, 2, 3], 0)) for _ in range(50)) < 2  # no top-up to min_sites
    plain = Pipeline(_fed(tmp_path / "plain", [dp_stage | {"site_dp": {"mode": "off"}}], min_sites=2))
    assert plain._site_rate(0) == 1.0
    assert {len(plain._sample(nodes, 0)) for _ in range(5)} == {300}
    assert {len(plain._sample([1, 2, 3], 0)) for _ in range(5)} == {2}


def test_a_checkpoint_of_another_config_is_named_by_its_first_differing_key() -> None:
    from fedmri.config import load_config

    cfg = load_config("micro")
    now = wire.initial_state(cfg)
    assert checkpoint_mismatch(now, now) == ""
    # A run started before the heads shared a trunk: its checkpoint has no head.trunk group.
    before = wire.initial_state(OmegaConf.merge(cfg, {"heads": {"trunk_dim": 0}}))
    message = checkpoint_mismatch(before, now)
    assert message.startswith("it lacks head.trunk/") and "heads.trunk_dim=0" in message, message
    assert checkpoint_mismatch(now, before).startswith("it has head.trunk/")
    key = next(iter(now))
    reshaped = now | {key: torch.zeros(3)}
    assert checkpoint_mismatch(reshaped, now) == f"{key} is (3,) there, {tuple(now[key].shape)} here"
