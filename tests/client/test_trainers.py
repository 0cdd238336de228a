"""The stage trainers as plain functions on a tiny indexed hospital (no Flower)."""

from __future__ import annotations

import math

import pytest
import torch

from fedmri.client.site import load_site
from fedmri.client.trainers import DeclineError, RequestError, TrainRequest, parse_run_config
from fedmri.client.trainers.align import run_align
from fedmri.client.trainers.evaluate import run_evaluate
from fedmri.client.trainers.pretrain import run_pretrain
from fedmri.wire import ENCODER, group_of, select, stage_groups

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bare_site_file(tmp_path_factory: pytest.TempPathFactory, small_cfg):
    """One patient, two series, no reports: everything in train, nothing to align or validate on."""
    from helpers.site_factory import make_site

    from fedmri.data.indexer import index_site

    root = tmp_path_factory.mktemp("bare-site")
    site = make_site(root / "hospital", n_patients=1, series_per_patient=2, seed=9, with_mask=False)
    site.reports.write_text(site.reports.read_text().splitlines()[0] + "\n")
    index_site(site.dicom, site.reports, root / "catalog", cfg=small_cfg)
    (root / "site.yaml").write_text("name: site-b\ncatalog: catalog\n")
    return root / "site.yaml"


def _call(trainer, site_file, initial, request_values, stage, site_overrides=(), **overrides):
    request = TrainRequest.from_config(request_values(stage, **overrides))
    run_cfg = parse_run_config(request.fedmri_config)
    down = select(initial, stage_groups(stage, run_cfg).down)
    return trainer(load_site(site_file, list(site_overrides)), run_cfg, down, request), down, run_cfg


def _distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))


def test_pretrain_returns_exactly_the_up_groups_changed_and_finite(site_file, initial, request_values) -> None:
    (up, metrics), down, run_cfg = _call(run_pretrain, site_file, initial, request_values, "pretrain")
    expected = select(initial, stage_groups("pretrain", run_cfg).up)
    assert list(up) == list(expected)
    assert {group_of(k) for k in up} == {"encoder", "dino_head", "center"}
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in up.values())
    assert _distance(select(up, [ENCODER]), select(down, [ENCODER])) > 0
    assert metrics["num-examples"] == 4 * 4 and metrics["steps"] == 4
    assert {"dino_loss", "ibot_loss", "koleo_loss", "loss"} <= set(metrics)
    assert metrics["loss"] == pytest.approx(metrics["dino_loss"] + metrics["ibot_loss"] + metrics["koleo_loss"])
    assert "proximal_loss" not in metrics


def test_pretrain_rerun_is_bit_identical_and_the_round_changes_the_draw(site_file, initial, request_values) -> None:
    (a, ma), _, _ = _call(run_pretrain, site_file, initial, request_values, "pretrain", local_steps=3)
    (b, mb), _, _ = _call(run_pretrain, site_file, initial, request_values, "pretrain", local_steps=3)
    assert ma == mb and all(torch.equal(a[k], b[k]) for k in a)
    # Loading in a worker process draws the same crops: seeds are fixed per draw, up front.
    (w, _), _, _ = _call(run_pretrain, site_file, initial, request_values, "pretrain", ["num_workers=1"],
                         local_steps=3)
    assert all(torch.equal(a[k], w[k]) for k in a)
    (c, _), _, _ = _call(run_pretrain, site_file, initial, request_values, "pretrain", local_steps=3, round=2)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_fedprox_keeps_the_encoder_near_the_global_weights(site_file, initial, request_values) -> None:
    (free, _), down, _ = _call(run_pretrain, site_file, initial, request_values, "pretrain", local_steps=8)
    (held, metrics), _, _ = _call(run_pretrain, site_file, initial, request_values, "pretrain", local_steps=8,
                                  proximal_mu=1e4)
    glob = select(down, [ENCODER])
    assert _distance(select(held, [ENCODER]), glob) < 0.5 * _distance(select(free, [ENCODER]), glob)
    assert metrics["proximal_loss"] > 0


def test_pretrain_declines_a_batch_too_small_for_koleo(site_file, initial, request_values) -> None:
    with pytest.raises(DeclineError, match="batch_size 1 is below the 2 samples"):
        _call(run_pretrain, site_file, initial, request_values, "pretrain", ["batch_size=1"])


def test_weights_of_another_model_are_a_request_error(site_file, initial, request_values) -> None:
    request = TrainRequest.from_config(request_values("pretrain"))
    run_cfg = parse_run_config(request.fedmri_config)
    down = select(initial, stage_groups("pretrain", run_cfg).down)
    down.pop(next(iter(down)))
    with pytest.raises(RequestError, match="1 missing"):
        run_pretrain(load_site(site_file), run_cfg, down, request)


def _run_yaml_with(run_yaml: str, **align: object) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.merge(parse_run_config(run_yaml), {"align": align}))


def test_align_returns_the_up_groups_changed_and_finite(site_file, initial, request_values) -> None:
    (up, metrics), down, run_cfg = _call(run_align, site_file, initial, request_values, "align", local_steps=3)
    assert list(up) == list(select(initial, stage_groups("align", run_cfg).up))
    assert {group_of(k) for k in up} == {"encoder", "projections", "logit_scale"}
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in up.values())
    assert not torch.equal(up["projections/image_proj.weight"], down["projections/image_proj.weight"])
    assert _distance(select(up, [ENCODER]), select(down, [ENCODER])) > 0
    assert metrics["num-examples"] == 3 * 4 and metrics["steps"] == 3
    assert math.isfinite(metrics["align_loss"]) and metrics["logit_scale"] > 0


