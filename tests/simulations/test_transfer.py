"""Acceptance of issue 6: the federated encoder against random init, on a hospital outside the federation.

The main command on its embedded default with 16 series per site instead of 24
(3 synthetic hospitals, tiny preset, pretrain 3x20 -> align 2x20 -> heads 2x20
-> evaluate; 40 s less to synthesise), in the federated mode and the
random-init mode (the same heads, tuned the same way, on a randomly
initialised encoder). The held-out hospital (48 series, ~12 studies) is
synthesised from a seed of its own with a vendor no site has.

Margins, from ``benchmarks/bench_transfer.py --modes federated random --seeds 0 1 2 3
series_per_site=16 holdout_series=48 "federation.overrides=[]"`` (this test's config;
``benchmarks/RESULTS.md``, 2026-12-08, after the patch projection became a matmul):
report->image R@5 0.62-0.93 federated against 0.15-0.50 random (differences +0.25 to
+0.64; seed 0, run here, +0.64), median rank 2.5-4.0 against 5.5-26 (differences -2 to
-22; seed 0 -9.5). The test asks for +0.15 (about two of the ~14 queries) and a median
rank lower by 2: seed 2's random init ranked well enough to meet the second only at
its edge. ``FEDMRI_TRANSFER_SEED`` runs it on another seed.

Disease AUROC is not asserted here: at this scale it does not beat random init
robustly (see the benchmark), and a margin that holds on one seed only would
prove nothing.
"""

from __future__ import annotations

import json
import os

import pytest
from simulate_process import run_simulate

SEED = int(os.environ.get("FEDMRI_TRANSFER_SEED", "0"))


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, float]]:
    """The held-out hospital's evaluation of the federated and the random-init encoder."""
    root = tmp_path_factory.mktemp("transfer")
    # The demo's run config without its lesion heads (segmentation, anomaly: minutes of CPU per mode).
    out = run_simulate(["--mode", "federated", "--mode", "random", "series_per_site=16", "holdout_series=48",
                        "federation.overrides=[]", f"federation.seed={SEED}",
                        "federation.name=transfer", f"federation.run_root={root}"], root)
    assert out.returncode == 0, out.stdout[-3000:]
    # The hospitals are synthesised in a pool of processes; their lines reach the terminal.
    assert "[data] holdout-01: synthesising 48 series" in out.stdout, out.stdout[:3000]
    assert "[data] holdout-01: 48 series indexed" in out.stdout, out.stdout[:3000]
    results = json.loads((root / "transfer" / "results.json").read_text())
    assert results["holdout_sites"] == ["holdout-01"]
    return results["holdout"]


@pytest.mark.slow
def test_report_to_image_retrieval_beats_random_init_on_a_held_out_hospital(held_out: dict) -> None:
    federated, random = held_out["federated"], held_out["random"]
    assert federated["num-pairs"] == random["num-pairs"] == 48, (federated, random)
    assert federated["t2i_r5"] >= random["t2i_r5"] + 0.15, (federated["t2i_r5"], random["t2i_r5"])
    assert federated["t2i_medr"] <= random["t2i_medr"] - 2, (federated["t2i_medr"], random["t2i_medr"])


@pytest.mark.slow
def test_held_out_scores_are_of_the_heads_and_in_range(held_out: dict) -> None:
    # Both modes tuned and scored the same heads there, so the comparison is like for like.
    for mode in ("federated", "random"):
        scores = held_out[mode]
        for key in ("findings_auroc_macro", "findings_auroc_in_region_macro", "body_region_accuracy",
                    "sequence_accuracy"):
            assert 0.0 <= scores[key] <= 1.0, (mode, key, scores.get(key))
