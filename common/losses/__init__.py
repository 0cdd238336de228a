"""Training losses, one per module; each declares ``per_sample_decomposable`` (DP-SGD applies)."""

from __future__ import annotations

from fedmri.losses.clip_loss import ClipLoss
from fedmri.losses.dino_clstoken_loss import DINOClsTokenLoss, sinkhorn_knopp
from fedmri.losses.ibot_patch_loss import iBOTPatchLoss, masked_token_weights
from fedmri.losses.koleo_loss import KoLeoLoss
from fedmri.losses.siglip_loss import SigLipLoss

__all__ = [
    "ClipLoss",
    "DINOClsTokenLoss",
    "KoLeoLoss",
    "SigLipLoss",
    "iBOTPatchLoss",
    "masked_token_weights",
    "sinkhorn_knopp",
]
