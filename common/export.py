"""Export and load an encoder: ``model.safetensors`` plus ``config.json``.

An export folder holds everything needed to rebuild the model with only the
model classes (:mod:`fedmri.models`, :mod:`fedmri.align.model`,
:mod:`fedmri.text.tower`); no training code is imported.

``config.json`` records the format and its version, the fedmri version, the
model sizes, the SHA-256 and byte size of the weights file and, for an aligned
model, the projection sizes and the text tower. The text tower is stored one
of two ways:

- ``"reference"``: when it is frozen and its weights are exactly those of the
  folder it was loaded from (checked by a digest of its weights), only that
  source (``"minilm"`` or an absolute path) and the digest are written; loading
  reads the tower from there and refuses it if its weights differ.
- ``"embedded"``: otherwise its weights go into ``model.safetensors`` (keys
  ``text_tower.*``) and its Hugging Face config and tokenizer into ``text/``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from fedmri.errors import ConfigError, InputError

FORMAT = "fedmri-encoder"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TEXT_DIR = "text"
_TEXT_PREFIX = "text_tower."


def weights_digest(weights: nn.Module | Mapping[str, Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict.

    Two modules get the same digest exactly when their state dicts are
    bit-identical; it keys the feature cache and checks referenced text towers.
    """
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _plain(section: Any) -> dict[str, Any]:
    if isinstance(section, DictConfig):
        return OmegaConf.to_container(section, resolve=True)  # type: ignore[return-value]
    if hasattr(section, "__dataclass_fields__"):
        return OmegaConf.to_container(OmegaConf.structured(section), resolve=True)  # type: ignore[return-value]
    return dict(section)


def _check_sizes(encoder: nn.Module, model_cfg: dict[str, Any]) -> None:
    from fedmri.models import ViT3D

    try:
        with torch.device("meta"):  # shapes only: nothing is allocated
            reference = ViT3D(**model_cfg).state_dict()
    except (NotImplementedError, RuntimeError):  # an init step that needs real data
        reference = ViT3D(**model_cfg).state_dict()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config.model is not a valid encoder config ({exc})") from None
    actual = encoder.state_dict()
    wrong = sorted(k for k in reference.keys() | actual.keys()
                   if k not in reference or k not in actual or reference[k].shape != actual[k].shape)
    if wrong:
        raise ConfigError(f"config.model does not describe this encoder (first differences: {wrong[:3]}); "
                          "pass the config the model was built from")


def _text_section(tower: Any) -> dict[str, Any]:
    section = {"pooling": tower.pooling, "max_tokens": tower.max_tokens}
    unmodified = tower.source is not None and tower.source_digest == weights_digest(tower.model)
    if tower.trainable_layers == 0 and unmodified:
        source = tower.source if tower.source == "minilm" else str(Path(tower.source).expanduser().resolve())
        return {**section, "storage": "reference", "source": source, "digest": tower.source_digest}
    return {**section, "storage": "embedded", "folder": TEXT_DIR}


