"""The task heads of a run, exported next to its encoder: ``heads.safetensors`` and a card section.

An export folder (:func:`fedmri.export.save_encoder`) gets the heads the
``heads`` stage tuned, so a hospital can use the encoder with them without the
federation: ``heads.safetensors`` holds the wire tensors ``head.<task>/<name>``
and ``config.json`` → ``extra.heads`` says what each head predicts (its kind and
classes), the ``heads`` settings they were built with, and the scores the final
evaluate stage gave them. :func:`load_heads` rebuilds them from the folder alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from fedmri.errors import InputError

HEADS_FILE = "heads.safetensors"


def heads_card(cfg: Any, evaluation: Mapping[str, float]) -> dict[str, Any]:
    """The model card's ``heads`` section.

    Args:
        cfg: The run config (``heads`` section).
        evaluation: The final evaluate stage's aggregate; each task keeps its ``<task>_<metric>`` values.

    Returns:
        ``{"file", "config", "tasks": {task: {"kind", "classes", "metrics"}}}``.
    """
    from omegaconf import OmegaConf

    from fedmri.heads.tasks import task_spec

    tasks = {}
    for name in cfg.heads.tasks:
        spec = task_spec(str(name))
        metrics = {k[len(name) + 1:]: float(v) for k, v in evaluation.items()
                   if k.startswith(f"{name}_") and "/" not in k}
        tasks[str(name)] = {"kind": spec.kind, "classes": list(spec.classes), "metrics": metrics}
    return {"file": HEADS_FILE, "config": OmegaConf.to_container(cfg.heads, resolve=True), "tasks": tasks}


def save_heads(folder: str | Path, state: Mapping[str, Tensor]) -> Path:
    """Write the ``head.<task>/...`` tensors of ``state`` to ``<folder>/heads.safetensors``.

    Raises:
        InputError: When ``state`` holds no head tensors.
    """
    from safetensors.torch import save_file

    from fedmri.wire import HEAD_PREFIX

    heads = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    if not heads:
        raise InputError("the run has no task heads to export; add a heads stage")
    out = Path(folder) / HEADS_FILE
    tmp = out.with_suffix(".tmp")
    save_file(heads, str(tmp), metadata={"format": "fedmri-heads"})
    os.replace(tmp, out)
    return out


def load_heads(folder: str | Path) -> nn.ModuleDict:
    """The task heads of an export folder, in eval mode, keyed by task.

    Raises:
        InputError: A folder without heads (an export of a run with no heads
            stage), or heads that do not match their card.
    """
    from omegaconf import OmegaConf
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from fedmri.export import read_export_config
    from fedmri.heads.tasks import build_task_heads, load_task_heads_state

    folder = Path(folder)
    meta = read_export_config(folder)
    card = meta.get("extra", {}).get("heads")
    if not card:
        raise InputError(f"{folder} has no task heads; export a run that has a heads stage")
    try:
        state = load_file(str(folder / card["file"]))
    except (OSError, SafetensorError) as exc:
        raise InputError(f"{folder / card['file']} is not a readable heads file ({exc}); re-export the run") from None
    cfg = OmegaConf.create({"model": meta["model"], "heads": card["config"]})
    heads = build_task_heads(cfg)
    try:
        load_task_heads_state(heads, state)
    except ValueError as exc:
        raise InputError(f"{folder}: heads.safetensors does not match its card ({exc}); re-export the run") from None
    return heads.eval()


def card_summary(folder: str | Path) -> str:
    """One line per head of an export folder: task, kind and its scores (for `fedmri export`)."""
    from fedmri.export import read_export_config

    card = read_export_config(Path(folder)).get("extra", {}).get("heads") or {}
    lines = []
    for task, info in card.get("tasks", {}).items():
        scores = ", ".join(f"{k} {v:.3g}" for k, v in sorted(info["metrics"].items())) or "not evaluated"
        lines.append(f"{task} ({info['kind']}): {scores}")
    return "\n".join(lines)