def test_align_lowers_its_loss_from_round_to_round(site_file, run_yaml, request_values) -> None:
    # Projections only, on a frozen encoder: the 8 training pairs are learnt within a few steps,
    # while a random encoder that also trains moves the loss by less than its noise.
    from fedmri.wire import initial_state

    text = _run_yaml_with(run_yaml, freeze_image_encoder=True)
    run_cfg = parse_run_config(text)
    state = select(initial_state(run_cfg), stage_groups("align", run_cfg).down)
    site = load_site(site_file)
    values = request_values("align", local_steps=10, lr=1e-2, fedmri_config=text)
    up1, m1 = run_align(site, run_cfg, state, TrainRequest.from_config(values))
    assert {group_of(k) for k in up1} == {"projections", "logit_scale"}
    up2, m2 = run_align(site, run_cfg, state | up1, TrainRequest.from_config(values | {"round": 2}))
    assert m2["align_loss"] < m1["align_loss"] - 0.1, (m1, m2)


def test_align_with_trainable_text_layers_ships_them(site_file, run_yaml, request_values) -> None:
    from fedmri.client.trainers.align import text_tower
    from fedmri.export import weights_digest
    from fedmri.wire import initial_state

    text = _run_yaml_with(run_yaml, text_trainable_layers=1, freeze_image_encoder=True)
    run_cfg = parse_run_config(text)
    down = select(initial_state(run_cfg), stage_groups("align", run_cfg).down)
    request = TrainRequest.from_config(request_values("align", local_steps=2, fedmri_config=text))
    up, _ = run_align(load_site(site_file), run_cfg, down, request)
    assert {group_of(k) for k in up} == {"text", "projections", "logit_scale"}
    assert any(not torch.equal(up[k], down[k]) for k in up if k.startswith("text/"))
    # The cached tower every later round starts from was not trained in place.
    tower = text_tower(run_cfg)
    assert weights_digest(tower.model) == tower.source_digest
    assert all(not p.requires_grad for p in tower.parameters())


def test_align_declines_without_two_distinct_reports(bare_site_file, initial, request_values) -> None:
    with pytest.raises(DeclineError, match="2 different reports"):
        _call(run_align, bare_site_file, initial, request_values, "align")


def test_evaluate_reports_losses_and_retrieval_in_range(site_file, initial, request_values) -> None:
    (up, metrics), _, _ = _call(run_evaluate, site_file, initial, request_values, "evaluate", split="train")
    assert up == {}  # an evaluation sends no weights
    assert metrics["num-examples"] == 8 and metrics["num-pairs"] == 8
    for key in ("train_dino_loss", "train_ibot_loss", "train_koleo_loss", "train_loss"):
        assert math.isfinite(metrics[key])
    for direction in ("i2t", "t2i"):
        for k in (1, 5, 10):
            assert 0.0 <= metrics[f"{direction}_r{k}"] <= 1.0
        assert 1.0 <= metrics[f"{direction}_medr"] <= 8
    assert metrics["i2t_r10"] == 1.0  # only 4 distinct reports to rank
    # Fixed crops: another round scores the same model identically.
    (_, again), _, _ = _call(run_evaluate, site_file, initial, request_values, "evaluate", split="train", round=5)
    assert again == metrics


def test_evaluate_declines_an_empty_split(bare_site_file, initial, request_values) -> None:
    with pytest.raises(DeclineError, match="val split holds no series"):
        _call(run_evaluate, bare_site_file, initial, request_values, "evaluate")


class _Rows:
    """A dataset stand-in: images whose mean encodes the sequence, and catalog-like rows."""

    def __init__(self, sequences: list[str], regions: list[str]) -> None:
        codes = {s: i for i, s in enumerate(sorted(set(sequences)))}
        self.rows = [{"meta": {"sequence": s, "body_region": r}} for s, r in zip(sequences, regions)]
        self.images = [torch.full((1, 4, 4, 4), float(codes[s])) + 0.01 * i for i, s in enumerate(sequences)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "meta": self.rows[i]["meta"]}


class _MeanEncoder(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict:
        m = x.mean(dim=(1, 2, 3, 4))
        return {"cls": torch.stack([torch.cos(m), torch.sin(m)], dim=1)}  # one direction per sequence


def test_knn_probe_reads_labels_off_features_that_separate_them() -> None:
    from omegaconf import OmegaConf

    from fedmri.client.trainers.evaluate import knn_probe

    ds = _Rows(["t1", "t2", "t1", "t2", "flair", "flair"], ["brain", "brain", "knee", "knee", "spine", "brain"])
    got = knn_probe(_MeanEncoder(), OmegaConf.create({"batch_size": 4}), ds, "train", torch.device("cpu"))
    assert got["knn_sequence_acc"] == 1.0
    assert got["knn_body_region_acc"] < 1.0  # region is not what these features encode


def test_knn_probe_needs_a_reference() -> None:
    from omegaconf import OmegaConf

    from fedmri.client.trainers.evaluate import knn_probe

    got = knn_probe(_MeanEncoder(), OmegaConf.create({"batch_size": 4}), _Rows(["t1"], ["brain"]), "train",
                    torch.device("cpu"))
    assert got == {}


def test_a_dp_round_without_the_apps_privacy_gate_is_refused(site_file, initial, request_values) -> None:
    # Without the gate the round's ε would be neither checked against the budget nor recorded.
    with pytest.raises(RuntimeError, match="needs the ClientApp's PrivacyGate"):
        _call(run_pretrain, site_file, initial, request_values, "pretrain", dp=True, dp_noise_multiplier=1.0)
