"""The self-supervised meta-architecture: student, EMA teacher, heads and losses.

DINOv2's ``SSLMetaArch`` (Oquab et al. 2024) for 3D crops, without the
distributed machinery: one class reads the whole config, switches loss terms
on by weight, returns named losses, and owns the teacher EMA and the centres.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from fedmri.config.loader import load_config
from fedmri.errors import ConfigError
from fedmri.losses import DINOClsTokenLoss, KoLeoLoss, iBOTPatchLoss
from fedmri.models import DINOHead, build_encoder

N_GLOBAL_CROPS = 2  # DINOv2 pairs the two global crops with each other


def _validate(cfg: DictConfig) -> None:
    s, p = cfg.ssl, cfg.model.patch_size
    for key in ("global_crops_size", "local_crops_size"):
        if s[key] < p or s[key] % p:
            raise ConfigError(f"ssl.{key}={s[key]} must be a positive multiple of model.patch_size={p}")
    for key in ("dino_loss_weight", "ibot_loss_weight", "koleo_loss_weight"):
        if s[key] < 0:
            raise ConfigError(f"ssl.{key}={s[key]} must be >= 0 (0 switches the term off)")
    if s.dino_loss_weight == 0 and s.ibot_loss_weight == 0:
        raise ConfigError("ssl.dino_loss_weight and ssl.ibot_loss_weight are both 0: nothing would be learnt")
    c = s.dp_center
    if not 0.0 < c.share < 1.0:
        raise ConfigError(f"ssl.dp_center.share={c.share} must be in (0, 1): the gradient and the centres share "
                          "the DP clipping norm")
    if c.radius <= 0:
        raise ConfigError(f"ssl.dp_center.radius={c.radius} must be > 0")
    if c.momentum is not None and not 0.0 <= c.momentum < 1.0:
        raise ConfigError(f"ssl.dp_center.momentum={c.momentum} must be in [0, 1) (or null: ssl.center_momentum)")


class SSLMetaArch(nn.Module):
    """Student and EMA teacher (encoder + DINO head [+ iBOT head]) with DINO/iBOT/KoLeo losses.

    Args:
        cfg: A whole fedmri config (``model`` and ``ssl`` sections) or a preset name.

    Raises:
        ConfigError: For crop sizes that are not multiples of the patch size,
            negative weights, or no learning term switched on.
    """

    def __init__(self, cfg: DictConfig | str) -> None:
        super().__init__()
        cfg = load_config(cfg) if isinstance(cfg, str) else cfg
        _validate(cfg)
        s = cfg.ssl
        self.dino_loss_weight = float(s.dino_loss_weight)
        self.ibot_loss_weight = float(s.ibot_loss_weight)
        self.koleo_loss_weight = float(s.koleo_loss_weight)
        self.patch_embed_lr_mult = float(s.patch_embed_lr_mult)

        backbone = build_encoder(cfg.model)
        student = nn.ModuleDict({
            "backbone": backbone,
            "dino_head": DINOHead(backbone.embed_dim, s.head_n_prototypes, s.head_hidden_dim,
                                  s.head_bottleneck_dim, s.head_nlayers),
        })
        ibot_dim = s.head_n_prototypes
        if self.ibot_loss_weight > 0 and s.ibot_separate_head:
            ibot_dim = s.ibot_n_prototypes
            student["ibot_head"] = DINOHead(backbone.embed_dim, ibot_dim, s.head_hidden_dim,
                                            s.head_bottleneck_dim, s.head_nlayers)
        self.student = student
        # The teacher starts as the student and only ever moves by EMA.
        self.teacher = copy.deepcopy(student)
        self.teacher.requires_grad_(False)
        self.teacher.eval()

        try:
            self.dino_loss = (DINOClsTokenLoss(s.head_n_prototypes, s.student_temp, s.center_momentum, s.centering)
                              if self.dino_loss_weight > 0 else None)
            self.ibot_loss = (iBOTPatchLoss(ibot_dim, s.student_temp, s.center_momentum, s.centering)
                              if self.ibot_loss_weight > 0 else None)
        except ValueError as exc:
            raise ConfigError(f"invalid ssl config: {exc}") from None
        self.koleo_loss = KoLeoLoss() if self.koleo_loss_weight > 0 else None

    @property
    def per_sample_decomposable(self) -> bool:
        """True when every active loss term is a sum of per-sample terms (DP-SGD applies)."""
        active = [m for m in (self.dino_loss, self.ibot_loss, self.koleo_loss) if m is not None]
        return all(m.per_sample_decomposable for m in active)

    def train(self, mode: bool = True) -> SSLMetaArch:
        super().train(mode)
        self.teacher.eval()  # no stochastic depth in the teacher, ever
        return self

    @staticmethod
    def _head_logits(net: nn.ModuleDict, cls: Tensor, patch: Tensor | None) -> tuple[Tensor, Tensor | None]:
        # cls: M1, D; patch: M2, D. A shared head runs once over both (DINOv2).
        if patch is None:
            return net["dino_head"](cls), None
        if "ibot_head" in net:
            return net["dino_head"](cls), net["ibot_head"](patch)
        logits = net["dino_head"](torch.cat([cls, patch]))  # M1+M2, K
        return logits[: cls.shape[0]], logits[cls.shape[0]:]

    def forward(self, batch_crops: dict[str, Any], masks: Tensor | None, teacher_temp: float,
                update_centers: bool = True, center_terms: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Named, weighted losses of one batch; ``total = sum of the *_loss entries``.

        Args:
            batch_crops: ``{"global_crops": (2B, C, G, G, G), "local_crops":
                (NB, C, L, L, L) or None}``, crop-major as from
                :func:`fedmri.ssl.collate_multicrop`.
            masks: (2B, n_patches) bool iBOT masks of the global crops, or None.
            teacher_temp: Teacher softmax temperature for this step.
            update_centers: Fold this batch into the centres (in training mode). False keeps
                them fixed, as DP-SGD needs: a centre built from this round's data would make
                one sample's target depend on the others.
            center_terms: When given, receives what this batch would fold into the centres:
                ``dino``, the mean teacher CLS logits (K,), and ``ibot``, the mean teacher
                logits of the masked patches (K,) when some are masked. DP-SGD releases them
                with the gradient (:mod:`fedmri.client.trainers.pretrain_dp`).

        Returns:
            A subset of ``dino_local_crops_loss``, ``dino_global_crops_loss``,
            ``koleo_loss``, ``ibot_loss`` (each already weighted). The centres
            are updated when the module is in training mode.
        """
        if teacher_temp <= 0:
            raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
        global_crops = batch_crops["global_crops"]
        local_crops = batch_crops.get("local_crops")
        if global_crops.shape[0] % N_GLOBAL_CROPS:
            raise ValueError(f"global_crops must stack {N_GLOBAL_CROPS} crops per sample, got {global_crops.shape[0]}")
        n_g = global_crops.shape[0]  # 2B
        batch = n_g // N_GLOBAL_CROPS
        if local_crops is not None and local_crops.shape[0] % batch:
            raise ValueError(f"local_crops must stack a whole number of crops per sample ({batch}), "
                             f"got {local_crops.shape[0]}")
        n_local = 0 if local_crops is None else local_crops.shape[0] // batch
        do_ibot = self.ibot_loss is not None and masks is not None and bool(masks.any())

        with torch.no_grad():
            t_out = self.teacher["backbone"](global_crops)
            # Swap the global views: student view A learns from teacher view B.
            t_cls = torch.cat(t_out["cls"].chunk(N_GLOBAL_CROPS)[::-1])  # 2B, D
            t_patch = t_out["patch"][masks] if do_ibot else None  # M, D
            t_cls_logits, t_patch_logits = self._head_logits(self.teacher, t_cls, t_patch)
            if self.dino_loss is not None:
                dino_targets = self.dino_loss.teacher_targets(t_cls_logits, teacher_temp)  # 2B, K
            if do_ibot:
                ibot_targets = self.ibot_loss.teacher_targets(t_patch_logits, teacher_temp)  # M, K
            if center_terms is not None:
                if self.dino_loss is not None:
                    center_terms["dino"] = t_cls_logits.float().mean(0)
                if do_ibot:
                    center_terms["ibot"] = t_patch_logits.float().mean(0)
            if self.training and update_centers:  # centre with earlier batches only, then fold this one in
                if self.dino_loss is not None:
                    self.dino_loss.update_center(t_cls_logits)
                if do_ibot:
                    self.ibot_loss.update_center(t_patch_logits)

        s_global = self.student["backbone"](global_crops, masks=masks if do_ibot else None)
        s_cls = s_global["cls"]  # 2B, D
        if n_local:
            s_cls = torch.cat([s_cls, self.student["backbone"](local_crops)["cls"]])  # 2B+NB, D
        s_patch = s_global["patch"][masks] if do_ibot else None  # M, D
        s_cls_logits, s_patch_logits = self._head_logits(self.student, s_cls, s_patch)

        losses: dict[str, Tensor] = {}
        if self.dino_loss is not None:
            # Average over all (student view, teacher view) pairs, DINOv2's scaling.
            n_terms = n_local * N_GLOBAL_CROPS + (N_GLOBAL_CROPS - 1) * N_GLOBAL_CROPS
            scale = self.dino_loss_weight / n_terms
            if n_local:
                losses["dino_local_crops_loss"] = scale * self.dino_loss(
                    s_cls_logits[n_g:].chunk(n_local), dino_targets.chunk(N_GLOBAL_CROPS))
            # One call over the stacked views is the mean of the 2 pair losses.
            losses["dino_global_crops_loss"] = scale * N_GLOBAL_CROPS * self.dino_loss(
                [s_cls_logits[:n_g]], [dino_targets])
        if self.koleo_loss is not None:
            losses["koleo_loss"] = self.koleo_loss_weight * sum(
                self.koleo_loss(c) for c in s_global["cls"].chunk(N_GLOBAL_CROPS))
        if self.ibot_loss is not None:
            losses["ibot_loss"] = (self.ibot_loss_weight * self.ibot_loss(s_patch_logits, ibot_targets, masks)
                                   if do_ibot else global_crops.new_zeros(()))
        return losses

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher = m * teacher + (1 - m) * student`` for every parameter."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"teacher momentum must be in [0, 1], got {momentum}")
        names_s, params_s = zip(*self.student.named_parameters())
        names_t, params_t = zip(*self.teacher.named_parameters())
        assert names_s == names_t, "student and teacher must have the same structure"
        torch._foreach_mul_(params_t, momentum)
        torch._foreach_add_(params_t, params_s, alpha=1.0 - momentum)

    def param_groups(self, patch_embed_lr_mult: float | None = None) -> list[dict[str, Any]]:
        """Student parameters in optimizer groups with ``lr_multiplier`` and ``wd_multiplier``.

        No weight decay on biases, norms, LayerScale gains, tokens and position
        embeddings (DINOv2); the patch embedding learns ``patch_embed_lr_mult``
        times slower (default: ``ssl.patch_embed_lr_mult``). Set each group's
        ``lr``/``weight_decay`` to the scheduled value times its multipliers.
        """
        if patch_embed_lr_mult is None:
            patch_embed_lr_mult = self.patch_embed_lr_mult
        groups: dict[tuple[float, float], list[nn.Parameter]] = {}
        for name, param in self.student.named_parameters():
            no_wd = (param.ndim <= 1 or name.endswith(".bias") or "norm" in name or "token" in name
                     or "pos_embed" in name or name.endswith(".gamma"))
            lr_mult = patch_embed_lr_mult if ".patch_embed." in name else 1.0
            groups.setdefault((lr_mult, 0.0 if no_wd else 1.0), []).append(param)
        return [{"params": p, "lr_multiplier": lr, "wd_multiplier": wd} for (lr, wd), p in groups.items()]
