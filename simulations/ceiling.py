"""The supervised ceiling: how well a network trained *with* labels finds each disease.

Before a self-supervised recipe is tuned to see disease, something must show
that the disease can be seen in the volumes at all. This trains a MONAI 3D
CNN from scratch, with the findings labels, on the pooled training splits of
the federation's sites (what no federated encoder may ever do: pool), and
scores it on a hospital held out of the federation. A finding the ceiling
cannot tell from health is a data problem, not a method problem.

The network reads exactly what the encoder reads: the preprocessed volumes of
the site catalogs. Labels are study-level, as hospitals have them, so every
series of a study with a mass is positive for "mass", also a T1 before
contrast where the mass barely shows; the scores are therefore also broken
down by sequence (:func:`findings_intervals`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmri.data.catalog_db import open_catalog, series_rows
from fedmri.data.site_inputs import FINDING_CODES
from fedmri.errors import ConfigError, InputError
from fedmri.metrics import auroc_within_groups
from fedmri.metrics.bootstrap import Interval, bootstrap_intervals

NETWORKS = ("resnet10", "resnet18", "densenet121")


@dataclass
class CeilingConfig:
    """How the supervised ceiling trains."""

    # MONAI network: resnet10 (fast on a CPU), resnet18 or densenet121.
    network: str = "resnet10"
    # ResNet width multiplier and first-layer stride: 0.25 and 2 make a step at
    # batch 8 on 64^3 ~0.1 s on two cores (full width, stride 1: ~25 s).
    width: float = 0.25
    # Passes over the pooled training series; the ceiling trains to its plateau.
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    # Bootstrap resamples (by patient) for the intervals.
    n_boot: int = 1000
    seed: int = 0
    # torch threads.
    threads: int = 2
    # torch device to train and predict on ("cpu", "cuda", "cuda:1"); the series stay in CPU memory.
    device: str = "cpu"


@dataclass
class Split:
    """Series of some catalogs, loaded: images and what scoring needs."""

    images: Tensor  # N, 1, X, Y, Z float32
    findings: Tensor  # N, L in {0, 1}
    regions: list[str]
    sequences: list[str]
    patients: list[str]  # "<catalog>/<pseudonym>": patients are not linked across catalogs
    series: list[str] = field(default_factory=list)  # "<catalog>/<series row id>", to match other scores

    def __len__(self) -> int:
        return len(self.regions)


@dataclass
class CeilingResult:
    """What the ceiling measured."""

    network: str
    n_train: int
    train_seconds: float
    losses: list[float]
    holdout: dict[str, Interval]  # "<code>" and "macro": in-region AUROC
    by_sequence: dict[str, dict[str, Interval]] = field(default_factory=dict)  # code -> sequence -> interval
    scores: np.ndarray | None = None  # N, L sigmoid scores on the held-out series

    def to_json(self) -> dict[str, Any]:
        return {"network": self.network, "n_train": self.n_train, "train_seconds": round(self.train_seconds, 1),
                "final_loss": self.losses[-1] if self.losses else None,
                "holdout_auroc_in_region": {k: v.to_json() for k, v in self.holdout.items()},
                "holdout_auroc_by_sequence": {c: {s: v.to_json() for s, v in seqs.items()}
                                              for c, seqs in self.by_sequence.items()}}


def load_split(catalogs: Sequence[str | Path], split: str | None) -> Split:
    """Every labelled series of ``split`` (None: all) in ``catalogs``, from their preprocessed caches.

    Raises:
        InputError: a missing catalog or cache entry, or no labelled series at all.
    """
    images, findings, regions, sequences, patients, series = [], [], [], [], [], []
    for catalog in catalogs:
        root = Path(catalog)
        conn = open_catalog(root)
        try:
            rows = series_rows(conn, split)
        finally:
            conn.close()
        for row in rows:
            if row["label_findings"] is None:
                continue
            path = root / row["cache_path"]
            if not path.is_file():
                raise InputError(f"cache entry {path} is missing; run `fedmri data index` on {root} again")
            with np.load(path) as data:
                images.append(torch.from_numpy(data["image"].astype(np.float32)))
            findings.append([float(c in row["label_findings"]) for c in FINDING_CODES])
            regions.append(row["body_region"] or "unknown")
            sequences.append(row["sequence"] or "unknown")
            patients.append(f"{root.name}/{row['patient_id']}")
            series.append(f"{root.name}/{row['id']}")
    if not images:
        raise InputError(f"no labelled series in split {split!r} of {[str(c) for c in catalogs]}")
    return Split(torch.stack(images), torch.tensor(findings), regions, sequences, patients, series)


def build_network(name: str, out_channels: int, width: float = 0.25) -> nn.Module:
    """A MONAI 3D classifier from scratch, one input channel (ResNets: ``width`` x the channels, stride-2 stem).

    Raises:
        ConfigError: for a network outside :data:`NETWORKS`.
    """
    from monai.networks import nets

    if name == "densenet121":
        return nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=out_channels)
    if name in ("resnet10", "resnet18"):
        return getattr(nets, name)(spatial_dims=3, n_input_channels=1, num_classes=out_channels, conv1_t_stride=2,
                                   widen_factor=width)
    raise ConfigError(f"unknown ceiling network {name!r}; choose one of {', '.join(NETWORKS)}")


def augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Left-right flips, shifts of up to 4 voxels and intensity gamma/scale: what differs between hospitals.

    ``gen`` is a CPU generator: the draws are the same whichever device ``x`` is on.
    """
    b = x.shape[0]
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
    x = torch.where(flip[:, None, None, None, None], x.flip(2), x)
    shifts = torch.randint(-4, 5, (3,), generator=gen).tolist()
    x = torch.roll(x, shifts=shifts, dims=(2, 3, 4))
    gamma = torch.exp((torch.rand(b, generator=gen) - 0.5) * 0.6)[:, None, None, None, None].to(x.device)
    scale = (0.85 + 0.3 * torch.rand(b, generator=gen))[:, None, None, None, None].to(x.device)
    return x.clamp(min=0.0) ** gamma * scale


