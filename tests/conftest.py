"""Test-wide settings: offline, quiet, and single-threaded BLAS where it helps."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Nothing may be fetched from a model hub, ever.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Under pytest-xdist (`make test`: two workers on the 2-core CI machine) each worker
# gets one BLAS thread; two workers with two threads each would fight over the cores,
# which slows the tiny models of the tests many times over.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_worker() -> None:
    if XDIST_WORKER:
        import torch

        torch.set_num_threads(1)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run torch on one thread: tiny models train several times faster so when the CPU is shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def federation_sites(tmp_path_factory: pytest.TempPathFactory) -> list:
    """Three synthetic hospitals (12 series each: a validation patient at every site), indexed for the tiny preset, with a site.yaml each.

    Returns a list of (name, site_file, catalog_dir). Site files train on one
    thread with batch 2; tests copy and edit them for other policies.
    """
    from omegaconf import OmegaConf

    from fedmri.config import load_config
    from fedmri.data.indexer import index_site
    from fedmri.simulations.synth import generate_site

    root = tmp_path_factory.mktemp("federation")
    cfg = load_config("tiny")
    sites = []
    for i in (1, 2, 3):
        name = f"site-{i:02d}"
        hospital = root / "hospitals" / name
        generate_site(hospital, site_index=i, seed=0, preset="tiny", series_per_site=12)
        catalog = root / "catalogs" / name
        index_site(hospital / "dicom", hospital / "reports.csv", catalog, labels=hospital / "labels.csv", cfg=cfg)
        site_file = root / f"{name}.yaml"
        site_file.write_text(OmegaConf.to_yaml(OmegaConf.create(
            {"name": name, "catalog": str(catalog), "threads": 1, "batch_size": 2})))
        sites.append((name, site_file, catalog))
    return sites


@pytest.fixture(scope="module")
def module_server_identity() -> Iterator[None]:
    """What Flower's ServerApp runtime sets before a ServerApp creates messages, for a module's fixtures."""
    from helpers.identity import server_identity

    with server_identity():
        yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files holding slow tests run first, each file's tests in their own order.

    `make test` hands whole files to two xdist workers in collection order; a
    minutes-long file collected last would leave the other worker idle at the end.
    """
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # stable: file order and order within a file kept
