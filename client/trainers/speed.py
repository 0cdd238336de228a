"""How a site's local steps use its hardware: precision, fused AdamW, torch.compile (``train`` section).

A GPU site runs the pretrain and align steps under bf16 autocast
(``train.precision: auto``), with the fused AdamW kernel and, when asked,
a compiled encoder; a CPU site runs as before (fp32, torch's default AdamW,
eager). docs/architecture.md, "GPU sites", says why; ``benchmarks/gpu_check.sh``
measures it.

- **bf16 autocast** wraps forward and loss only; the weights, their gradients
  and AdamW's moments stay fp32 (the "master weights"), backward runs outside
  the autocast block as torch recommends, and no ``GradScaler`` is needed: bf16
  keeps fp32's 8-bit exponent, so small gradients do not underflow as in fp16.
  The loss terms whose temperature or logit scale amplifies rounding (DINO and
  iBOT softmaxes, the centre, KoLeo's distances, CLIP/SigLIP logits) compute in
  fp32 inside :mod:`fedmri.losses`.
- **DP-SGD rounds stay fp32 and eager** whatever ``train`` says: their per-sample
  gradients (:mod:`fedmri.client.privacy.dp_sgd`) are computed one sample at a
  time, where bf16 and compiled graphs buy little, and DP's utility
  (``bench_dp_utility``) was measured in fp32 only. Clipping would bound a bf16
  gradient just as well: the guarantee would hold, the utility is not measured.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from fedmri.errors import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
# The compiler behind train.compile; tests swap in "eager" to trace without generating code.
COMPILE_BACKEND = "inductor"


def resolve_precision(precision: str, device: torch.device | str) -> torch.dtype:
    """The dtype the forward passes run in: ``auto`` is bf16 on a CUDA GPU with bf16 tensor cores
    (compute capability 8.0 and up: A100, H100, RTX 30xx and later) and fp32 anywhere else.

    Args:
        precision: ``train.precision``: ``"auto"``, ``"fp32"`` or ``"bf16"``.
        device: The site's training device.

    Raises:
        ConfigError: An unknown ``precision``.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        device = torch.device(device)
        # Older GPUs (V100, T4) emulate bf16 matmuls, slower than their fp32.
        native = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
        return torch.bfloat16 if native else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


@dataclass(frozen=True)
class Speed:
    """What one round's steps run with on the site's device.

    Attributes:
        device: The site's training device.
        dtype: The autocast dtype of forward and loss (fp32: no autocast).
        compile: Compile the encoders (:meth:`compile_modules`).
    """

    device: torch.device
    dtype: torch.dtype = torch.float32
    compile: bool = False

    @classmethod
    def for_round(cls, train_cfg: DictConfig, device: torch.device, what: str, private: bool = False) -> Speed:
        """The run's ``train`` settings on ``device``; a DP-SGD round (``private``) gets fp32, eager.

        Raises:
            ConfigError: An unknown ``train.precision``.
        """
        dtype = resolve_precision(str(train_cfg.precision), device)
        if private:
            if dtype != torch.float32 or train_cfg.compile:
                log.info("%s: DP-SGD rounds run in fp32, uncompiled; train.precision=%s and train.compile=%s "
                         "apply to non-private rounds", what, train_cfg.precision, train_cfg.compile)
            return cls(device)
        log.debug("%s: %s steps on %s%s", what, "bf16 autocast" if dtype == torch.bfloat16 else "fp32", device,
                  ", compiled encoder" if train_cfg.compile else "")
        return cls(device, dtype, bool(train_cfg.compile))

    @property
    def pin_memory(self) -> bool:
        """Collated batches go to page-locked memory for an asynchronous copy to a CUDA device."""
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """Autocast to :attr:`dtype` around a forward and its loss; nothing for fp32.

        Backward runs after the block, as torch recommends.
        """
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def compile_modules(self, modules: Iterable[nn.Module]) -> None:
        """``torch.compile`` each module in place when :attr:`compile` is on.

        In place (``nn.Module.compile``), so parameter names, and with them the
        wire state, do not change. ``dynamic=False``: a round sees two or three
        fixed shapes (global crops with and without masks, local crops), each
        compiled once, and static shapes give the compiler the most to fuse.
        """
        if self.compile:
            for module in modules:
                module.compile(backend=COMPILE_BACKEND, dynamic=False)
