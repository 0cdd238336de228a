"""Precision, fused AdamW, compile and pinned loading of the local trainers, on a CPU (no GPU in CI).

bf16 is forced with ``train.precision=bf16``: CPU autocast runs the same
bf16 matmuls a GPU would (slower), so the numerics are tested here; the speed
is measured by ``benchmarks/gpu_check.sh`` on a GPU machine.
"""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from fedmri.client.privacy.gate import PrivacyGate
from fedmri.client.site import load_site
from fedmri.client.trainers import TrainRequest, parse_run_config
from fedmri.client.trainers import speed as speed_module
from fedmri.client.trainers.align import run_align
from fedmri.client.trainers.batches import load_batches
from fedmri.client.trainers.optim import adamw, decay_groups, local_step, round_optimizer
from fedmri.client.trainers.pretrain import run_pretrain
from fedmri.client.trainers.speed import Speed, resolve_precision
from fedmri.config import load_config
from fedmri.errors import ConfigError
from fedmri.ssl import SSLMetaArch
from fedmri.wire import select, stage_groups

pytestmark = pytest.mark.usefixtures("one_thread")

# How far a bf16 loss may sit from the fp32 loss of the same step: bf16 keeps 8 bits
# of mantissa (~0.4% per rounding); the losses measured here differ by < 1%.
BF16_LOSS_MARGIN = 0.05


def _with_train(run_yaml: str, **train: object) -> str:
    return OmegaConf.to_yaml(OmegaConf.merge(parse_run_config(run_yaml), {"train": train}))


def _round(trainer, site_file, initial, request_values, stage, run_yaml, train=None, privacy=None, **overrides):
    text = _with_train(run_yaml, **(train or {}))
    request = TrainRequest.from_config(request_values(stage, fedmri_config=text, **overrides))
    run_cfg = parse_run_config(text)
    down = select(initial, stage_groups(stage, run_cfg).down)
    site = load_site(site_file)
    gate = privacy(site, request) if privacy is not None else None
    return trainer(site, run_cfg, down, request, privacy=gate)


# --- the setting ---------------------------------------------------------------------------------


def test_the_train_section_defaults_to_auto_precision_and_no_compile() -> None:
    cfg = load_config("micro")
    assert cfg.train.precision == "auto" and cfg.train.compile is False
    assert load_config("micro", overrides=["train.precision=bf16", "train.compile=true"]).train.compile is True


