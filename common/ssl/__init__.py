"""DINOv2-style 3D self-supervision: multi-crop, masks, schedules, the meta-architecture.

The multi-crop names load on first use: importing MONAI's transforms takes
seconds, and the server, which only evaluates schedules, never needs them.
"""

from __future__ import annotations

from fedmri.ssl.masking import MaskingGenerator3D, build_mask_generator, sample_masks
from fedmri.ssl.meta_arch import SSLMetaArch
from fedmri.ssl.schedules import (
    cosine,
    learning_rate,
    progress,
    ssl_schedule,
    teacher_momentum,
    teacher_temperature,
    warmup_cosine,
    weight_decay,
)
from fedmri.lazy import lazy_attributes

__getattr__ = lazy_attributes(
    __name__,
    {name: "fedmri.ssl.multicrop" for name in ("MultiCropAugmentation", "RandResizedCrop3D", "build_multicrop",
                                               "collate_multicrop")},
)


__all__ = [
    "MaskingGenerator3D",
    "MultiCropAugmentation",
    "RandResizedCrop3D",
    "SSLMetaArch",
    "build_mask_generator",
    "build_multicrop",
    "collate_multicrop",
    "cosine",
    "learning_rate",
    "progress",
    "sample_masks",
    "ssl_schedule",
    "teacher_momentum",
    "teacher_temperature",
    "warmup_cosine",
    "weight_decay",
]
