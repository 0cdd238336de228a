"""A tiny indexed hospital, its site file and a small run config, shared by the client tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers.site_factory import make_site
from omegaconf import DictConfig

from fedmri.config import load_config, to_yaml

# 16^3 volumes, a 2-block 32-wide ViT with 8^3 patches, small heads: a local
# step takes ~0.1 s on one CPU thread.
OVERRIDES = [
    "data.preprocess.target_shape=[16,16,16]", "model.img_size=[16,16,16]", "model.patch_size=8",
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.layerscale_init=0",
    "ssl.global_crops_size=16", "ssl.local_crops_size=8", "ssl.local_crops_number=2",
    "ssl.head_n_prototypes=32", "ssl.ibot_n_prototypes=32", "ssl.head_hidden_dim=64",
    "ssl.head_bottleneck_dim=32", "align.embed_dim=32",
]


@pytest.fixture(scope="session")
def small_cfg() -> DictConfig:
    """The tiny preset shrunk by :data:`OVERRIDES`."""
    return load_config("tiny", overrides=OVERRIDES)


@pytest.fixture(scope="session")
def run_yaml(small_cfg: DictConfig) -> str:
    """The run config as the server sends it (resolved YAML)."""
    return to_yaml(small_cfg)


@pytest.fixture(scope="session")
def site_file(tmp_path_factory: pytest.TempPathFactory, small_cfg: DictConfig) -> Path:
    """site.yaml of a 6-patient hospital (2 series each): 8 train, 2 val, 2 test series."""
    from fedmri.data.indexer import index_site
    from fedmri.simulations.runner import synthetic_salt

    root = tmp_path_factory.mktemp("client-site")
    site = make_site(root / "hospital", n_patients=6, series_per_patient=2, seed=5, with_mask=False)
    synthetic_salt(root / "catalog", 5, "site-a")  # the same patients in each split on every run
    index_site(site.dicom, site.reports, root / "catalog", labels=site.labels, cfg=small_cfg)
    path = root / "site.yaml"
    path.write_text("name: site-a\ncatalog: catalog\nbatch_size: 4\n"
                    "policy:\n  stages: [pretrain, align, evaluate]\n  max_local_steps: 20\n")
    return path


@pytest.fixture(scope="session")
def initial(run_yaml: str) -> dict:
    """The coordinator's initial state for every group."""
    from fedmri.client.trainers import parse_run_config
    from fedmri.wire import initial_state

    return initial_state(parse_run_config(run_yaml))


@pytest.fixture(scope="session")
def request_values(run_yaml: str) -> Callable[..., dict[str, Any]]:
    """ConfigRecord values of a request for ``stage``, with per-stage defaults; keywords override."""

    def make(stage: str, **overrides: Any) -> dict[str, Any]:
        values: dict[str, Any] = {"stage": stage, "round": 1, "server-round": 1, "seed": 0, "run-name": "test",
                                  "fedmri-config": run_yaml}
        if stage == "pretrain":
            values |= {"local-steps": 4, "lr": 1e-3, "weight-decay": 0.04, "teacher-momentum": 0.99,
                       "teacher-temp": 0.04}
        elif stage == "align":
            values |= {"local-steps": 4, "lr": 1e-3, "weight-decay": 0.01}
        return values | {k.replace("_", "-"): v for k, v in overrides.items()}

    return make
