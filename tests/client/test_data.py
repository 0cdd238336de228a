"""The pooled dataset of the centralized baseline keeps every site's own splits."""

from __future__ import annotations

from omegaconf import OmegaConf

from fedmri.client.trainers.data import PooledDataset, site_dataset
from fedmri.data.dataset import SeriesDataset


def test_pooled_site_is_the_union_of_each_sites_split(federation_sites: list) -> None:
    catalogs = [str(c) for _, _, c in federation_sites]
    pooled_cfg = OmegaConf.create({"catalog": catalogs[0], "extra_catalogs": catalogs[1:]})
    for split in ("train", "val"):
        parts = [SeriesDataset(c, split) for c in catalogs]
        pooled = site_dataset(pooled_cfg, split)
        assert isinstance(pooled, PooledDataset)
        assert len(pooled) == sum(len(p) for p in parts) > 0
        assert [r["cache_path"] for r in pooled.rows] == [r["cache_path"] for p in parts for r in p.rows]
        assert {r["meta"]["split"] for r in pooled.rows} == {split}
        last = pooled[len(pooled) - 1]
        assert last["meta"] == parts[-1][len(parts[-1]) - 1]["meta"]


def test_a_site_without_extra_catalogs_reads_its_own_catalog(federation_sites: list) -> None:
    _, _, catalog = federation_sites[0]
    ds = site_dataset(OmegaConf.create({"catalog": str(catalog), "extra_catalogs": []}), "train")
    assert isinstance(ds, SeriesDataset) and len(ds) == len(SeriesDataset(catalog, "train"))