def save_encoder(path: str | Path, model: nn.Module, *, config: Any, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` to the folder ``path`` (created; existing export files are replaced).

    Args:
        path: Output folder.
        model: A :class:`fedmri.models.ViT3D` or :class:`fedmri.align.AlignedModel`.
        config: The config the model was built from (whole config or
            ``FedmriConfig``); its ``model`` section must describe the encoder.
        extra: JSON-serialisable facts for the model card (sites, rounds, privacy spent).

    Returns:
        The export folder.

    Raises:
        InputError: For an unsupported model, a ``path`` that is a file, or a
            non-JSON ``extra``.
        ConfigError: If ``config.model`` does not match the model's sizes.
    """
    from fedmri.align.model import AlignedModel
    from fedmri.models import ViT3D

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"export path {str(out)!r} is a file; give a folder")
    try:
        extra_json = json.loads(json.dumps(dict(extra or {})))
    except (TypeError, ValueError) as exc:
        raise InputError(f"extra must be JSON-serialisable: {exc}") from None
    model_cfg = _plain(config.model)
    meta: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION}
    from fedmri import __version__

    meta["fedmri_version"] = __version__
    state = model.state_dict()
    if isinstance(model, AlignedModel):
        _check_sizes(model.image_encoder, model_cfg)
        text = _text_section(model.text_tower)
        meta.update(kind="aligned", model=model_cfg, text=text, align={
            "embed_dim": model.embed_dim, "image_pooling": model.image_pooling,
            "logit_scale_max": model.logit_scale_max, "has_logit_bias": model.logit_bias is not None,
            "loss": str(config.align.loss) if hasattr(config, "align") else None,
        })
        if text["storage"] == "reference":
            state = {k: v for k, v in state.items() if not k.startswith(_TEXT_PREFIX)}
    elif isinstance(model, ViT3D):
        _check_sizes(model, model_cfg)
        meta.update(kind="vit3d", model=model_cfg)
    else:
        raise InputError(f"save_encoder exports a ViT3D or an AlignedModel, not {type(model).__name__}")

    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    tmp = out / (WEIGHTS_FILE + ".tmp")
    # Clones: safetensors refuses tensors that share storage.
    save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}, str(tmp),
              metadata={"format": FORMAT})
    os.replace(tmp, out / WEIGHTS_FILE)
    if meta.get("text", {}).get("storage") == "embedded":
        model.text_tower.model.config.save_pretrained(str(out / TEXT_DIR))
        model.text_tower.tokenizer.save_pretrained(str(out / TEXT_DIR))
    weights = out / WEIGHTS_FILE
    meta["weights"] = {"file": WEIGHTS_FILE, "sha256": _file_sha256(weights), "bytes": weights.stat().st_size,
                       "tensors": len(state)}
    meta["extra"] = extra_json
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def read_export_config(path: str | Path) -> dict[str, Any]:
    """The validated ``config.json`` of an export folder.

    Raises:
        InputError: If the folder or file is missing, unreadable, or of another
            format or format version.
    """
    folder = Path(path)
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise InputError(f"{str(folder)!r} is not an encoder export: it has no {CONFIG_FILE}")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{str(cfg_path)!r} is not valid JSON ({exc}); re-export the encoder") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{str(cfg_path)!r} is not a {FORMAT} config")
    if meta.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{str(folder)!r} has export format version {meta.get('format_version')!r}; this fedmri "
                         f"reads version {FORMAT_VERSION}: load it with the fedmri version that wrote it "
                         f"({meta.get('fedmri_version')}) or re-export")
    for key in ("kind", "model", "weights"):
        if key not in meta:
            raise InputError(f"{str(cfg_path)!r} lacks the {key!r} entry; re-export the encoder")
    return meta


def _read_weights(folder: Path, info: Mapping[str, Any]) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = folder / str(info.get("file", WEIGHTS_FILE))
    if not weights.is_file():
        raise InputError(f"{str(weights)!r} is missing; copy the whole export folder")
    size = weights.stat().st_size
    if size != info.get("bytes"):
        raise InputError(f"{str(weights)!r} has {size} bytes, config.json expects {info.get('bytes')}: the file "
                         "is truncated or replaced; copy it again")
    if _file_sha256(weights) != info.get("sha256"):
        raise InputError(f"{str(weights)!r} does not match the SHA-256 in config.json: it is corrupt or was "
                         "modified; copy it again")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{str(weights)!r} is not a readable safetensors file ({exc})") from None


def _load_state(model: nn.Module, state: Mapping[str, Tensor], folder: Path) -> None:
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        detail = "; ".join(f"{label}: {names[:3]}" for label, names in
                           (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if names)
        raise InputError(f"weights in {str(folder)!r} do not fit the model that config.json describes ({detail})")
    model.load_state_dict(state, strict=True)


def _build_text_tower(folder: Path, text: Mapping[str, Any]) -> Any:
    from fedmri.text.tower import empty_text_tower, load_text_tower

    if text.get("storage") == "reference":
        try:
            tower = load_text_tower(text["source"], pooling=text["pooling"], max_tokens=text["max_tokens"])
        except ConfigError as exc:
            raise InputError(f"the export in {str(folder)!r} references the text model {text['source']!r}, which "
                             f"cannot be loaded here ({exc})") from None
        if tower.source_digest != text.get("digest"):
            raise InputError(f"the text model at {text['source']!r} differs from the one the export in "
                             f"{str(folder)!r} was made with; restore that model there")
        return tower
    if not (folder / TEXT_DIR / "config.json").is_file():
        raise InputError(f"{str(folder / TEXT_DIR)!r} lacks the text tower's config.json; copy the whole export")
    return empty_text_tower(folder / TEXT_DIR, pooling=text["pooling"], max_tokens=text["max_tokens"])


def load_encoder(path: str | Path) -> nn.Module:
    """Rebuild an exported encoder from ``config.json`` and load its weights bit-exactly.

    Args:
        path: An export folder written by :func:`save_encoder`.

    Returns:
        The :class:`fedmri.models.ViT3D` or :class:`fedmri.align.AlignedModel`, in eval mode.

    Raises:
        InputError: For a missing, truncated, corrupt or mismatched export, or
            a format version this fedmri does not read.
    """
    folder = Path(path)
    meta = read_export_config(folder)
    state = _read_weights(folder, meta["weights"])
    from fedmri.models import ViT3D

    try:
        encoder = ViT3D(**meta["model"])
    except (TypeError, ValueError) as exc:
        raise InputError(f"config.json in {str(folder)!r} has invalid model sizes ({exc})") from None
    if meta["kind"] == "vit3d":
        model: nn.Module = encoder
    elif meta["kind"] == "aligned":
        from fedmri.align.model import AlignedModel

        align, text = meta.get("align", {}), meta.get("text", {})
        try:
            tower = _build_text_tower(folder, text)
            model = AlignedModel(encoder, tower, embed_dim=align["embed_dim"], image_pooling=align["image_pooling"],
                                 logit_scale_max=align["logit_scale_max"], logit_scale_init=0.0,
                                 logit_bias_init=0.0 if align["has_logit_bias"] else None)
        except (KeyError, ConfigError) as exc:
            raise InputError(f"config.json in {str(folder)!r} has a bad align/text section ({exc}); "
                             "re-export the model") from None
        if text.get("storage") == "reference":
            state = {**state, **{_TEXT_PREFIX + k: v for k, v in tower.state_dict().items()}}
    else:
        raise InputError(f"config.json in {str(folder)!r} has unknown kind {meta['kind']!r}")
    _load_state(model, state, folder)
    return model.eval()
