"""Encoder features computed once per site and cached on disk for the heads.

Heads train on the frozen encoder's outputs, so each volume goes through the
encoder once. Each entry is one safetensors file per volume under
``root/<encoder digest[:16]>/``, named by a hash of the encoder digest, the
preprocessing key, the item id and what is stored. A new encoder (any changed
weight) therefore never reads old features, and adding volumes to a dataset
only computes the new ones.

Stored per volume: ``cls``, ``mean`` and ``max`` (of patch tokens) in float32, and when
asked the patch tokens and intermediate layers (for segmentation) in float16,
which halves the disk use at a precision far below the heads' noise.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fedmri.errors import InputError

FORMAT_VERSION = 2  # 2: the max over patch tokens is stored too


def preprocess_key(section: Any) -> str:
    """Stable hash of a preprocessing config (e.g. ``cfg.data.preprocess``) for cache keys."""
    from omegaconf import OmegaConf

    if isinstance(section, str):
        text = section
    else:
        node = OmegaConf.structured(section) if hasattr(section, "__dataclass_fields__") else OmegaConf.create(section)
        text = json.dumps(OmegaConf.to_container(node, resolve=True), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class CachedFeatures:
    """Features of a list of volumes, in the order asked for.

    Attributes:
        ids: Item ids, one per row.
        cls: CLS embeddings (n, D) float32.
        mean: Mean of patch tokens (n, D) float32.
        max: Per-channel max of patch tokens (n, D) float32.
        patch: Patch tokens (n, N, D) float16, when asked.
        layers: Intermediate layers, each (n, N, D) float16, in the order asked.
        grid: Patch grid (gx, gy, gz) shared by all volumes.
        hits: Volumes read from the cache; ``misses`` were computed now.
    """

    ids: list[str]
    cls: Tensor
    mean: Tensor
    max: Tensor
    patch: Tensor | None = None
    layers: list[Tensor] = field(default_factory=list)
    grid: tuple[int, int, int] = (0, 0, 0)
    hits: int = 0
    misses: int = 0

    def as_encoder_output(self) -> dict[str, Any]:
        """The encoder's output dict shape, so heads take cached and live features alike."""
        out: dict[str, Any] = {"cls": self.cls, "mean": self.mean, "max": self.max, "layers": self.layers, "grid": self.grid}
        if self.patch is not None:
            out["patch"] = self.patch
        return out


