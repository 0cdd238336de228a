"""Image-report alignment that sample-level DP-SGD can make private: fixed, public negatives.

CLIP and SigLIP contrast each pair with the other pairs of its batch, so pair
``i``'s loss term reads the other patients' reports, one patient moves every
other term's gradient, and per-sample clipping bounds nothing: DP-SGD gives no
valid guarantee for them (Abadi et al., CCS 2016, need a sum of per-sample
terms). Here pair ``i`` = (image ``x_i``, report ``t_i``) is contrasted only
with a fixed set ``N = (n_1 .. n_K)`` of report texts that hold no patient
data: the first ``K`` of a versioned list that ships with fedmri
(``dp_negatives_v1.json.gz``, :func:`fixed_negative_texts`), written once by
fedmri's synthetic report generator from a fixed seed. Every site holds the
same texts whatever its data and its release, and editing the demo's report
templates does not change them::

    l_i = -log softmax(s * [<f(x_i), g(t_i)>, <f(x_i), g(n_1)>, ..., <f(x_i), g(n_K)>])[0]

(with SigLIP's bias ``b``, the sigmoid form ``-log σ(s<f(x_i), g(t_i)> + b) -
Σ_k log σ(-(s<f(x_i), g(n_k)> + b))``). Only the image->text direction is
used: text->image would need public images to contrast a report with.

The guarantee. The private unit is one distinct report text with the series
filed under it (an image-report pair; each step uses one of its series).
Each ``l_i`` depends on the weights, that unit and ``N`` only, and ``N`` is a
function of the fedmri release and the config alone. So adding or removing
one unit changes the clipped gradient sum of a step by at most the clipping
norm ``C`` and leaves every other term as it was: each step is the Sampled
Gaussian Mechanism, and the site's RDP accountant composes steps and rounds to
(ε, δ)-DP with respect to one image-report pair. It is not per patient: a
patient with ``k`` pairs (several studies) is protected by group privacy only,
(kε, k·e^((k-1)ε)·δ), far weaker for large ``k``; and identical report texts of
different studies form one unit. Loss values computed at the site from its
pairs are not covered: keep them home with ``policy.metrics``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fedmri.errors import ConfigError

DP_NEGATIVES = ("none", "synthetic")
MAX_NEGATIVES = 4096
# The negatives' list and its SHA-256: a new list is a new version, never an edit of this one.
NEGATIVES_FILE = "dp_negatives_v1.json.gz"
NEGATIVES_SHA256 = "e257c74c3b454f2a4fa8f4aa825d836b235a15e2b8f4acf3ba3e0060342038c9"


@functools.cache
def _negatives_list() -> tuple[str, ...]:
    data = resources.files("fedmri.align").joinpath(NEGATIVES_FILE).read_bytes()
    if hashlib.sha256(data).hexdigest() != NEGATIVES_SHA256:
        raise ConfigError(f"{NEGATIVES_FILE} in the installed fedmri differs from its release; reinstall fedmri")
    return tuple(json.loads(gzip.decompress(data)))


def fixed_negative_texts(count: int) -> list[str]:
    """The first ``count`` (1 .. MAX_NEGATIVES) public negative report texts, distinct, in a fixed order.

    Written by fedmri's synthetic report generator (three-number seed stream 0xD9E6A7, 1, k, so none
    of the streams of `fedmri simulate`'s sites) and prepared as the text tower reads reports.
    """
    if not 1 <= count <= MAX_NEGATIVES:
        raise ConfigError(f"align.dp_num_negatives {count} must be in [1, {MAX_NEGATIVES}]")
    return list(_negatives_list()[:count])


def _align(cfg: Any) -> Any:
    return cfg.align if hasattr(cfg, "align") else cfg


def check_dp_negatives(cfg: Any) -> None:
    """Check ``align.dp_negatives`` and ``align.dp_num_negatives`` (whole config or its align section).

    Raises:
        ConfigError: An unknown kind, or a count outside [1, :data:`MAX_NEGATIVES`].
    """
    align = _align(cfg)
    if align.dp_negatives not in DP_NEGATIVES:
        raise ConfigError(f"align.dp_negatives {align.dp_negatives!r} is not one of {', '.join(DP_NEGATIVES)}")
    if not 1 <= align.dp_num_negatives <= MAX_NEGATIVES:
        raise ConfigError(f"align.dp_num_negatives {align.dp_num_negatives} must be in [1, {MAX_NEGATIVES}]")


def require_dp_valid(cfg: Any, where: str) -> None:
    """Refuse sample-level DP-SGD for an alignment that contrasts the pairs of a batch.

    Args:
        cfg: The whole config or its align section.
        where: What asked (e.g. ``"align round 3"``), to start the message.

    Raises:
        ConfigError: ``align.dp_negatives`` is ``"none"`` (or not valid at all).
    """
    check_dp_negatives(cfg)
    if _align(cfg).dp_negatives == "none":
        raise ConfigError(
            f"{where}: sample-level DP-SGD is refused with align.dp_negatives=none. CLIP/SigLIP use the other "
            "pairs of a batch as negatives (in-batch negatives), so each pair's loss term reads other patients' "
            "reports: one pair changes every other pair's gradient, and clipping per sample then bounds nothing "
            "(no valid (ε, δ) guarantee). Set align.dp_negatives=synthetic: each pair is then contrasted with a "
            "fixed set of non-patient report texts (align.dp_num_negatives of them) instead.")


def fixed_negative_loss(
    image_features: Tensor,
    text_features: Tensor,
    negative_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None = None,
) -> Tensor:
    """One pair's image->text loss against fixed negatives (a per-sample term; see the module docstring).

    Args:
        image_features: The pair's L2-normalised image embedding (E,).
        text_features: Its report's L2-normalised embedding (E,).
        negative_features: The fixed negatives' L2-normalised embeddings (K, E).
        logit_scale: Scalar multiplier (exponentiated and clamped, as the model gives it).
        logit_bias: SigLIP's bias; None = InfoNCE (CLIP's image->text cross-entropy), given = the sum
            of SigLIP's sigmoid terms (the pair positive, each negative negative).

    Returns:
        The scalar loss.

    Raises:
        ValueError: Shapes that do not fit (E,), (E,), (K, E).
    """
    e = image_features.shape
    if len(e) != 1 or text_features.shape != e or negative_features.ndim != 2 or negative_features.shape[1:] != e:
        raise ValueError(f"expected image (E,), text (E,) and negatives (K, E); got {tuple(e)}, "
                         f"{tuple(text_features.shape)}, {tuple(negative_features.shape)}")
    texts = torch.cat([text_features[None], negative_features])  # 1+K, E
    logits = logit_scale * (texts @ image_features)  # 1+K
    if logit_bias is None:
        return -torch.log_softmax(logits, dim=0)[0]
    signs = torch.full_like(logits, -1.0)  # 1+K: the pair is positive, every negative negative
    signs[0] = 1.0
    return -F.logsigmoid(signs * (logits + logit_bias)).sum()
