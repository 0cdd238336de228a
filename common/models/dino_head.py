"""DINO projection head: MLP -> bottleneck -> L2 norm -> weight-normalised prototypes.

Caron et al. 2021 (DINO) and Oquab et al. 2024 (DINOv2), without BatchNorm so
that the head can train under DP-SGD. The last layer is written out explicitly
instead of through ``torch.nn.utils.parametrizations.weight_norm``: a
parametrised ``nn.Linear`` keeps its parameters in a child module that is never
called, which per-sample gradient engines (Opacus) cannot follow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer whose rows are unit-norm directions times a gain.

    ``W = g * v / ||v||`` row-wise (Salimans & Kingma 2016). With a fixed gain of
    1 each output is the cosine between the input and a prototype, which is what
    keeps the DINO logits bounded (DINO's ``norm_last_layer``).

    Args:
        in_features: Input width.
        out_features: Number of prototypes.
        learn_gain: Learn ``g`` per output; False fixes it at 1.
    """

    def __init__(self, in_features: int, out_features: int, learn_gain: bool = False) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_features, 1)) if learn_gain else None

    @property
    def weight(self) -> Tensor:
        w = F.normalize(self.weight_v, dim=1)  # K, in
        return w if self.weight_g is None else w * self.weight_g

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)  # ..., K


class DINOHead(nn.Module):
    """The head that turns a CLS (or patch) embedding into prototype logits.

    Args:
        in_dim: Encoder width.
        out_dim: Number of prototypes K (65536 in DINOv2).
        hidden_dim: MLP hidden width. Default 2048.
        bottleneck_dim: Width before the prototypes. Default 256.
        nlayers: Linear layers in the MLP (>= 1). Default 3.
        learn_gain: Learn the prototype norms (see :class:`WeightNormLinear`). Default False.

    Raises:
        ValueError: For a non-positive size or ``nlayers < 1``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        learn_gain: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                            ("bottleneck_dim", bottleneck_dim), ("nlayers", nlayers)):
            if value < 1:
                raise ValueError(f"DINOHead {name} must be >= 1, got {value}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, learn_gain=learn_gain)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                # LeCun scale: ~0.02 at DINOv2's widths (768/2048). A fixed 0.02
                # shrinks the signal through a narrow head (gain 0.02 * sqrt(fan_in)
                # per layer); the tiny model of tests/common/ssl/test_ssl_training.py
                # then stays on the uniform-collapse plateau.
                nn.init.trunc_normal_(m.weight, std=m.in_features ** -0.5)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)  # ..., bottleneck
        # eps matches DINOv2; in half precision a smaller one underflows.
        x = F.normalize(x, dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)  # ..., K
