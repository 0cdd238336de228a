"""Zero-shot findings through the aligned space: text prompts, no head.

Each finding code gets a few positive and a few negative prompts written as a
radiologist words an impression ("Acute infarct in the left basal ganglia."
against "No acute infarct."). Each set is embedded by the text tower once and
averaged into one class embedding, the prompt ensembling of CLIP (Radford et
al., 2021, sec. 3.1.4; open_clip's ``build_zero_shot_classifier``): normalise
each prompt's embedding, take the mean, normalise again. A series' score for a
finding is ``cos(image, positive) - cos(image, negative)``, as CheXzero
(Tiu et al., Nature BME 2022) scores a chest X-ray against "<finding>" and
"no <finding>": the negative removes what every report of the region shares.

The scores are rated with the heads' own findings metrics
(:meth:`fedmri.heads.tasks.TaskSpec.metrics`, ``region_metrics`` and
:func:`fedmri.heads.intervals.task_intervals`), so a zero-shot figure and a
head's figure are the same measurement of different scores.

The prompts are general radiology wording, not the synthetic report
templates: a simulation's zero-shot figure must not come from looking up a
sentence that the site's reports repeat verbatim.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fedmri.data.site_inputs import FINDING_CODES

# Reports reach the text tower as "Impression: ... Findings: ..." (fedmri.text.prepare_report);
# a prompt is laid out as the impression it imitates.
PROMPT_TEMPLATE = "Impression: {}"
# Prefix of the metric keys, before the heads' own names: zeroshot_findings_auroc_in_region_macro, ...
PREFIX = "zeroshot_findings_"


@dataclass(frozen=True)
class FindingPrompts:
    """The sentences that affirm and that negate one finding.

    Attributes:
        positive: Phrasings of the finding present.
        negative: Phrasings of the finding absent.
    """

    positive: tuple[str, ...]
    negative: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.positive or not self.negative:
            raise ValueError(f"a finding needs positive and negative prompts, got {self}")


FINDING_PROMPTS: dict[str, FindingPrompts] = {
    "mass": FindingPrompts(
        ("Enhancing mass in the left frontal lobe with surrounding vasogenic edema.",
         "Intra-axial mass with perilesional edema, suspicious for high-grade glioma.",
         "Necrotic rim-enhancing mass in the right parietal lobe, consistent with neoplasm.",
         "Space-occupying lesion with mass effect, differential includes metastasis."),
        ("No intracranial mass.",
         "No mass lesion or mass effect.",
         "No intracranial mass, midline shift or hydrocephalus.")),
    "wmh": FindingPrompts(
        ("Scattered periventricular and deep white matter hyperintensities on FLAIR.",
         "Chronic small vessel ischemic white matter changes.",
         "Confluent white matter T2/FLAIR hyperintensities, moderate burden.",
         "Multiple punctate white matter hyperintensities."),
        ("No white matter signal abnormality.",
         "The white matter is normal in signal.",
         "No white matter hyperintensities.")),
    "infarct": FindingPrompts(
        ("Acute infarct in the left basal ganglia.",
         "Restricted diffusion with low ADC, consistent with acute infarct.",
         "Focus of diffusion restriction compatible with an acute lacunar infarct.",
         "Acute ischemic stroke in the middle cerebral artery territory."),
        ("No acute infarct.",
         "No restricted diffusion to suggest acute infarct.",
         "No evidence of acute ischemia.")),
    "effusion": FindingPrompts(
        ("Moderate knee joint effusion distending the suprapatellar recess.",
         "Large joint effusion.",
         "Small suprapatellar effusion.",
         "Joint effusion with distension of the joint capsule."),
        ("No joint effusion.",
         "Physiologic amount of joint fluid, no effusion.",
         "Unremarkable knee without effusion.")),
    "disc_herniation": FindingPrompts(
        ("Left paracentral disc protrusion at L4-L5 contacting the descending L5 nerve root.",
         "Central disc extrusion at L5-S1 narrowing the spinal canal.",
         "Lumbar disc herniation with nerve root compression.",
         "Right foraminal disc herniation at L3-L4."),
        ("No disc herniation or spinal stenosis.",
         "No lumbar disc herniation.",
         "Intervertebral discs without herniation.")),
}


def prompt_embeddings(encode_text: Callable[[list[str]], Tensor], codes: Sequence[str] = FINDING_CODES,
                      prompts: Mapping[str, FindingPrompts] = FINDING_PROMPTS) -> tuple[Tensor, Tensor]:
    """The ensembled positive and negative class embeddings of each finding.

    Args:
        encode_text: Texts -> (T, E) embeddings in the shared space (e.g. the
            aligned model's ``encode_text`` on their tokens); called once, on
            every prompt of every code.
        codes: Findings, in score column order (default: :data:`FINDING_CODES`).
        prompts: Code -> its prompts (default: :data:`FINDING_PROMPTS`).

    Returns:
        ``(positive, negative)``, each (L, E) with unit rows.

    Raises:
        ValueError: A code without prompts, or ``encode_text`` that returns
            other than one row per text.
    """
    missing = [c for c in codes if c not in prompts]
    if missing:
        raise ValueError(f"no zero-shot prompts for finding codes {missing}; add them to FINDING_PROMPTS")
    sets = [s for c in codes for s in (prompts[c].positive, prompts[c].negative)]
    texts = [PROMPT_TEMPLATE.format(t) for s in sets for t in s]
    embedded = encode_text(texts)  # T, E
    if embedded.ndim != 2 or embedded.shape[0] != len(texts):
        raise ValueError(f"encode_text gave shape {tuple(embedded.shape)} for {len(texts)} texts; want (T, E)")
    parts = F.normalize(embedded.float(), dim=-1).split([len(s) for s in sets])
    classes = F.normalize(torch.stack([p.mean(0) for p in parts]), dim=-1)  # 2L, E
    return classes[0::2], classes[1::2]


def zeroshot_scores(images: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
    """Each series' score per finding: ``cos(image, positive) - cos(image, negative)``, in [-2, 2].

    Args:
        images: (N, E) image embeddings (normalised here).
        positive: (L, E) from :func:`prompt_embeddings`.
        negative: (L, E).

    Returns:
        (N, L) scores; higher = the finding more likely present.

    Raises:
        ValueError: Embeddings of different widths or class sets of different sizes.
    """
    if images.ndim != 2 or positive.shape != negative.shape or positive.shape[-1] != images.shape[-1]:
        raise ValueError(f"image embeddings {tuple(images.shape)} do not match class embeddings "
                         f"{tuple(positive.shape)} and {tuple(negative.shape)}")
    x = F.normalize(images.float(), dim=-1)  # N, E
    return x @ (positive.float() - negative.float()).T  # N, L


def zeroshot_metrics(scores: Tensor, target: Tensor, known: Tensor, regions: Sequence[str], patients: Sequence[str],
                     *, n_boot: int = 500, seed: int = 0) -> dict[str, float]:
    """The heads' findings AUROCs of zero-shot scores, with their patient-bootstrap intervals.

    Args:
        scores: (N, L) from :func:`zeroshot_scores`, columns in :data:`FINDING_CODES` order.
        target, known: from ``TASKS["findings"].targets`` (:mod:`fedmri.heads.tasks`).
        regions: N body regions (the in-region AUROC scores each finding within its own regions).
        patients: N patient pseudonyms (the resampling unit of the intervals).
        n_boot: Resamples for the intervals.
        seed: Resampling seed.

    Returns:
        ``zeroshot_findings_auroc/<code>``, ``zeroshot_findings_auroc_macro``,
        ``zeroshot_findings_auroc_in_region/<code>``,
        ``zeroshot_findings_auroc_in_region_macro``, and ``_ci_low``/``_ci_high``
        of both macros: those defined on the known rows. Thresholded metrics
        (accuracy, F1) are left out: a cosine difference has no calibrated 0.5.
    """
    from fedmri.heads.intervals import task_intervals
    from fedmri.heads.tasks import TASKS

    spec = TASKS["findings"]
    scored = spec.metrics(scores, target, known) | spec.region_metrics(scores, target, known, regions)
    scored |= task_intervals(spec, scores, target, known, regions, patients, n_boot=n_boot, seed=seed)
    return {PREFIX + k: v for k, v in scored.items() if k.startswith("auroc")}
