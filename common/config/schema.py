"""The configuration schema: one dataclass per section, every field explained.

Presets in ``fedmri/configs/*.yaml`` and user files may only set keys that exist
here, with values of the declared type (see :mod:`fedmri.config.loader`).
Sections that belong to later stages (self-supervision, alignment, heads,
federation) are added beside these as those stages land.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """Sizes of the 3D ViT image encoder (DESIGN.md, "The model")."""

    # Input grid the learnt position embedding is laid out for; other crop
    # sizes interpolate it trilinearly, so global and local crops share a model.
    img_size: list[int] = field(default_factory=lambda: [96, 96, 96])
    # Cubic patch edge in voxels: 16 gives 6x6x6 = 216 tokens at 96^3.
    patch_size: int = 16
    # MR series are single-channel after preprocessing.
    in_chans: int = 1
    # Token width; 768 with depth 12 and 12 heads is ViT-B (~86M parameters).
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    # Hidden width of each block's MLP as a multiple of embed_dim.
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    # Initial LayerScale gamma (CaiT); 0 switches LayerScale off.
    layerscale_init: float = 1.0e-5
    # Stochastic depth rate at the last block, linear from 0 at the first.
    drop_path_rate: float = 0.0
    # Extra learnt tokens that soak up global attention (Darcet et al. 2024).
    num_register_tokens: int = 0


@dataclass
class PreprocessConfig:
    """How a series becomes a model input; every field is part of the cache key."""

    # Axis codes the volume is reoriented to before resampling.
    orientation: str = "RAS"
    # Voxel size in mm after resampling (x, y, z in RAS).
    target_spacing: list[float] = field(default_factory=lambda: [1.5, 1.5, 1.5])
    # Shape after centred crop or pad; should match model.img_size.
    target_shape: list[int] = field(default_factory=lambda: [96, 96, 96])
    # Intensities are scaled so these percentiles map to 0 and 1: robust to the
    # arbitrary scale each vendor writes and to a few hot voxels.
    intensity_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    # On-disk cache dtype; float16 halves the cache at no loss after scaling.
    cache_dtype: str = "float16"


@dataclass
class CatalogConfig:
    """How a site's catalog assigns series to splits."""

    # Patient-level train/val/test fractions; a patient's split follows from a
    # salted hash of its id, so re-indexing never moves a patient.
    split_fractions: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])


@dataclass
class DataConfig:
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    catalog: CatalogConfig = field(default_factory=CatalogConfig)


@dataclass
class SynthConfig:
    """Synthetic hospitals for simulations and the demo (``fedmri data synth``)."""

    # Number of hospitals; each gets its own vendor, scanner and case mix.
    sites: int = 3
    # Series written per hospital.
    series_per_site: int = 40
    # Seed of the whole federation; site k uses a seed derived from it.
    seed: int = 0
    # Acquisition matrix preset: "demo" (small, fast) or "full" (clinical sizes).
    preset: str = "demo"


@dataclass
class FedmriConfig:
    """The root of every fedmri configuration."""

    # Name of the preset this config was built from (informational).
    preset: str = "base"
    # Global seed; every random choice of a run derives from it.
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
