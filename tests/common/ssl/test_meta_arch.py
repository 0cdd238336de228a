"""SSLMetaArch: loss terms by weight, view pairing and scaling, centres, EMA, DP flag."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedmri.config import load_config
from fedmri.errors import ConfigError
from fedmri.ssl import SSLMetaArch

TINY = [
    "model.img_size=[16,16,16]", "model.patch_size=8", "model.embed_dim=32", "model.depth=2",
    "model.num_heads=2", "model.layerscale_init=0",
    "ssl.global_crops_size=16", "ssl.local_crops_size=8", "ssl.local_crops_number=2",
    "ssl.head_n_prototypes=20", "ssl.ibot_n_prototypes=12", "ssl.head_hidden_dim=24", "ssl.head_bottleneck_dim=8",
]
B = 3


def make(*overrides: str) -> SSLMetaArch:
    torch.manual_seed(0)
    return SSLMetaArch(load_config("tiny", overrides=[*TINY, *overrides])).train()


def batch(n_local: int = 2) -> tuple[dict, torch.Tensor]:
    torch.manual_seed(1)
    crops = {"global_crops": torch.rand(2 * B, 1, 16, 16, 16),
             "local_crops": torch.rand(n_local * B, 1, 8, 8, 8) if n_local else None}
    masks = torch.zeros(2 * B, 8, dtype=torch.bool)
    masks[0, [0, 3]] = True
    masks[4, [1, 2, 5]] = True
    return crops, masks


@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        ((), {"dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss"}),
        (("ssl.koleo_loss_weight=0",), {"dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss"}),
        (("ssl.ibot_loss_weight=0",), {"dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss"}),
        (("ssl.dino_loss_weight=0",), {"koleo_loss", "ibot_loss"}),
        (("ssl.local_crops_number=0",), {"dino_global_crops_loss", "koleo_loss", "ibot_loss"}),
    ],
)
def test_weights_switch_terms(overrides: tuple[str, ...], keys: set[str]) -> None:
    model = make(*overrides)
    crops, masks = batch(n_local=0 if "ssl.local_crops_number=0" in overrides else 2)
    losses = model(crops, masks, teacher_temp=0.05)
    assert set(losses) == keys
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.student["backbone"].patch_embed.proj.weight.grad is not None


def test_losses_match_a_recomputation_from_the_parts() -> None:
    # Independent recomputation of DINOv2's pairing and scaling: student global
    # view A against teacher view B (never the same view), every local view
    # against both teacher views, averaged over all pairs, times the weights.
    model = make("ssl.dino_loss_weight=0.7", "ssl.ibot_loss_weight=0.3", "ssl.koleo_loss_weight=0.2")
    crops, masks = batch()
    k = 20
    with torch.no_grad():
        t_cls = model.teacher["backbone"](crops["global_crops"])["cls"]
        t_patch = model.teacher["backbone"](crops["global_crops"])["patch"]
        t_probs = F.softmax(model.teacher["dino_head"](t_cls) / 0.05, -1).view(2, B, k)  # centre is 0
        s_glob = model.student["backbone"](crops["global_crops"], masks=masks)
        s_loc = model.student["backbone"](crops["local_crops"])["cls"].view(2, B, -1)
        s_glob_logp = F.log_softmax(model.student["dino_head"](s_glob["cls"]) / 0.1, -1).view(2, B, k)
        s_loc_logp = F.log_softmax(model.student["dino_head"](s_loc) / 0.1, -1)
        ce = lambda t, logp: -(t * logp).sum(-1).mean()  # noqa: E731
        pairs = [ce(t_probs[1], s_glob_logp[0]), ce(t_probs[0], s_glob_logp[1])]
        pairs += [ce(t_probs[g], s_loc_logp[j]) for j in range(2) for g in range(2)]
        dino_expected = 0.7 * torch.stack(pairs).mean()
        koleo = 0.0
        for v in range(2):
            z = F.normalize(s_glob["cls"][v * B:(v + 1) * B], dim=-1)
            d = torch.cdist(z, z) + torch.eye(B) * 10
            koleo += -torch.log(d.min(1).values + 1e-8).mean()
        # iBOT: image 0 has 2 masked tokens, image 4 has 3; 6 images in total.
        t_pp = F.softmax(model.teacher["dino_head"](t_patch[masks]) / 0.05, -1)
        s_pp = F.log_softmax(model.student["dino_head"](s_glob["patch"][masks]) / 0.1, -1)
        per_tok = -(t_pp * s_pp).sum(-1)
        ibot_expected = 0.3 * (per_tok[:2].mean() + per_tok[2:].mean()) / 6
        losses = model(crops, masks, teacher_temp=0.05)
    got_dino = losses["dino_local_crops_loss"] + losses["dino_global_crops_loss"]
    torch.testing.assert_close(got_dino, dino_expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses["koleo_loss"], 0.2 * koleo, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses["ibot_loss"], ibot_expected, rtol=1e-4, atol=1e-6)


def test_separate_ibot_head() -> None:
    model = make("ssl.ibot_separate_head=true")
    assert model.student["ibot_head"].last_layer.weight_v.shape[0] == 12
    assert model.ibot_loss.center.shape == (1, 12)
    crops, masks = batch()
    assert torch.isfinite(model(crops, masks, 0.05)["ibot_loss"])


def test_centres_update_in_training_only() -> None:
    model = make()
    crops, masks = batch()
    model.eval()
    model(crops, masks, 0.05)
    assert model.dino_loss.center.abs().sum() == 0 and model.ibot_loss.center.abs().sum() == 0
    model.train()
    with torch.no_grad():
        t_logits = model.teacher["dino_head"](model.teacher["backbone"](crops["global_crops"])["cls"])
    model(crops, masks, 0.05)
    torch.testing.assert_close(model.dino_loss.center, 0.1 * t_logits.mean(0, keepdim=True))
    assert model.ibot_loss.center.abs().sum() > 0


def test_no_masks_gives_zero_ibot_term() -> None:
    model = make()
    crops, _ = batch()
    assert model(crops, None, 0.05)["ibot_loss"].item() == 0.0


def test_teacher_gets_no_gradients_and_stays_in_eval() -> None:
    model = make("model.drop_path_rate=0.5")
    model.train()
    assert model.student.training and not model.teacher.training
    crops, masks = batch()
    sum(model(crops, masks, 0.05).values()).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert any(p.grad is not None for p in model.student.parameters())


def test_ema_update_of_every_parameter() -> None:
    model = make()
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    before_t = {n: p.clone() for n, p in model.teacher.named_parameters()}
    student = dict(model.student.named_parameters())
    model.update_teacher(0.9)
    assert len(before_t) == len(student) > 0
    for name, p in model.teacher.named_parameters():
        torch.testing.assert_close(p, 0.9 * before_t[name] + 0.1 * student[name])
    model.update_teacher(1.0)  # momentum 1 freezes the teacher
    model.update_teacher(0.0)  # momentum 0 copies the student
    for name, p in model.teacher.named_parameters():
        torch.testing.assert_close(p, student[name])
    with pytest.raises(ValueError, match="momentum"):
        model.update_teacher(1.5)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ((), False),  # KoLeo couples the batch
        (("ssl.koleo_loss_weight=0",), True),
        (("ssl.koleo_loss_weight=0", "ssl.centering=sinkhorn_knopp"), False),
        (("ssl.koleo_loss_weight=0", "ssl.ibot_loss_weight=0"), True),
    ],
)
def test_per_sample_decomposable_follows_active_terms(overrides: tuple[str, ...], expected: bool) -> None:
    assert make(*overrides).per_sample_decomposable is expected


def test_param_groups_cover_the_student_once() -> None:
    model = make()
    groups = model.param_groups(0.2)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.student.parameters())
    by_param = {id(p): g for g in groups for p in g["params"]}
    backbone = model.student["backbone"]
    assert by_param[id(backbone.patch_embed.proj.weight)]["lr_multiplier"] == 0.2
    assert by_param[id(backbone.blocks[0].attn.qkv.weight)]["wd_multiplier"] == 1.0
    for p in (backbone.blocks[0].attn.qkv.bias, backbone.norm.weight, backbone.prefix.cls_token,
              backbone.pos_embed.pos_embed):
        assert by_param[id(p)]["wd_multiplier"] == 0.0


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (("ssl.global_crops_size=12",), "global_crops_size"),
        (("ssl.local_crops_size=4",), "local_crops_size"),
        (("ssl.koleo_loss_weight=-1",), "koleo_loss_weight"),
        (("ssl.dino_loss_weight=0", "ssl.ibot_loss_weight=0"), "nothing would be learnt"),
        (("ssl.centering=mean",), "centering"),
    ],
)
def test_config_errors(overrides: tuple[str, ...], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make(*overrides)


def test_bad_call_arguments() -> None:
    model = make()
    crops, masks = batch()
    with pytest.raises(ValueError, match="teacher_temp"):
        model(crops, masks, 0.0)
    with pytest.raises(ValueError, match="global_crops"):
        model({"global_crops": crops["global_crops"][:5]}, None, 0.05)
    with pytest.raises(ValueError, match="local_crops"):
        model({"global_crops": crops["global_crops"], "local_crops": crops["local_crops"][:4]}, None, 0.05)
