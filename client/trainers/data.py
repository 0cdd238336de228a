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


def patient_keys(dataset: SeriesDataset | PooledDataset) -> list[str]:
    """Each series' patient, in dataset order: the unit of patient-level DP-SGD.

    The catalog's pseudonymous patient ids; pooled catalogs are told apart by their
    folder, since two sites may hold the same pseudonym. They are used at the site only
    (to group a patient's series): none of them is in an update or a metric.
    """
    parts = getattr(dataset, "parts", None)
    if parts is None:
        return [str(row["meta"]["patient_id"]) for row in dataset.rows]
    return [f"{part.catalog_dir}|{row['meta']['patient_id']}" for part in parts for row in part.rows]