def test_auto_is_fp32_on_a_cpu_and_bf16_on_a_cuda_gpu_with_bf16_tensor_cores(monkeypatch) -> None:
    assert resolve_precision("auto", "cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # H100
    assert resolve_precision("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_precision("auto", "cuda:1") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # V100: emulated bf16
    assert resolve_precision("auto", "cuda") == torch.float32
    for device in ("cpu", "cuda"):
        assert resolve_precision("fp32", device) == torch.float32
        assert resolve_precision("bf16", device) == torch.bfloat16


def test_an_unknown_precision_is_a_config_error_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match="train.precision 'fp16' is not one of auto, fp32, bf16"):
        resolve_precision("fp16", "cpu")


def test_a_private_round_runs_fp32_uncompiled_and_says_so(caplog) -> None:
    train = OmegaConf.create({"precision": "bf16", "compile": True})
    with caplog.at_level(logging.INFO, logger="fedmri.client.trainers.speed"):
        speed = Speed.for_round(train, torch.device("cpu"), "pretrain", private=True)
    assert speed == Speed(torch.device("cpu"))
    assert "DP-SGD rounds run in fp32, uncompiled" in caplog.text
    assert Speed.for_round(train, torch.device("cpu"), "pretrain") == Speed(torch.device("cpu"), torch.bfloat16, True)


def test_batches_are_pinned_for_a_cuda_device_only() -> None:
    assert Speed(torch.device("cuda")).pin_memory and not Speed(torch.device("cpu")).pin_memory


def test_adamw_keeps_torchs_default_for_cpu_parameters() -> None:
    optimizer = adamw(decay_groups(torch.nn.Linear(4, 4).named_parameters()))
    assert not optimizer.defaults["fused"]


def test_a_collating_loader_yields_the_stacked_draws_of_the_list_loader() -> None:
    data = [{"image": torch.full((1, 2, 2, 2), float(i))} for i in range(5)]
    draw = lambda sample, seed: sample["image"] + seed % 7  # noqa: E731 -- a seeded stand-in for augmentation
    batches = [[0, 1], [4, 2], [3, 0]]
    listed = list(load_batches(data, batches, draw, seed=3))
    stacked = list(load_batches(data, batches, draw, seed=3, collate=torch.stack))
    assert all(torch.equal(torch.stack(a), b) for a, b in zip(listed, stacked))


# --- bf16 steps: the numerics ----------------------------------------------------------------------


def _ssl_steps(cfg, speed: Speed, steps: int) -> tuple[SSLMetaArch, list[float], torch.optim.Optimizer]:
    """``steps`` pretrain steps on one fixed batch of random crops, as run_pretrain takes them."""
    torch.manual_seed(0)
    meta = SSLMetaArch(cfg).train()
    s, g = cfg.ssl, cfg.ssl.global_crops_size
    n = (g // cfg.model.patch_size) ** 3
    crops = {"global_crops": torch.rand(4, 1, g, g, g),
             "local_crops": torch.rand(2 * s.local_crops_number, 1, s.local_crops_size, s.local_crops_size,
                                       s.local_crops_size)}
    masks = torch.rand(4, n) < 0.3
    request = SimpleNamespace(lr=1e-3, weight_decay=0.04, proximal_mu=0.0)
    optimizer, proximal = round_optimizer(meta.param_groups(), meta.student.named_parameters(), request)
    params = [p for p in meta.student.parameters() if p.requires_grad]
    losses = []
    for _ in range(steps):
        with speed.autocast():
            total = sum(meta(crops, masks, 0.04).values())
        losses.append(float(total.detach()))
        local_step(optimizer, total, {}, proximal, (params, 3.0))
        meta.update_teacher(0.99)
    return meta, losses, optimizer


def test_bf16_pretrain_steps_keep_fp32_weights_and_learn_as_fp32_does() -> None:
    cfg = load_config("micro")
    _, fp32, _ = _ssl_steps(cfg, Speed(torch.device("cpu")), 6)
    meta, bf16, optimizer = _ssl_steps(cfg, Speed(torch.device("cpu"), torch.bfloat16), 6)
    assert all(math.isfinite(x) for x in bf16)
    # Step 1 sees the same weights: only rounding differs. Later steps are compared with
    # their own start, not step by step: AdamW's first update is about lr * sign(gradient),
    # so rounding that flips a near-zero gradient moves that weight the full step the
    # other way, and the trajectories part (measured: 9.2 -> 10.3 / 11.3 at step 2).
    assert bf16[0] != fp32[0]  # autocast did run
    assert abs(bf16[0] - fp32[0]) <= BF16_LOSS_MARGIN * abs(fp32[0]), (bf16, fp32)
    # Both fall by about half within 6 steps on this fixed batch (measured: 9.1 -> 4.5).
    assert fp32[-1] < 0.8 * fp32[0] and bf16[-1] < 0.8 * bf16[0], (bf16, fp32)
    # Master weights, their gradients, AdamW's moments and the centres stay fp32.
    assert {p.dtype for p in meta.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in meta.student.parameters() if p.grad is not None} == {torch.float32}
    assert {v.dtype for st in optimizer.state.values() for k, v in st.items() if k != "step"} == {torch.float32}
    assert {b.dtype for b in meta.buffers()} == {torch.float32}


@pytest.mark.parametrize(("trainer", "stage", "losses"), [
    (run_pretrain, "pretrain", ("dino_loss", "ibot_loss", "koleo_loss", "loss")),
    (run_align, "align", ("align_loss",)),
], ids=["pretrain", "align"])
def test_a_bf16_round_returns_finite_fp32_weights_near_the_fp32_loss(
        trainer, stage, losses, site_file, initial, request_values, run_yaml) -> None:
    # One step: its loss is taken on the weights as they came down, so only rounding differs.
    up32, m32 = _round(trainer, site_file, initial, request_values, stage, run_yaml, local_steps=1)
    up16, m16 = _round(trainer, site_file, initial, request_values, stage, run_yaml,
                       {"precision": "bf16"}, local_steps=1)
    assert list(up16) == list(up32)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in up16.values())
    assert m16[losses[-1]] != m32[losses[-1]]  # the trainer ran under autocast
    for key in losses:
        assert abs(m16[key] - m32[key]) <= BF16_LOSS_MARGIN * abs(m32[key]), (key, m16, m32)


def test_a_private_round_ignores_bf16_and_compile(site_file, initial, request_values, run_yaml, tmp_path) -> None:
    dp = {"dp": True, "dp_noise_multiplier": 1.0, "dp_max_grad_norm": 1.0, "local_steps": 1}

    def gate(name):
        return lambda site, request: PrivacyGate(site, request, ledger_path=tmp_path / f"{name}.sqlite")

    up32, m32 = _round(run_pretrain, site_file, initial, request_values, "pretrain", run_yaml,
                       privacy=gate("a"), **dp)
    up16, m16 = _round(run_pretrain, site_file, initial, request_values, "pretrain", run_yaml,
                       {"precision": "bf16", "compile": True}, privacy=gate("b"), **dp)
    assert m16 == m32 and all(torch.equal(up16[k], up32[k]) for k in up32)


# --- torch.compile ---------------------------------------------------------------------------------


def test_a_compiled_pretrain_round_traces_the_encoders_and_matches_eager(
        site_file, initial, request_values, run_yaml, monkeypatch) -> None:
    # The eager backend traces with dynamo as inductor would, without generating code (seconds, not minutes).
    from torch._dynamo.utils import counters

    monkeypatch.setattr(speed_module, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    counters.clear()
    up, metrics = _round(run_pretrain, site_file, initial, request_values, "pretrain", run_yaml,
                         {"compile": True}, local_steps=2)
    assert counters["stats"]["unique_graphs"] >= 2  # global and local crops at least
    eager, eager_metrics = _round(run_pretrain, site_file, initial, request_values, "pretrain", run_yaml,
                                  local_steps=2)
    assert metrics["loss"] == pytest.approx(eager_metrics["loss"], rel=1e-4)
    assert all(torch.allclose(up[k], eager[k], atol=1e-5) for k in eager)
    torch._dynamo.reset()


# --- on a GPU (skipped in CI; benchmarks/gpu_check.sh runs it) ---------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; benchmarks/gpu_check.sh runs it")
@pytest.mark.parametrize("stage", ["pretrain", "align"])
def test_a_cuda_round_runs_bf16_with_fused_adamw_near_the_cpu_fp32_loss(
        stage, site_file, initial, request_values, run_yaml, monkeypatch) -> None:
    from fedmri.client.trainers import batches, optim

    trainer = run_pretrain if stage == "pretrain" else run_align
    seen: dict[str, object] = {}
    load = batches.load_batches

    def spy_adamw(groups):
        optimizer = adamw(groups)
        seen["fused"] = optimizer.defaults["fused"]
        return optimizer

    def spy_load(*args, **kwargs):
        seen["pin_memory"] = kwargs.get("pin_memory", args[6] if len(args) > 6 else False)
        return load(*args, **kwargs)

    monkeypatch.setattr(optim, "adamw", spy_adamw)
    monkeypatch.setattr(f"fedmri.client.trainers.{stage}.load_batches", spy_load)
    text = _with_train(run_yaml)
    request = TrainRequest.from_config(request_values(stage, fedmri_config=text, local_steps=1))
    run_cfg = parse_run_config(text)
    down = select(initial, stage_groups(stage, run_cfg).down)
    up_gpu, m_gpu = trainer(load_site(site_file, ["device=cuda"]), run_cfg, down, request)
    assert seen == {"fused": True, "pin_memory": True}
    assert resolve_precision("auto", "cuda") == torch.bfloat16  # an Ampere or later GPU
    _, m_cpu = trainer(load_site(site_file), run_cfg, down, request)
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 and torch.isfinite(v).all()
               for v in up_gpu.values())
    assert abs(m_gpu["loss"] - m_cpu["loss"]) <= BF16_LOSS_MARGIN * abs(m_cpu["loss"]), (m_gpu, m_cpu)
