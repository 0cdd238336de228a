"""SeriesDataset: samples from the cache, labels with missing values, safe across worker forks."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch
from helpers.site_factory import make_site
from torch.utils.data import DataLoader

from fedmri.config import load_config
from fedmri.data.catalog_db import SPLITS, open_catalog, series_rows
from fedmri.data.dataset import SeriesDataset
from fedmri.data.indexer import index_site
from fedmri.data.site_inputs import FINDING_CODES
from fedmri.errors import InputError

CFG = load_config("tiny", overrides=["data.preprocess.target_shape=[16,16,8]"])


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("ds")
    site = make_site(root / "site", n_patients=4, series_per_patient=2, seed=21)
    # Drop one series' label row and one study's report: missing values must show as such.
    lines = site.labels.read_text().splitlines()
    site.labels.write_text("\n".join(lines[:-1]) + "\n")
    reports = site.reports.read_text().splitlines()
    site.reports.write_text("\n".join(reports[:-1]) + "\n")
    index_site(site.dicom, site.reports, root / "cat", labels=site.labels, cfg=CFG)
    return root / "cat", site


def _rows(cat: Path) -> dict[str, dict]:
    conn = open_catalog(cat)
    rows = {r["id"]: r for r in series_rows(conn)}
    conn.close()
    return rows


def test_splits_partition_the_catalog(catalog) -> None:
    cat, _ = catalog
    sizes = [len(SeriesDataset(cat, split)) for split in SPLITS]
    assert sum(sizes) == len(SeriesDataset(cat, None)) == 8


def test_sample_contents_follow_the_catalog(catalog) -> None:
    cat, site = catalog
    rows = _rows(cat)
    seen_missing_label = seen_missing_report = seen_mask = False
    for sample in SeriesDataset(cat, None):
        row = rows[sample["meta"]["series_id"]]
        assert sample["image"].dtype == torch.float32 and sample["image"].shape == (1, 16, 16, 8)
        assert 0.0 <= sample["image"].min() and sample["image"].max() <= 1.0 and sample["image"].max() > 0.5
        assert sample["meta"]["sequence"] == row["sequence"] and sample["meta"]["vendor"] == row["vendor"]
        findings = sample["labels"]["findings"]
        assert findings.shape == (len(FINDING_CODES),)
        if row["label_findings"] is None:
            seen_missing_label = True
            assert torch.all(findings == -1)
        else:
            assert findings.tolist() == [float(c in row["label_findings"]) for c in FINDING_CODES]
            assert sample["labels"]["age"].item() == pytest.approx(row["age"])
            assert sample["labels"]["sex"].item() == {"F": 0, "M": 1}[row["sex"]]
        if row["report_findings"] is None:
            seen_missing_report = True
            assert sample["report"] == "" and sample["report_sections"] == {"findings": "", "impression": ""}
        else:
            assert sample["report"] == f"FINDINGS: {row['report_findings']}\nIMPRESSION: {row['report_impression']}"
            assert sample["report_sections"]["impression"] == row["report_impression"]
        if "mask" in sample:
            seen_mask = True
            assert sample["mask"].dtype == torch.uint8 and sample["mask"].shape == (1, 16, 16, 8)
            assert sample["mask"].sum() > 0
    assert seen_missing_label and seen_missing_report and seen_mask


def test_missing_age_and_sex_are_nan_and_minus_one(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site", n_patients=1, series_per_patient=1, seed=22, with_mask=False)
    site.labels.write_text("series_instance_uid,findings,age,sex,mask\n")
    # The header has PatientAge/PatientSex, so blank them in the catalog to mimic a bare export.
    index_site(site.dicom, site.reports, tmp_path / "cat", labels=site.labels, cfg=CFG)
    conn = open_catalog(tmp_path / "cat")
    conn.execute("UPDATE series SET age = NULL, sex = NULL")
    conn.close()
    sample = SeriesDataset(tmp_path / "cat", None)[0]
    assert math.isnan(sample["labels"]["age"].item()) and sample["labels"]["sex"].item() == -1


def test_loader_with_workers_and_no_open_connection(catalog) -> None:
    cat, _ = catalog
    dataset = SeriesDataset(cat, None, transform=_drop_mask)
    pickle.dumps(dataset)  # a held sqlite3.Connection would not pickle
    batches = list(DataLoader(dataset, batch_size=4, num_workers=2))
    assert sum(b["image"].shape[0] for b in batches) == 8
    assert batches[0]["labels"]["findings"].shape == (4, len(FINDING_CODES))
    assert len(batches[0]["meta"]["series_id"]) == 4
    assert len(SeriesDataset(cat, None, masks_only=True)) == 1


def _drop_mask(sample: dict) -> dict:
    return {k: v for k, v in sample.items() if k != "mask"}


def test_bad_split_and_missing_cache(catalog, tmp_path: Path) -> None:
    cat, _ = catalog
    with pytest.raises(InputError, match="split"):
        SeriesDataset(cat, "training")
    with pytest.raises(InputError, match="data index"):
        SeriesDataset(tmp_path / "nothing")
    dataset = SeriesDataset(cat, None)
    dataset.rows[0] = {**dataset.rows[0], "cache_path": "cache/ff/missing.npz"}
    with pytest.raises(InputError, match="index"):
        dataset[0]
