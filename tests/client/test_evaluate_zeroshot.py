"""Zero-shot findings in the site evaluation: every series scored, only aggregates back, skipped when unlabelled."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedmri.client.site import load_site
from fedmri.client.trainers import TrainRequest, parse_run_config
from fedmri.client.trainers import evaluate as evaluate_module
from fedmri.client.trainers.evaluate import run_evaluate
from fedmri.wire import select, stage_groups

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory, small_cfg) -> dict[str, Path]:
    """Site files of one hospital whose first three patients have no report: with and without labels."""
    from helpers.site_factory import make_site

    from fedmri.data.indexer import index_site
    from fedmri.simulations.runner import synthetic_salt

    root = tmp_path_factory.mktemp("zeroshot-site")
    site = make_site(root / "hospital", n_patients=6, series_per_patient=2, seed=5, with_mask=False)
    lines = site.reports.read_text().splitlines()
    site.reports.write_text("\n".join([lines[0], *lines[4:]]) + "\n")  # the header, patients 3-5
    out = {}
    for name, labels in (("labelled", site.labels), ("unlabelled", None)):
        synthetic_salt(root / name, 5, "site-z")  # the same patients in each split on every run
        index_site(site.dicom, site.reports, root / name, labels=labels, cfg=small_cfg)
        out[name] = root / f"{name}.yaml"
        out[name].write_text(f"name: site-z\ncatalog: {name}\nbatch_size: 4\n")
    return out


def _evaluate(site_file: Path, initial: dict, request_values, **request: object) -> dict[str, float]:
    req = dataclasses.replace(TrainRequest.from_config(request_values("evaluate", split="train")), **request)
    run_cfg = parse_run_config(req.fedmri_config)
    _, metrics = run_evaluate(load_site(site_file), run_cfg, select(initial, stage_groups("evaluate", run_cfg).down),
                              req)
    return metrics


def test_zero_shot_scores_every_series_of_the_split_reported_or_not(sites, initial, request_values,
                                                                    monkeypatch) -> None:
    seen = []
    real = evaluate_module.zeroshot_findings

    def spy(aligned, images, rows, *args, **kwargs):
        seen.append((images.shape[0], len(rows)))
        return real(aligned, images, rows, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "zeroshot_findings", spy)
    metrics = _evaluate(sites["labelled"], initial, request_values)
    n = metrics["num-examples"]
    assert 0 < metrics["num-pairs"] < n  # retrieval still ranks the reported series only
    assert seen == [(n, n)]
    # Only mass occurs at this hospital: it alone has an AUROC, with an interval around the macro mean.
    zs = {k: v for k, v in metrics.items() if k.startswith("zeroshot_")}
    macros = [f"zeroshot_findings_auroc{r}_macro" for r in ("", "_in_region")]
    assert set(zs) == {"zeroshot_findings_auroc/mass", "zeroshot_findings_auroc_in_region/mass", *macros,
                       *(f"{m}_ci_{b}" for m in macros for b in ("low", "high"))}
    for key in ("zeroshot_findings_auroc_macro", "zeroshot_findings_auroc_in_region_macro"):
        assert 0.0 <= zs[key + "_ci_low"] <= zs[key] <= zs[key + "_ci_high"] <= 1.0


def test_zero_shot_is_skipped_without_labels_or_without_an_align_stage(sites, initial, request_values) -> None:
    unlabelled = _evaluate(sites["unlabelled"], initial, request_values)
    assert "i2t_r1" in unlabelled and not any(k.startswith("zeroshot_") for k in unlabelled)
    unaligned = _evaluate(sites["labelled"], initial, request_values, evaluate_aligned=False)
    assert "i2t_r1" in unaligned and not any(k.startswith("zeroshot_") for k in unaligned)
