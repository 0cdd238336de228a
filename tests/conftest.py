"""Test-wide settings: offline, quiet, and single-threaded BLAS where it helps."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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
    from fedmri.simulations.runner import synthetic_salt
    from fedmri.simulations.synth import generate_site

    root = tmp_path_factory.mktemp("federation")
    cfg = load_config("tiny")
    sites = []
    for i in (1, 2, 3):
        name = f"site-{i:02d}"
        hospital = root / "hospitals" / name
        generate_site(hospital, site_index=i, seed=0, preset="tiny", series_per_site=12)
        catalog = root / "catalogs" / name
        synthetic_salt(catalog, 0, name)  # a random salt would put other patients in validation on every run
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


# The longest files, longest first, in seconds of one worker (junit times of `make test`
# on the 2-core machine, 2026-12-07; the late-kill test left test_deploy.py for
# test_deploy_secagg.py since). Only the order matters: a file missing here runs after
# these, with the other files that hold slow tests.
LONGEST_FILES = {
    "e2e/test_deploy.py": 600, "simulations/test_transfer.py": 360, "simulations/test_simulate_cli.py": 352,
    "e2e/test_deploy_resume.py": 296, "e2e/test_deploy_secagg.py": 120, "server/test_secagg_pipeline.py": 108,
    "server/test_pipeline.py": 95, "common/ssl/test_ssl_training.py": 90, "server/test_downlink.py": 75,
    "e2e/test_server_supervision.py": 54, "common/data/test_catalog_interrupt.py": 38, "server/test_uplink.py": 30,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first (:data:`LONGEST_FILES`), then the other files holding slow tests,
    each file's tests in their own order.

    `make test` hands whole files to the xdist workers in collection order (it turns off
    xdist's reordering by test count, which would start the few-test, minutes-long e2e
    files last); a minutes-long file started late would leave the other workers idle at
    the end.
    """
    here = Path(__file__).parent
    slow = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> tuple[int, float]:
        seconds = LONGEST_FILES.get(item.path.relative_to(here).as_posix()) if item.path.is_relative_to(here) else None
        if seconds is not None:
            return 0, -seconds
        return (1, 0.0) if item.path in slow else (2, 0.0)

    items.sort(key=rank)  # stable: the order within a file is kept