def train_ceiling(train: Split, cfg: CeilingConfig, say: Callable[[str], None] = print,
                  say_every: int = 1) -> tuple[nn.Module, list[float]]:
    """Train the network on ``train`` with masked multi-label BCE; returns it in eval mode and the epoch losses.

    ``say`` gets a line with the loss every ``say_every`` epochs and after the last.

    Raises:
        ConfigError: epochs or batch_size below 1, or a CUDA device this machine does not have.
    """
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ConfigError(f"epochs and batch_size must be >= 1, got {cfg.epochs} and {cfg.batch_size}")
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)  # on the CPU: the same draws on every device
    model = build_network(cfg.network, len(FINDING_CODES), cfg.width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * -(-len(train) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
    # Rare findings weigh more, so a head cannot settle on "never".
    pos = train.findings.mean(0).clamp(0.02, 0.98)  # L
    weight = ((1.0 - pos) / pos).sqrt().to(device)
    losses = []
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        total = 0.0
        for start in range(0, len(train), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            x = augment(train.images[idx].to(device, non_blocking=True), gen)  # B, 1, X, Y, Z
            y = train.findings[idx].to(device)
            loss = F.binary_cross_entropy_with_logits(model(x), y, pos_weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(train))
        if (epoch + 1) % say_every == 0 or epoch + 1 == cfg.epochs:
            say(f"[ceiling] epoch {epoch + 1}/{cfg.epochs}: loss {losses[-1]:.4f}")
    return model.eval(), losses


@torch.no_grad()
def predict(model: nn.Module, split: Split, batch_size: int = 16) -> np.ndarray:
    """(N, L) sigmoid scores, computed on the device the model is on."""
    device = next(model.parameters()).device
    out = [torch.sigmoid(model(split.images[i:i + batch_size].to(device))).cpu()
           for i in range(0, len(split), batch_size)]
    return torch.cat(out).numpy()


def _device(name: str) -> torch.device:
    """``name`` as a torch device, checked against this machine."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"ceiling device {name!r} is not a torch device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"ceiling device {name!r}: torch sees no CUDA GPU on this machine; use device cpu")
    return device


def findings_intervals(scores: np.ndarray, split: Split, n_boot: int = 1000,
                       seed: int = 0) -> tuple[dict[str, Interval], dict[str, dict[str, Interval]]]:
    """Each finding's in-region AUROC (and their mean) with patient-bootstrap intervals, overall and per sequence.

    A finding is scored among the series of the body regions where it occurs,
    by :func:`fedmri.metrics.auroc_within_groups` (as the heads' evaluation
    scores it); per sequence, the same among the series of one sequence.

    Returns:
        ``({code: interval, "macro": interval}, {code: {sequence: interval}})``;
        findings without both classes are left out.
    """
    y = split.findings.numpy()
    regions, sequences = np.asarray(split.regions), np.asarray(split.sequences)
    patients = np.asarray(split.patients)

    def scored(rows: np.ndarray) -> dict[str, Interval]:
        """Intervals over patient resamples of ``rows``, keyed by code and "macro", sized by the rows behind each."""
        found = bootstrap_intervals(lambda idx: auroc_within_groups(scores[rows[idx]], y[rows[idx]],
                                                                    regions[rows[idx]], FINDING_CODES),
                                    patients[rows], n_boot=n_boot, seed=seed)
        reg, pos = regions[rows], y[rows] > 0.5
        where = {code: np.isin(reg, np.unique(reg[pos[:, j]])) for j, code in enumerate(FINDING_CODES)}
        out = {}
        for name, iv in found.items():
            code = name.removeprefix("auroc_in_group/")
            if name == "auroc_in_group_macro":
                code = "macro"
                used = np.any([where[c] for c in FINDING_CODES if f"auroc_in_group/{c}" in found], axis=0)
            else:
                used = where[code]
            # The interval's n and patients are those of the series the finding is scored on.
            out[code] = replace(iv, n=int(used.sum()), clusters=len(set(patients[rows][used])))
        return out

    overall = scored(np.arange(len(split)))
    by_seq: dict[str, dict[str, Interval]] = {}
    for seq in sorted(set(sequences)):
        for code, iv in scored(np.flatnonzero(sequences == seq)).items():
            if code != "macro":
                by_seq.setdefault(code, {})[seq] = iv
    return overall, {code: by_seq[code] for code in FINDING_CODES if code in by_seq}


def run_ceiling(train_catalogs: Sequence[str | Path], holdout_catalogs: Sequence[str | Path],
                cfg: CeilingConfig | None = None, say: Callable[[str], None] = print) -> CeilingResult:
    """Train on the training splits of ``train_catalogs``; score on every series of ``holdout_catalogs``."""
    cfg = cfg or CeilingConfig()
    train = load_split(train_catalogs, "train")
    held = load_split(holdout_catalogs, None)
    say(f"[ceiling] {cfg.network} on {len(train)} training series; held out: {len(held)} series")
    t0 = time.perf_counter()
    model, losses = train_ceiling(train, cfg, say)
    seconds = time.perf_counter() - t0
    scores = predict(model, held)
    overall, by_seq = findings_intervals(scores, held, cfg.n_boot, cfg.seed)
    return CeilingResult(cfg.network, len(train), seconds, losses, overall, by_seq, scores)
