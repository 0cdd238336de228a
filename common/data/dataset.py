"""A PyTorch ``Dataset`` over one split of a site catalog, reading the preprocessed cache."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fedmri.data.catalog_db import SPLITS, open_catalog, series_rows
from fedmri.data.site_inputs import FINDING_CODES
from fedmri.errors import InputError

# labels["sex"] codes; -1 = unknown.
SEX_CODES = {"F": 0, "M": 1, "O": 2}


class SeriesDataset(Dataset):
    """Series of one split, as model-ready samples.

    Rows are read once at construction and the SQLite connection is closed, so
    the dataset is safe to use with ``DataLoader(num_workers > 0)`` (no
    connection crosses a fork). Each sample is a dict:

    - ``image``: float32 tensor (1, X, Y, Z) from the cache, intensities in [0, 1];
    - ``report``: ``"FINDINGS: ...\\nIMPRESSION: ..."`` (sections present only), ``""`` if none;
    - ``report_sections``: ``{"findings": ..., "impression": ...}`` as reports.csv
      gave them (``""`` when missing), for ``prepare_report(findings=..., impression=...)``;
    - ``labels``: ``findings`` float32 multi-hot over :data:`FINDING_CODES`
      (all -1 when the series has no labels row), ``age`` float32 (NaN when
      unknown), ``sex`` int64 from :data:`SEX_CODES` (-1 when unknown);
    - ``mask``: uint8 label tensor (1, X, Y, Z), 0 = background, only for series that have one (so
      batch with ``masks_only=True`` or a collate that allows a missing key);
    - ``meta``: ``series_id``, ``patient_id`` and ``study_id`` (pseudonymous: they stay at the site, where
      evaluation resamples by patient), ``sequence``, ``body_region``, ``vendor``, ``split``.

    Args:
        catalog_dir: folder written by ``fedmri data index``.
        split: ``"train"``, ``"val"``, ``"test"``, or ``None`` for every series.
        transform: optional callable applied to each sample dict (e.g. MONAI dict transforms).
        masks_only: keep only series with a lesion mask.

    Raises:
        InputError: no catalog there, or an unknown split.
    """

    def __init__(self, catalog_dir: str | Path, split: str | None = "train", *,
                 transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 masks_only: bool = False) -> None:
        if split is not None and split not in SPLITS:
            raise InputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)} (or None for all)")
        self.catalog_dir = Path(catalog_dir)
        conn = open_catalog(self.catalog_dir)
        try:
            rows = series_rows(conn, split)
        finally:
            conn.close()
        self.rows = [_sample_fields(r) for r in rows if r["has_mask"] or not masks_only]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        path = self.catalog_dir / row["cache_path"]
        if not path.is_file():
            raise InputError(f"cache entry {path} of series {row['meta']['series_id']} is missing; "
                             "run `fedmri data index` again to rebuild it")
        with np.load(path) as data:
            sample: dict[str, Any] = {
                "image": torch.from_numpy(data["image"].astype(np.float32)),  # 1, X, Y, Z
                "report": row["report"],
                "report_sections": dict(row["report_sections"]),
                "labels": {
                    "findings": row["findings"].clone(),
                    "age": torch.tensor(row["age"], dtype=torch.float32),
                    "sex": torch.tensor(row["sex"], dtype=torch.int64),
                },
                "meta": dict(row["meta"]),
            }
            if "mask" in data.files:
                sample["mask"] = torch.from_numpy(data["mask"])  # 1, X, Y, Z
        return self.transform(sample) if self.transform is not None else sample


def _sample_fields(row: dict[str, Any]) -> dict[str, Any]:
    """What a sample needs from a catalog row, computed once."""
    codes = row["label_findings"]
    findings = (torch.full((len(FINDING_CODES),), -1.0) if codes is None
                else torch.tensor([float(c in codes) for c in FINDING_CODES]))
    sections = [f"{name}: {text}" for name, text in (("FINDINGS", row["report_findings"]),
                                                     ("IMPRESSION", row["report_impression"])) if text]
    return {
        "cache_path": row["cache_path"],
        "has_mask": bool(row["has_mask"]),
        "report": "\n".join(sections),
        "report_sections": {"findings": row["report_findings"] or "", "impression": row["report_impression"] or ""},
        "findings": findings,
        "age": float(row["age"]) if row["age"] is not None else math.nan,
        "sex": SEX_CODES.get(row["sex"] or "", -1),
        "meta": {
            "series_id": row["id"],
            "patient_id": row["patient_id"],
            "study_id": row["study_id"],
            "sequence": row["sequence"] or "unknown",
            "body_region": row["body_region"] or "unknown",
            "vendor": row["vendor"] or "unknown",
            "split": row["split"],
        },
    }
