"""Findings scored per sequence family: which sequences carry each finding for the model."""

from __future__ import annotations

import torch

from fedmri.heads.tasks import TASKS

FINDINGS = TASKS["findings"]


def _brains(n_per_family: int = 20) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    # Brain series, half with the first finding; its score is exact on FLAIR and reversed on T1.
    g = torch.Generator().manual_seed(0)
    families = ["FLAIR"] * n_per_family + ["T1"] * n_per_family
    target = torch.zeros(len(families), len(FINDINGS.classes))
    target[::2, 0] = 1.0
    scores = torch.randn(len(families), len(FINDINGS.classes), generator=g)
    scores[:n_per_family, 0] = target[:n_per_family, 0]
    scores[n_per_family:, 0] = -target[n_per_family:, 0]
    return scores, target, ["brain"] * len(families), families


def test_each_family_is_scored_on_its_own_series() -> None:
    scores, target, regions, families = _brains()
    known = torch.ones(len(families), dtype=torch.bool)
    code = FINDINGS.classes[0]
    by_family = FINDINGS.sequence_metrics(scores, target, known, regions, families)
    assert by_family[f"auroc_in_region/{code}@FLAIR"] == 1.0
    assert by_family[f"auroc_in_region/{code}@T1"] == 0.0
    # Pooled over both families, the finding is at chance: the split is what shows where it is seen.
    assert FINDINGS.region_metrics(scores, target, known, regions)[f"auroc_in_region/{code}"] == 0.5
    flair = torch.arange(20)
    expected = FINDINGS.region_metrics(scores[flair], target[flair], known[flair], regions[:20])
    assert {k: by_family[f"{k}@FLAIR"] for k in expected} == expected


def test_unknown_rows_and_one_class_families_give_no_figure() -> None:
    scores, target, regions, families = _brains()
    known = torch.ones(len(families), dtype=torch.bool)
    known[20:] = False  # no T1 series has a label
    by_family = FINDINGS.sequence_metrics(scores, target, known, regions, families)
    assert by_family and all(k.endswith("@FLAIR") for k in by_family)
    assert FINDINGS.sequence_metrics(scores, torch.zeros_like(target), known, regions, families) == {}
    assert TASKS["sequence"].sequence_metrics(scores, target, known, regions, families) == {}


def test_dense_heads_leave_the_mlp_heads_and_the_random_stream_as_without_them(cfg) -> None:
    # The demo adds segmentation and anomaly to the MLP tasks: the MLP heads' initial weights and the
    # dropout masks drawn after building the heads (a heads round builds them under its seed) stay the same.
    from omegaconf import OmegaConf

    from fedmri.heads.tasks import build_task_heads

    def build(tasks: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        torch.manual_seed(3)
        heads = build_task_heads(OmegaConf.merge(cfg, {"heads": {"tasks": tasks}}))
        return {k: v for k, v in heads.state_dict().items() if k.startswith(("findings.", "sex."))}, torch.rand(4)

    (mlp, after), (both, after_dense) = build(["findings", "sex"]), build(["findings", "segmentation", "sex",
                                                                            "anomaly"])
    assert mlp.keys() == both.keys() and all(torch.equal(mlp[k], both[k]) for k in mlp)
    assert torch.equal(after, after_dense)


def test_a_heads_round_at_base_sends_under_one_percent_of_the_encoder() -> None:
    # Issue 18: after alignment a site holds the frozen encoder, and a heads round sends it only the
    # head groups, every round. At base the default heads (a shared trunk) are under 1% of the
    # encoder's bytes; five separate heads of the same width would be 2.25%.
    from omegaconf import OmegaConf

    from fedmri.config import load_config
    from fedmri.heads.tasks import build_task_heads, task_heads_state
    from fedmri.models import build_encoder

    cfg = load_config("base")
    encoder = sum(v.numel() for v in build_encoder(cfg.model).state_dict().values())
    heads = sum(v.numel() for v in task_heads_state(build_task_heads(cfg)).values())
    separate = sum(v.numel() for v in task_heads_state(
        build_task_heads(OmegaConf.merge(cfg, {"heads": {"trunk_dim": 0}}))).values())
    assert heads <= 0.01 * encoder, heads / encoder
    assert separate > 0.02 * encoder  # what the trunk is for
