"""Zero-shot findings: prompts per finding, CLIP prompt ensembling, cosine-difference scores, in-region AUROC."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedmri.align import FINDING_PROMPTS, FindingPrompts, prompt_embeddings, zeroshot_metrics, zeroshot_scores
from fedmri.align.zeroshot import PROMPT_TEMPLATE
from fedmri.data.site_inputs import FINDING_CODES

NEGATION = re.compile(r"\b(no|not|without|normal|unremarkable)\b")


def test_every_finding_code_has_distinct_positive_and_negative_prompts() -> None:
    assert set(FINDING_PROMPTS) == set(FINDING_CODES)
    for code, p in FINDING_PROMPTS.items():
        assert len(p.positive) >= 3 and len(p.negative) >= 3, code
        assert not set(p.positive) & set(p.negative), code
        assert all(NEGATION.search(s.lower()) for s in p.negative), code
        assert not any(NEGATION.search(s.lower()) for s in p.positive), code


def test_a_finding_without_positive_or_negative_prompts_is_refused() -> None:
    with pytest.raises(ValueError, match="positive and negative"):
        FindingPrompts(("Acute infarct.",), ())


class _Lookup:
    """encode_text from a table text -> vector, counting its calls."""

    def __init__(self, table: dict[str, torch.Tensor]) -> None:
        self.table, self.calls = table, 0

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls += 1
        return torch.stack([self.table[t] for t in texts])


def test_prompt_sets_are_embedded_once_and_ensembled_as_clip_does() -> None:
    prompts = {"a": FindingPrompts(("a1", "a2"), ("not a",)), "b": FindingPrompts(("b1",), ("not b1", "not b2"))}
    g = torch.Generator().manual_seed(0)
    table = {PROMPT_TEMPLATE.format(t): torch.randn(6, generator=g) * (i + 1)
             for i, t in enumerate(["a1", "a2", "not a", "b1", "not b1", "not b2"])}
    encode = _Lookup(table)
    pos, neg = prompt_embeddings(encode, codes=("b", "a"), prompts=prompts)
    assert encode.calls == 1
    assert pos.shape == neg.shape == (2, 6)

    def ensemble(*texts: str) -> torch.Tensor:  # open_clip: normalise, mean, normalise
        return F.normalize(torch.stack([F.normalize(table[PROMPT_TEMPLATE.format(t)], dim=0) for t in texts]).mean(0),
                           dim=0)

    torch.testing.assert_close(pos[0], ensemble("b1"))
    torch.testing.assert_close(pos[1], ensemble("a1", "a2"))
    torch.testing.assert_close(neg[0], ensemble("not b1", "not b2"))
    torch.testing.assert_close(neg[1], ensemble("not a"))


def test_prompt_embeddings_refuse_a_code_without_prompts_and_a_wrong_encoder() -> None:
    with pytest.raises(ValueError, match="no zero-shot prompts for finding codes \\['fracture'\\]"):
        prompt_embeddings(lambda texts: torch.zeros(len(texts), 4), codes=("mass", "fracture"))
    with pytest.raises(ValueError, match="encode_text gave shape \\(1, 4\\)"):
        prompt_embeddings(lambda texts: torch.zeros(1, 4), codes=("mass",))


def test_zeroshot_scores_are_the_cosine_difference() -> None:
    pos, neg = torch.eye(3)[:2], torch.eye(3)[1:]  # finding 0: e0 against e1; finding 1: e1 against e2
    images = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0], [1.0, 1.0, 0.0]])
    expected = torch.tensor([[1.0, 0.0], [0.0, -1.0], [0.0, 2 ** -0.5]])
    torch.testing.assert_close(zeroshot_scores(images, pos, neg), expected)
    with pytest.raises(ValueError, match="do not match"):
        zeroshot_scores(images, pos, neg[:, :2])


def _matched_embeddings(labels: torch.Tensor, dim: int = 64, noise: float = 0.3) -> tuple[torch.Tensor, ...]:
    """Class embeddings and images that are the sum of the present findings' positives and absent ones' negatives."""
    g = torch.Generator().manual_seed(1)
    n, n_codes = labels.shape
    classes = F.normalize(torch.randn(2 * n_codes, dim, generator=g), dim=-1)
    pos, neg = classes[:n_codes], classes[n_codes:]
    images = labels @ pos + (1 - labels) @ neg + noise * torch.randn(n, dim, generator=g)
    return images, pos, neg


def test_matched_embeddings_separate_every_finding_and_swapped_prompts_invert_it() -> None:
    rng = np.random.default_rng(0)
    labels = torch.as_tensor(rng.random((60, len(FINDING_CODES))) < 0.4, dtype=torch.float32)
    images, pos, neg = _matched_embeddings(labels)
    regions, patients = ["brain"] * 60, [f"p{i // 2}" for i in range(60)]
    known = torch.ones(60, dtype=torch.bool)
    m = zeroshot_metrics(zeroshot_scores(images, pos, neg), labels, known, regions, patients, n_boot=100)
    assert all(m[f"zeroshot_findings_auroc_in_region/{c}"] > 0.95 for c in FINDING_CODES), m
    assert m["zeroshot_findings_auroc_in_region_macro_ci_low"] <= m["zeroshot_findings_auroc_in_region_macro"]
    assert m["zeroshot_findings_auroc_in_region_macro"] <= m["zeroshot_findings_auroc_in_region_macro_ci_high"]
    swapped = zeroshot_metrics(zeroshot_scores(images, neg, pos), labels, known, regions, patients, n_boot=10)
    assert swapped["zeroshot_findings_auroc_in_region_macro"] < 0.05


def test_in_region_auroc_scores_a_finding_only_where_it_occurs() -> None:
    # Effusion in knees only: the knees outscore every brain, but within the knees the scores are poor.
    col = FINDING_CODES.index("effusion")
    scores = torch.zeros(8, len(FINDING_CODES))
    scores[:, col] = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.1, 0.1, 0.1, 0.1])
    labels = torch.zeros(8, len(FINDING_CODES))
    labels[[1, 3], col] = 1.0
    regions = ["knee"] * 4 + ["brain"] * 4
    m = zeroshot_metrics(scores, labels, torch.ones(8, dtype=torch.bool), regions, [str(i) for i in range(8)],
                         n_boot=10)
    assert m["zeroshot_findings_auroc/effusion"] == pytest.approx(9 / 12)  # 2 positives x 6 negatives
    assert m["zeroshot_findings_auroc_in_region/effusion"] == pytest.approx(1 / 4)  # among the 4 knees
    assert m["zeroshot_findings_auroc_in_region_macro"] == pytest.approx(1 / 4)  # the other codes have no positive
    # Only rank metrics: a cosine difference has no threshold for accuracy or F1.
    assert all(k.startswith("zeroshot_findings_auroc") for k in m)
    # Unknown rows are left out: hiding the knee positive scored below a negative raises the in-region AUROC.
    known = torch.tensor([True, True, True, False, True, True, True, True])
    m = zeroshot_metrics(scores, labels, known, regions, [str(i) for i in range(8)], n_boot=10)
    assert m["zeroshot_findings_auroc_in_region/effusion"] == pytest.approx(1 / 2)


def test_through_a_perfectly_aligned_space_the_prompts_read_the_synthetic_reports(minilm) -> None:
    # An image embedded exactly where its report is: what zero-shot can reach, given the prompts' wording.
    from fedmri.simulations.synth.cohort import plan_site
    from fedmri.simulations.synth.reports import write_report
    from fedmri.simulations.synth.sites import ARCHETYPES
    from fedmri.text import prepare_report

    wm = np.random.default_rng(0).uniform(-20, 20, size=(500, 3)).astype(np.float32)
    texts, labels, regions, patients = [], [], [], []
    for k, site in enumerate(ARCHETYPES[:3]):
        rng = np.random.default_rng(k)
        for p, patient in enumerate(plan_site(site, k + 1, 5, 80, wm, rng)):
            for study in patient.studies:
                findings, impression = write_report(study, patient, rng)
                texts.append(prepare_report(findings=findings, impression=impression))
                present = {f.code for f in study.findings}
                labels.append([float(c in present) for c in FINDING_CODES])
                regions.append(study.region)
                patients.append(f"{k}-{p}")

    @torch.no_grad()
    def encode(batch: list[str]) -> torch.Tensor:
        tokens = minilm.tokenize(batch)
        return minilm(tokens["input_ids"], tokens["attention_mask"])  # T, H: the tower's own space

    scores = zeroshot_scores(encode(texts), *prompt_embeddings(encode))
    m = zeroshot_metrics(scores, torch.tensor(labels), torch.ones(len(texts), dtype=torch.bool), regions, patients,
                         n_boot=10)
    assert all(m[f"zeroshot_findings_auroc_in_region/{c}"] >= 0.75 for c in FINDING_CODES), m
    assert m["zeroshot_findings_auroc_in_region_macro"] >= 0.85, m
