"""The downstream tasks of the ``heads`` stage: what each head predicts, its loss and its metrics.

Each :class:`TaskSpec` reads its target from a site's catalog rows (or dataset
samples), masks the series whose label is unknown, and scores (N, out_dim)
head outputs with :mod:`fedmri.metrics`. Unknown labels contribute nothing to
the loss, so a site without, say, ages still tunes the other heads.

Tasks (Decipher-MR's classification and regression suite):

- ``findings``: multi-label over :data:`fedmri.data.site_inputs.FINDING_CODES`
  (a series without a labels row is unknown for every code);
- ``sequence``: one of :data:`fedmri.data.metadata.SEQUENCE_FAMILIES`;
- ``body_region``: one of :data:`BODY_REGIONS` (regions outside it are ``other``);
- ``age``: years, regressed on a fixed standardisation (mean 50, std 20), so
  every site's head sees the same scale without sharing statistics;
- ``sex``: F (0) against M (1), one logit; ``O`` and unknown are left out.

The dense tasks ``segmentation`` and ``anomaly`` (lesion masks, on patch
tokens rather than pooled features) live in :mod:`fedmri.heads.dense`;
:func:`task_spec` and :func:`build_task_heads` know both kinds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmri.data.dataset import SEX_CODES
from fedmri.data.metadata import SEQUENCE_FAMILIES
from fedmri.data.site_inputs import FINDING_CODES
from fedmri.errors import ConfigError
from fedmri.heads.dense import DENSE_TASKS, DenseTaskSpec
from fedmri.heads.mlp import build_mlp_head, build_trunk, trunk_dim
from fedmri.metrics import auroc_within_groups, binary_metrics, mae, multiclass_metrics, multilabel_metrics
from fedmri.wire import HEAD_PREFIX, SEP, load_into, module_state

# What infer_body_region names (fedmri.data.metadata), and "other" for any other
# BodyPartExamined value; "unknown" is a missing label, not a class.
BODY_REGIONS = ("brain", "spine", "knee", "shoulder", "hip", "ankle", "wrist", "elbow", "breast", "prostate",
                "heart", "abdomen", "pelvis", "chest", "other")
# The shared trunk's key among the heads and its wire group (head.trunk); no task has this name.
TRUNK = "trunk"
AGE_MEAN, AGE_STD = 50.0, 20.0  # years; fixed, so sites share the scale and no statistic leaves
KINDS = ("multilabel", "multiclass", "binary", "regression")

# item (a SeriesDataset row or sample) -> (target, known)
Reader = Callable[[Mapping[str, Any]], tuple[Any, bool]]


def _labels(item: Mapping[str, Any]) -> Mapping[str, Any]:
    # Samples hold labels under "labels"; catalog rows (SeriesDataset.rows) at the top level.
    return item["labels"] if "labels" in item else item


def _findings(item: Mapping[str, Any]) -> tuple[Any, bool]:
    codes = torch.as_tensor(_labels(item)["findings"], dtype=torch.float32)  # L
    known = bool((codes >= 0).all())
    return (codes if known else torch.zeros(len(FINDING_CODES))), known


def _class_of(vocabulary: Sequence[str], key: str, rest: str | None) -> Reader:
    index = {name: i for i, name in enumerate(vocabulary)}

    def read(item: Mapping[str, Any]) -> tuple[Any, bool]:
        value = str(item["meta"].get(key) or "unknown")
        if value == "unknown":
            return 0, False
        if value not in index:
            if rest is None:
                return 0, False
            value = rest
        return index[value], True

    return read


def _age(item: Mapping[str, Any]) -> tuple[Any, bool]:
    age = float(_labels(item)["age"])
    return (age, True) if math.isfinite(age) else (AGE_MEAN, False)


_SEX = {SEX_CODES["F"]: 0.0, SEX_CODES["M"]: 1.0}


def _sex(item: Mapping[str, Any]) -> tuple[Any, bool]:
    code = int(_labels(item)["sex"])
    return (_SEX[code], True) if code in _SEX else (0.0, False)


@dataclass(frozen=True)
class TaskSpec:
    """One downstream task: its head's shape, targets, masked loss and metrics.

    Attributes:
        name: The task name (``heads.tasks`` entry, wire group ``head.<name>``).
        kind: ``"multilabel"``, ``"multiclass"``, ``"binary"`` (one logit) or ``"regression"``.
        classes: Label names (multilabel), class names (multiclass), the
            negative and positive class (binary); empty for regression.
        read: Target and whether it is known, from one catalog row or sample.
        target_mean: Regression only: the fixed standardisation of the loss.
        target_std: Regression only; > 0.
    """

    name: str
    kind: str
    classes: tuple[str, ...]
    read: Reader
    target_mean: float = 0.0
    target_std: float = 1.0

    @property
    def out_dim(self) -> int:
        """Head outputs: labels, classes, or 1 (binary logit, regression value)."""
        return len(self.classes) if self.kind in ("multilabel", "multiclass") else 1

    @property
    def head_task(self) -> str:
        """The :class:`~fedmri.heads.MLPHead` task that fits (a binary head is a one-label multilabel head)."""
        return "multilabel" if self.kind == "binary" else self.kind

    def targets(self, items: Sequence[Mapping[str, Any]]) -> tuple[Tensor, Tensor]:
        """Targets and the known mask of ``items``.

        Returns:
            ``target``: (N, L) float multi-hot, (N,) long class indices, or (N,)
            float (binary 0/1, regression value); unknown rows hold a harmless
            placeholder so the unmasked loss stays finite. ``known``: (N,) bool.
        """
        read = [self.read(item) for item in items]
        known = torch.tensor([k for _, k in read], dtype=torch.bool)  # N
        values = [v for v, _ in read]
        if self.kind == "multilabel":
            target = torch.stack(values) if values else torch.zeros(0, self.out_dim)  # N, L
        elif self.kind == "multiclass":
            target = torch.tensor(values, dtype=torch.long)  # N
        else:
            target = torch.tensor(values, dtype=torch.float32)  # N
        return target, known

    def sample_losses(self, output: Tensor, target: Tensor) -> Tensor:
        """Loss of each row (N,), unmasked: cross-entropy, mean BCE over labels, or standardised MSE."""
        if self.kind == "multilabel":
            return F.binary_cross_entropy_with_logits(output, target.to(output.dtype), reduction="none").mean(-1)
        if self.kind == "multiclass":
            return F.cross_entropy(output, target.long(), reduction="none")
        if self.kind == "binary":
            return F.binary_cross_entropy_with_logits(output[..., 0], target.to(output.dtype), reduction="none")
        z = (output[..., 0] - self.target_mean) / self.target_std
        return (z - (target.to(output.dtype) - self.target_mean) / self.target_std) ** 2

    def loss(self, output: Tensor, target: Tensor, known: Tensor) -> Tensor:
        """Mean loss over the known rows; 0 (with a graph) when none is known."""
        per_row = self.sample_losses(output, target) * known.to(output.dtype)  # N
        return per_row.sum() / known.sum().clamp(min=1)

    def metrics(self, output: Tensor, target: Tensor, known: Tensor) -> dict[str, float]:
        """:mod:`fedmri.metrics` of the known rows, unprefixed; {} when none is known.

        Returns:
            multilabel: ``auroc/<code>``, ``auroc_macro``, ``accuracy/<code>``,
            ``f1_micro``, ``f1_macro``; multiclass: ``accuracy``, ``f1_macro``,
            ``auroc_macro``; binary: ``auroc``, ``accuracy``, ``f1``; regression:
            ``mae`` (years). Undefined ones are left out (see :mod:`fedmri.metrics`).
        """
        if not bool(known.any()):
            return {}
        out, t = output.detach().float()[known], target[known]
        if self.kind == "multilabel":
            return multilabel_metrics(torch.sigmoid(out), t, self.classes)
        if self.kind == "multiclass":
            return multiclass_metrics(out, t, len(self.classes))
        if self.kind == "binary":
            return binary_metrics(torch.sigmoid(out[:, 0]), t)
        return {"mae": mae(out[:, 0], t)}

    def region_metrics(self, output: Tensor, target: Tensor, known: Tensor, regions: Sequence[str]) -> dict[str, float]:
        """Multilabel only: each label's AUROC within the body regions where it occurs at this site.

        ``auroc_macro`` over every series rewards telling a knee from a brain
        (effusion is never seen in a brain); this keeps the disease part
        (:func:`fedmri.metrics.auroc_within_groups`).

        Returns:
            ``auroc_in_region/<code>`` and ``auroc_in_region_macro``, unprefixed;
            {} for other kinds or when no label has both classes within its regions.
        """
        if self.kind != "multilabel" or not bool(known.any()):
            return {}
        rows = known.nonzero()[:, 0].tolist()
        scores = auroc_within_groups(output.detach().float()[known], target[known], [regions[i] for i in rows],
                                     self.classes)
        return {k.replace("in_group", "in_region"): v for k, v in scores.items()}

    def sequence_metrics(self, output: Tensor, target: Tensor, known: Tensor, regions: Sequence[str],
                         sequences: Sequence[str]) -> dict[str, float]:
        """Multilabel only: :meth:`region_metrics` among the series of each sequence family.

        Labels are per study, so every series of a diseased study is positive;
        whether the lesion shows depends on the sequence (a mass enhances on T1
        post-contrast, an acute infarct is bright on DWI). This says which
        sequences carry each finding for the model.

        Returns:
            ``auroc_in_region/<code>@<family>`` and ``auroc_in_region_macro@<family>``,
            unprefixed, for the families where a label has both classes.
        """
        out: dict[str, float] = {}
        for family in sorted(set(sequences)):
            idx = [i for i, s in enumerate(sequences) if s == family]
            ix = torch.as_tensor(idx)
            scored = self.region_metrics(output[ix], target[ix], known[ix], [regions[i] for i in idx])
            out |= {f"{k}@{family}": v for k, v in scored.items()}
        return out


TASKS: dict[str, TaskSpec] = {
    "findings": TaskSpec("findings", "multilabel", tuple(FINDING_CODES), _findings),
    "sequence": TaskSpec("sequence", "multiclass", tuple(SEQUENCE_FAMILIES),
                         _class_of(SEQUENCE_FAMILIES, "sequence", None)),
    "body_region": TaskSpec("body_region", "multiclass", BODY_REGIONS,
                            _class_of(BODY_REGIONS, "body_region", "other")),
    "age": TaskSpec("age", "regression", (), _age, target_mean=AGE_MEAN, target_std=AGE_STD),
    "sex": TaskSpec("sex", "binary", ("F", "M"), _sex),
}


def task_spec(name: str) -> TaskSpec | DenseTaskSpec:
    """The registered task ``name``: an MLP task of :data:`TASKS` or a dense one of :data:`DENSE_TASKS`.

    Raises:
        ConfigError: For an unknown task, listing the known ones.
    """
    if name in DENSE_TASKS:
        return DENSE_TASKS[name]
    if name not in TASKS:
        raise ConfigError(f"unknown heads task {name!r}; known tasks: {', '.join([*TASKS, *DENSE_TASKS])}")
    return TASKS[name]


def has_trunk(cfg: Any) -> bool:
    """Whether the heads of ``cfg`` share a trunk: ``heads.trunk_dim`` > 0 and an MLP task to read it."""
    return trunk_dim(cfg) > 0 and any(str(t) in TASKS for t in cfg.heads.tasks)


def build_task_heads(cfg: Any) -> nn.ModuleDict:
    """One head per ``cfg.heads.tasks`` entry, keyed by task name, and the shared trunk.

    An :class:`~fedmri.heads.MLPHead` for each task of :data:`TASKS`, the UNETR
    decoder for ``segmentation`` and an :class:`~fedmri.heads.AnomalyHead` for
    ``anomaly`` (see :mod:`fedmri.heads.dense`). With ``heads.trunk_dim`` > 0
    the MLP heads read a :class:`~fedmri.heads.mlp.SharedTrunk`, first under
    the key :data:`TRUNK`; :func:`task_outputs` runs it.

    Args:
        cfg: The whole config (``model`` and the ``heads`` section).

    Raises:
        ConfigError: An unknown or repeated task name, or a dense task the
            encoder cannot feed (the decoder needs ``model.patch_size`` 16).
    """
    names = [str(t) for t in cfg.heads.tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"heads.tasks lists a task twice: {names}")
    heads = nn.ModuleDict()
    if has_trunk(cfg):
        heads[TRUNK] = build_trunk(cfg)
    for name in names:
        spec = task_spec(name)
        if isinstance(spec, DenseTaskSpec):
            # Drawn from the caller's seed, which is then put back: the heads and dropout masks
            # drawn after it are those of the same run without the dense heads, so adding them
            # leaves the MLP heads' figures as they were.
            with torch.random.fork_rng(devices=[]):
                heads[name] = spec.build(cfg)
            continue
        kwargs = {"target_mean": spec.target_mean, "target_std": spec.target_std} if spec.kind == "regression" else {}
        heads[name] = build_mlp_head(cfg, spec.head_task, spec.out_dim, **kwargs)
    return heads


def task_outputs(heads: nn.ModuleDict, features: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Each MLP task head's output (B, out_dim) on pooled ``features`` (B, F), through the trunk if any.

    Args:
        heads: What :func:`build_task_heads` made.
        features: Pooled features of the frozen encoder (:func:`fedmri.heads.pool_features`).
        tasks: The tasks to run; default every MLP task of ``heads``. Dense tasks are skipped.
    """
    names = [t for t in (list(heads) if tasks is None else tasks) if t in TASKS]
    if not names:
        return {}
    inputs = heads[TRUNK](features) if TRUNK in heads else features  # B, trunk_dim or F
    return {t: heads[t](inputs) for t in names}


def task_heads_state(heads: nn.ModuleDict) -> dict[str, Tensor]:
    """Wire state of the heads: ``"head.<task>/<name>"`` for every entry of each head's state dict."""
    out: dict[str, Tensor] = {}
    for task, head in heads.items():
        out |= module_state(f"{HEAD_PREFIX}{task}{SEP}", head)
    return out


def load_task_heads_state(heads: nn.ModuleDict, state: Mapping[str, Tensor]) -> None:
    """Copy wire tensors into ``heads`` in place; ``state`` must hold exactly their keys.

    Raises:
        ValueError: Naming one missing or unexpected key, or a key of the wrong shape.
    """
    targets = {f"{HEAD_PREFIX}{task}{SEP}{n}": t for task, head in heads.items()
               for n, t in head.state_dict(keep_vars=True).items()}
    load_into(targets, state, f"heads of tasks {list(heads)}", exact=True)
