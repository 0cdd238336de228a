"""Hash a short federated run's outputs, to show that a refactor changes nothing.

Three synthetic hospitals (12 series each) run pretrain -> align -> heads ->
evaluate through the coordinator's pipeline and the real ClientApp in this
process, twice: without DP, and with sample-level DP-SGD in every training
stage (synthetic negatives for alignment) plus local site-level DP in
pretraining. Central site-level DP is left out: its noise comes from the OS on
purpose, so no two runs match.

Printed per run: one SHA-256 over the final global state (every tensor's key,
dtype, shape and bytes), one over every metrics row and the results file with
wall times and timestamps removed, and one over both. Run it before and after a
change that should preserve behaviour; the hashes must be equal.

    python benchmarks/pipeline_hash.py [--sites /tmp/fedmri-hash-sites] [--out /tmp/fedmri-hash]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

import _tests_path  # noqa: F401 -- tests/ on sys.path: the shared test helpers

# Onto the micro preset (a 2-block, 32-wide encoder): narrower heads than its 256.
OVERRIDES = ["heads.hidden_dim=32"]
# Keys whose values are clocks, not results.
_CLOCK_KEYS = {"time", "wall-time-s", "overhead-s"}


def _catalogs(root: Path) -> Path:
    """Index the three hospitals once: a catalog's pseudonym salt is random, so only the same catalogs
    give the same batches."""
    from fedmri.config import load_config
    from fedmri.data.indexer import index_site
    from fedmri.simulations.synth import generate_site

    catalogs = root / "catalogs"
    if (catalogs / "site-03" / ".complete").is_file():
        return catalogs
    shutil.rmtree(root, ignore_errors=True)
    cfg = load_config("tiny")
    for i in (1, 2, 3):
        name = f"site-{i:02d}"
        hospital = root / "hospitals" / name
        generate_site(hospital, site_index=i, seed=0, preset="tiny", series_per_site=12)
        index_site(hospital / "dicom", hospital / "reports.csv", catalogs / name, labels=hospital / "labels.csv",
                   cfg=cfg)
        (catalogs / name / ".complete").touch()
    return catalogs


def _sites(catalogs: Path, root: Path) -> list[Path]:
    """Fresh copies of the catalogs (privacy ledgers and feature caches start empty) and a site file each."""
    from omegaconf import OmegaConf

    files = []
    for i in (1, 2, 3):
        name = f"site-{i:02d}"
        catalog = root / "catalogs" / name
        shutil.copytree(catalogs / name, catalog)
        site_file = root / f"{name}.yaml"
        site_file.write_text(OmegaConf.to_yaml(OmegaConf.create(
            {"name": name, "catalog": str(catalog), "threads": 1, "batch_size": 2})))
        files.append(site_file)
    return files


def _federation(name: str, root: Path, dp: bool):
    from omegaconf import OmegaConf

    from fedmri.server.config import load_federation

    private = {"dp": {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0}} if dp else {}
    site_dp = {"site_dp": {"mode": "local", "noise_multiplier": 0.5, "clip_norm": 5.0}} if dp else {}
    overrides = OVERRIDES + (["align.dp_negatives=synthetic"] if dp else [])
    body = {"name": name, "preset": "micro", "overrides": overrides, "min_sites": 2, "run_root": str(root / "runs"),
            "export": False, "wait_for_sites_s": 5,
            "stages": [{"name": "pretrain", "rounds": 2, "local_steps": 2} | private | site_dp,
                       {"name": "align", "rounds": 1, "local_steps": 2} | private,
                       {"name": "heads", "rounds": 1, "local_steps": 3} | private,
                       {"name": "evaluate"}]}
    return load_federation(text=OmegaConf.to_yaml(OmegaConf.create(body)))


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in sorted(value.items()) if k not in _CLOCK_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def run(root: Path, files: list[Path], dp: bool) -> dict[str, str]:
    from fedmri.server.pipeline import Pipeline
    from helpers.local_grid import LocalGrid

    name = "dp" if dp else "plain"
    pipeline = Pipeline(_federation(name, root, dp))
    pipeline.run_all(LocalGrid({101 + i: f for i, f in enumerate(files)}))
    h_state = hashlib.sha256()
    for key in sorted(pipeline.state):
        t = pipeline.state[key].detach().contiguous().cpu()
        h_state.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h_state.update(t.numpy().tobytes())
    run_dir = root / "runs" / name
    rows = [_strip(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    results = _strip(json.loads((run_dir / "results.json").read_text()))
    h_metrics = hashlib.sha256(json.dumps([rows, results], sort_keys=True).encode())
    both = hashlib.sha256((h_state.hexdigest() + h_metrics.hexdigest()).encode())
    return {"state": h_state.hexdigest(), "metrics": h_metrics.hexdigest(), "all": both.hexdigest()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=Path, default=Path("/tmp/fedmri-hash-sites"),
                        help="where the hospitals are generated and indexed once, then reused")
    parser.add_argument("--out", type=Path, default=Path("/tmp/fedmri-hash"))
    args = parser.parse_args()
    from helpers.identity import server_identity

    with server_identity():  # what Flower's ServerApp runtime sets before a ServerApp creates messages
        shutil.rmtree(args.out, ignore_errors=True)
        t0 = time.perf_counter()
        catalogs = _catalogs(args.sites)
        print(f"catalogs ready in {time.perf_counter() - t0:.0f} s")
        for dp in (False, True):
            t0 = time.perf_counter()
            root = args.out / ("dp" if dp else "plain")
            hashes = run(root, _sites(catalogs, root), dp)
            print(f"{'dp' if dp else 'plain':5s} state {hashes['state'][:16]}  metrics {hashes['metrics'][:16]}  "
                  f"all {hashes['all'][:16]}  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
