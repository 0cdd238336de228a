"""Checkpoints after every round: safetensors for tensors, JSON for the rest.

Each round goes to its own folder ``ckpt/round-NNNN/`` and only then does the
``ckpt/LATEST`` pointer move to it (an atomic rename), so a server killed at
any moment leaves the last complete round intact. The newest ``keep`` rounds
are kept (the federation's ``keep_checkpoints``, default 2).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np
from safetensors.torch import load_file, save_file

from fedmri.errors import InputError

KEEP = 2


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(ckpt_dir: Path, server_round: int, state: dict[str, torch.Tensor],
                    strategy_arrays: dict[str, np.ndarray], meta: dict[str, Any], *, keep: int = KEEP) -> Path:
    """Write one complete round and point ``LATEST`` at it.

    Args:
        ckpt_dir: The run's ``ckpt`` folder.
        server_round: Global round counter (1-based) just completed.
        state: Every global tensor (wire keys).
        strategy_arrays: Server-optimiser state (e.g. FedAdam moments), may be empty.
        meta: JSON-able: stage index, round in stage, strategy scalars, RNG state, history.
        keep: How many of the newest rounds to keep (>= 1); older ones are deleted.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (resume needs the last round), got {keep}")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"round-{server_round:04d}"
    tmp = ckpt_dir / f".round-{server_round:04d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / "global.safetensors"))
    save_np({k: np.ascontiguousarray(v) for k, v in strategy_arrays.items()}, str(tmp / "strategy.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"server_round": server_round, **meta}, indent=1), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_text_atomic(ckpt_dir / "LATEST", final.name + "\n")
    rounds = sorted(p for p in ckpt_dir.glob("round-*") if p.is_dir())
    for old in rounds[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray], dict[str, Any]] | None:
    """The last complete round, or ``None`` when the run has none yet.

    Raises:
        InputError: ``LATEST`` points at a folder that is missing or unreadable.
    """
    pointer = ckpt_dir / "LATEST"
    if not pointer.is_file():
        return None
    folder = ckpt_dir / pointer.read_text(encoding="utf-8").strip()
    try:
        state = load_file(str(folder / "global.safetensors"))
        strategy = load_np(str(folder / "strategy.safetensors"))
        meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"checkpoint {folder} cannot be read ({exc}); delete {pointer} to start the run over") from None
    return state, strategy, meta
