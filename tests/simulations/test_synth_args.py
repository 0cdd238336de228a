"""Argument checks and the never-mix-two-federations folder policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedmri.errors import ConfigError, InputError
from fedmri.simulations.synth import generate_federation, generate_site


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"sites": 0}, "sites"), ({"series_per_site": 0}, "series_per_site"), ({"workers": 0}, "workers"),
    ({"seed": -1}, "seed"), ({"sites": 2.5}, "sites"), ({"preset": "huge"}, "huge"),
])
def test_bad_arguments_are_config_errors_naming_the_value(tmp_path: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        generate_federation(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_site_index_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="site_index"):
        generate_site(tmp_path, site_index=0, seed=0)


def test_out_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError, match="file"):
        generate_federation(f, sites=1)


def test_foreign_content_is_never_overwritten(tmp_path: Path) -> None:
    site = tmp_path / "site-01"
    site.mkdir()
    (site / "patient.dcm").write_text("precious")
    with pytest.raises(InputError, match="not written by"):
        generate_federation(tmp_path, sites=1, preset="tiny", series_per_site=1)
    assert (site / "patient.dcm").read_text() == "precious"


@pytest.fixture(scope="module")
def one_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("one")
    generate_federation(root, sites=1, seed=3, preset="tiny", series_per_site=1)
    return root


def test_identical_rerun_reuses_the_site(one_site: Path) -> None:
    stamp = (one_site / "site-01" / "labels.csv").stat().st_mtime_ns
    info = generate_federation(one_site, sites=1, seed=3, preset="tiny", series_per_site=1)[0]
    assert info.reused and info.n_series == 1
    assert (one_site / "site-01" / "labels.csv").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("change", [{"seed": 4}, {"series_per_site": 2}, {"preset": "demo"}])
def test_other_parameters_do_not_mix_into_an_existing_site(one_site: Path, change: dict) -> None:
    args = {"sites": 1, "seed": 3, "preset": "tiny", "series_per_site": 1, **change}
    with pytest.raises(InputError, match="other parameters"):
        generate_federation(one_site, **args)


def test_sites_beyond_the_request_are_refused(tmp_path: Path) -> None:
    (tmp_path / "site-02").mkdir()
    with pytest.raises(InputError, match="site-02"):
        generate_federation(tmp_path, sites=1)


def test_interrupted_site_is_regenerated(tmp_path: Path) -> None:
    site = tmp_path / "site-01"
    generate_site(site, site_index=1, seed=3, preset="tiny", series_per_site=1)
    meta = json.loads((site / "site.json").read_text())
    (site / "site.json").write_text(json.dumps({**meta, "complete": False}))  # as if killed mid-run
    (site / "dicom" / "stale").mkdir()
    info = generate_site(site, site_index=1, seed=3, preset="tiny", series_per_site=1)
    assert not info.reused and not (site / "dicom" / "stale").exists()
    assert json.loads((site / "site.json").read_text())["complete"]
