"""Worker processes of `fedmri data index`: the same catalog and cache for any number of workers."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from helpers.site_factory import add_bad_inputs, make_site

from fedmri.config import load_config
from fedmri.data.catalog_db import SALT_FILE
from fedmri.data.index_pool import MAX_DEFAULT_WORKERS, IndexPool, default_workers
from fedmri.data.indexer import index_site
from fedmri.errors import ConfigError, FedmriError

CFG = load_config("tiny", overrides=["data.preprocess.target_shape=[16,16,8]"])
# Times of day: the only columns two runs may disagree on.
_CLOCK_COLUMNS = {"series": ("indexed_at",), "runs": ("started_at", "finished_at")}


def _dump(catalog: Path) -> dict[str, list[tuple]]:
    """Every table, rows in storage order (the order the indexer wrote them), clock columns left out."""
    conn = sqlite3.connect(catalog / "catalog.sqlite")
    conn.row_factory = sqlite3.Row
    dump = {}
    for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
        skip = _CLOCK_COLUMNS.get(table, ())
        dump[table] = [tuple(v for k, v in zip(r.keys(), r, strict=True) if k not in skip)
                       for r in conn.execute(f"SELECT * FROM {table} ORDER BY rowid")]
    conn.close()
    return dump


def _cache(catalog: Path) -> dict[str, dict[str, np.ndarray]]:
    entries = {}
    for path in sorted((catalog / "cache").rglob("*")):
        if path.is_file():
            with np.load(path) as data:
                entries[str(path.relative_to(catalog))] = {k: data[k] for k in data.files}
    return entries


def _square(x: int) -> int:
    return x * x


def _die(x: int) -> int:
    os._exit(3)


def test_default_workers_is_the_usable_cpus_capped() -> None:
    assert 1 <= default_workers() <= min(MAX_DEFAULT_WORKERS, len(os.sched_getaffinity(0)))


@pytest.mark.parametrize("workers", [-1, True, 1.5])
def test_illegal_worker_count(workers) -> None:
    with pytest.raises(ConfigError, match="workers"):
        IndexPool(workers)


def test_results_come_in_order_and_a_dead_worker_is_an_error() -> None:
    with IndexPool(2) as pool:
        assert list(pool.map(_square, [(i,) for i in range(50)], chunksize=3)) == [i * i for i in range(50)]
        assert len(pool.worker_pids()) == 2
    with IndexPool(2) as pool, pytest.raises(FedmriError, match="worker process died.*fewer --workers"):
        list(pool.map(_die, [(1,), (2,)]))
    # Auto: small work stays in this process.
    with IndexPool(0) as pool:
        assert list(pool.map(_square, [(2,), (3,)], auto_min=10)) == [4, 9] and pool.worker_pids() == []


def test_one_and_two_workers_write_the_same_catalog_and_cache(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site", n_patients=3, series_per_patient=2, seed=21)
    add_bad_inputs(site)  # skip reasons from both stages, a failed series, a duplicate file
    one, two = tmp_path / "one", tmp_path / "two"
    first = index_site(site.dicom, site.reports, one, labels=site.labels, cfg=CFG, workers=1)
    two.mkdir()
    shutil.copy(one / SALT_FILE, two / SALT_FILE)  # the same site: the same pseudonyms
    second = index_site(site.dicom, site.reports, two, labels=site.labels, cfg=CFG, workers=2)

    assert first.n_series == second.n_series == 6 and first.n_loaded == second.n_loaded
    assert [(s.path, s.reason) for s in first.skipped] == [(s.path, s.reason) for s in second.skipped]
    assert _dump(one) == _dump(two)
    a, b = _cache(one), _cache(two)
    assert a.keys() == b.keys() and len(a) == 6
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            np.testing.assert_array_equal(a[name][key], b[name][key])

    # Nothing new: no worker is started, nothing is read.
    again = index_site(site.dicom, site.reports, two, labels=site.labels, cfg=CFG, workers=2)
    assert again.n_loaded == again.n_headers_read == 0 and again.n_series == 6
