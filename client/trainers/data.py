"""The series a site trains and evaluates on: its catalog split (or, for the
centralized baseline of ``fedmri simulate``, several catalogs pooled)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from fedmri.data.dataset import SeriesDataset


class PooledDataset:
    """Several catalogs' splits as one dataset; every patient keeps the split its own site gave it."""

    def __init__(self, parts: list[SeriesDataset]) -> None:
        self.parts = parts
        self.rows = [row for part in parts for row in part.rows]
        self._index = [(p, i) for p, part in enumerate(parts) for i in range(len(part))]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        p, i = self._index[index]
        return self.parts[p][i]


def site_dataset(site_cfg: DictConfig, split: str) -> SeriesDataset | PooledDataset:
    """The site's ``split``, pooled over ``extra_catalogs`` when the site file lists any."""
    extra = list(site_cfg.get("extra_catalogs") or [])
    if not extra:
        return SeriesDataset(site_cfg.catalog, split)
    return PooledDataset([SeriesDataset(c, split) for c in [site_cfg.catalog, *extra]])
