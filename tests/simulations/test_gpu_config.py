"""`fedmri simulate` on a GPU: the device keys are checked up front and reach the site files, Ray and the ceiling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedmri.client.site import load_site
from fedmri.data.site_inputs import FINDING_CODES
from fedmri.errors import ConfigError
from fedmri.simulations.ceiling import CeilingConfig, Split, train_ceiling
from fedmri.simulations.runner import write_site_file, client_resources, load_simulation


@pytest.fixture
def cuda_present(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine whose torch sees a GPU (nothing here runs on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.fixture
def cuda_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cpu_is_the_default_and_reserves_no_gpu(tmp_path: Path) -> None:
    sim = load_simulation(None, [])
    assert sim.device == "cpu"
    assert client_resources(sim) == {"num_cpus": 1.0, "num_gpus": 0.0}
    write_site_file(sim, tmp_path / "site-01.yaml", "site-01", tmp_path / "catalog")
    site = load_site(tmp_path / "site-01.yaml")
    assert site.device == "cpu" and site.num_workers == 0


def test_cuda_reaches_the_site_files_and_rays_reservation(tmp_path: Path, cuda_present: None) -> None:
    sim = load_simulation(None, ["device=cuda", "gpus_per_site=0.25", "cpus_per_site=4", "workers_per_site=2"])
    assert client_resources(sim) == {"num_cpus": 4.0, "num_gpus": 0.25}
    write_site_file(sim, tmp_path / "site-01.yaml", "site-01", tmp_path / "catalog")
    site = load_site(tmp_path / "site-01.yaml")
    assert site.device == "cuda" and site.num_workers == 2


def test_gpus_per_site_is_ignored_on_cpu() -> None:
    for share in ("0.5", "0"):
        assert client_resources(load_simulation(None, [f"gpus_per_site={share}"]))["num_gpus"] == 0.0


def test_cuda_without_a_gpu_names_the_key_and_the_way_out(cuda_absent: None) -> None:
    with pytest.raises(ConfigError, match=r"device=cuda.*no CUDA GPU.*device=cpu"):
        load_simulation(None, ["device=cuda"])


@pytest.mark.parametrize(("override", "named"), [
    ("device=gpu", "device must be one of cpu, cuda"),
    ("device=cuda:0", "device must be one of cpu, cuda"),
    ("gpus_per_site=0", "gpus_per_site"),
    ("gpus_per_site=1.5", "gpus_per_site"),
    ("workers_per_site=-1", "workers_per_site"),
])
def test_bad_device_keys_are_config_errors(override: str, named: str, cuda_present: None) -> None:
    with pytest.raises(ConfigError, match=named):
        load_simulation(None, ["device=cuda", override] if override.startswith("gpus") else [override])


def _split(n: int = 4) -> Split:
    y = torch.zeros(n, len(FINDING_CODES))
    y[: n // 2, 0] = 1.0
    return Split(torch.rand(n, 1, 16, 16, 16), y, ["brain"] * n, ["T1"] * n, [f"p{i}" for i in range(n)])


@pytest.mark.parametrize(("device", "named"), [("cuda", "no CUDA GPU"), ("gpu", "not a torch device")])
def test_ceiling_refuses_a_device_it_cannot_use(device: str, named: str, cuda_absent: None) -> None:
    with pytest.raises(ConfigError, match=named):
        train_ceiling(_split(), CeilingConfig(epochs=1, threads=1, device=device), say=lambda s: None)