class FeatureCache:
    """Compute-once store of encoder features, keyed by the encoder's weights.

    Args:
        root: Cache folder (``heads.cache_dir``); created on first write.
        encoder: The frozen image encoder (:class:`fedmri.models.ViT3D` contract).
        preprocess_key: Identifies how volumes were preprocessed (see
            :func:`preprocess_key`): a different preprocessing is a different entry.
        layers: Encoder blocks whose tokens to store too (segmentation skips).
        patch_tokens: Also store the final patch tokens (anomaly, segmentation).
        batch_size: Volumes per encoder forward pass on a miss.

    The encoder's weight digest is taken on each :meth:`get`, so changing the
    weights between calls is safe. Ids must be stable for the same volume
    (e.g. the series UID); if a volume can change under the same id, put its
    version into the id.
    """

    def __init__(self, root: str | Path, encoder: nn.Module, *, preprocess_key: str, layers: Sequence[int] = (),
                 patch_tokens: bool = False, batch_size: int = 4) -> None:
        if batch_size < 1:
            raise InputError(f"feature extraction batch size {batch_size} must be >= 1")
        self.root = Path(root)
        self.encoder = encoder
        self.preprocess_key = preprocess_key
        self.layers = [int(i) for i in layers]
        self.patch_tokens = patch_tokens
        self.batch_size = batch_size

    def _entry(self, digest: str, item_id: str) -> Path:
        settings = json.dumps([FORMAT_VERSION, digest, self.preprocess_key, item_id, self.layers, self.patch_tokens])
        return self.root / digest[:16] / (hashlib.sha256(settings.encode()).hexdigest()[:40] + ".safetensors")

    def _read(self, path: Path, digest: str, item_id: str) -> dict[str, Any] | None:
        from safetensors import safe_open

        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("encoder") != digest or meta.get("item_id") != item_id:
                    return None
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception:  # a half-written or damaged entry is recomputed, never trusted
            return None
        return {"tensors": tensors, "grid": tuple(json.loads(meta["grid"]))}

    def _write(self, path: Path, tensors: Mapping[str, Tensor], grid: Sequence[int], digest: str, item_id: str) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(dict(tensors), str(tmp), metadata={"encoder": digest, "item_id": item_id,
                                                     "grid": json.dumps(list(grid))})
        os.replace(tmp, path)  # readers see a whole entry or none

    @torch.no_grad()
    def _compute(self, images: Tensor) -> tuple[list[dict[str, Tensor]], tuple[int, int, int]]:
        device = next(self.encoder.parameters()).device
        out = self.encoder(images.to(device), return_layers=self.layers)
        rows = []
        for i in range(images.shape[0]):
            patch = out["patch"][i].float()  # N, D
            row = {"cls": out["cls"][i].float().cpu(), "mean": patch.mean(0).cpu(), "max": patch.amax(0).cpu()}
            if self.patch_tokens:
                row["patch"] = out["patch"][i].half().cpu()  # N, D
            for j, layer in enumerate(out["layers"]):
                row[f"layer{j}"] = layer[i].half().cpu()  # N, D
            rows.append(row)
        return rows, tuple(int(g) for g in out["grid"])  # type: ignore[return-value]

    def get(self, ids: Sequence[str], load: Callable[[str], Tensor]) -> CachedFeatures:
        """Features for ``ids``, computing and caching the missing ones.

        Args:
            ids: Item ids in the order wanted.
            load: Returns the preprocessed volume (C, X, Y, Z) of an id; only
                called for ids not in the cache.

        Raises:
            InputError: If volumes of different patch grids are asked for
                together with patch tokens or layers (they cannot be stacked).
        """
        from fedmri.export import weights_digest

        if not ids:
            raise InputError("no volume ids given to extract features for")
        digest = weights_digest(self.encoder)
        rows: dict[str, tuple[dict[str, Tensor], tuple[int, ...]]] = {}
        todo = []
        for item_id in dict.fromkeys(ids):
            hit = self._read(self._entry(digest, item_id), digest, item_id)
            if hit is None:
                todo.append(item_id)
            else:
                rows[item_id] = (hit["tensors"], hit["grid"])
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start: start + self.batch_size]
                volumes = [load(i) for i in chunk]
                groups: dict[tuple[int, ...], list[int]] = {}
                for k, v in enumerate(volumes):  # volumes of one shape go through together
                    groups.setdefault(tuple(v.shape), []).append(k)
                for members in groups.values():
                    batch = torch.stack([volumes[k] for k in members]).float()  # b, C, X, Y, Z
                    computed, grid = self._compute(batch)
                    for k, row in zip(members, computed):
                        self._write(self._entry(digest, chunk[k]), row, grid, digest, chunk[k])
                        rows[chunk[k]] = (row, grid)
        finally:
            self.encoder.train(was_training)
        return self._stack(list(ids), rows, hits=len(dict.fromkeys(ids)) - len(todo), misses=len(todo))

    def _stack(self, ids: list[str], rows: Mapping[str, tuple[dict[str, Tensor], tuple[int, ...]]], *, hits: int,
               misses: int) -> CachedFeatures:
        grids = {rows[i][1] for i in ids}
        if len(grids) > 1 and (self.patch_tokens or self.layers):
            raise InputError(f"volumes with different patch grids {sorted(grids)} cannot be stacked; "
                             "preprocess them to one target_shape")
        get = [rows[i][0] for i in ids]
        return CachedFeatures(
            ids=ids,
            cls=torch.stack([r["cls"] for r in get]),  # n, D
            mean=torch.stack([r["mean"] for r in get]),  # n, D
            max=torch.stack([r["max"] for r in get]),  # n, D
            patch=torch.stack([r["patch"] for r in get]) if self.patch_tokens else None,  # n, N, D
            layers=[torch.stack([r[f"layer{j}"] for r in get]) for j in range(len(self.layers))],
            grid=next(iter(grids)) if grids else (0, 0, 0),  # type: ignore[arg-type]
            hits=hits,
            misses=misses,
        )


def build_feature_cache(cfg: Any, encoder: nn.Module, *, layers: Sequence[int] = (), patch_tokens: bool = False,
                        root: str | Path | None = None) -> FeatureCache:
    """The cache that ``cfg.heads`` describes, keyed by ``cfg.data.preprocess``.

    Args:
        cfg: The whole config.
        encoder: The frozen image encoder.
        layers: Blocks to cache for segmentation (see :func:`fedmri.heads.skip_layers`).
        patch_tokens: Also cache final patch tokens.
        root: Overrides ``heads.cache_dir`` (e.g. a site's data folder).
    """
    return FeatureCache(root if root is not None else cfg.heads.cache_dir, encoder,
                        preprocess_key=preprocess_key(cfg.data.preprocess), layers=layers,
                        patch_tokens=patch_tokens, batch_size=cfg.heads.extract_batch_size)
