"""The text tower: offline loading, errors, pooling, truncation, trainable layers."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedmri.errors import ConfigError
from fedmri.text import MINILM, TextTower, load_text_tower, prepare_report, resolve_text_model


def _copy_folder(src: Path, dst: Path, *, config_edit: dict | None = None) -> Path:
    # Symlinks for the big files; config.json copied so a test can edit it.
    dst.mkdir()
    for item in src.iterdir():
        if item.is_file() and item.name != "config.json":
            (dst / item.name).symlink_to(item)
    config = json.loads((src / "config.json").read_text())
    config.update(config_edit or {})
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_importing_the_tower_switches_the_hub_offline() -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}}
    code = "import os, fedmri.text.tower; print(os.environ.get('HF_HUB_OFFLINE'))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"


def test_minilm_resolves_to_the_packaged_folder() -> None:
    path = resolve_text_model(MINILM)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_missing_folder_is_a_config_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="nope.*config.json"):
        resolve_text_model(str(missing))


def test_folder_without_weights_or_tokenizer_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="lacks weights, tokenizer files"):
        resolve_text_model(str(tmp_path))


def test_weights_that_do_not_fit_the_config_are_rejected(tmp_path: Path) -> None:
    # 8 layers in config.json but the weights hold 6: layers 6 and 7 would stay random.
    folder = _copy_folder(resolve_text_model(MINILM), tmp_path / "bad", config_edit={"num_hidden_layers": 8})
    with pytest.raises(ConfigError, match="lack"):
        load_text_tower(str(folder))


def test_a_local_path_loads_like_the_packaged_name(tmp_path: Path, minilm: TextTower) -> None:
    folder = _copy_folder(resolve_text_model(MINILM), tmp_path / "local")
    tower = load_text_tower(str(folder))
    assert tower.source == str(folder)
    assert tower.source_digest == minilm.source_digest
    texts = ["Impression: small lesion.", "Findings: normal brain."]
    with torch.no_grad():
        assert torch.equal(tower.encode(texts), minilm.encode(texts))


def test_tower_is_frozen_and_deterministic_in_train_mode(minilm: TextTower) -> None:
    tower = copy.deepcopy(minilm).train()
    assert not any(p.requires_grad for p in tower.parameters())
    with torch.no_grad():  # dropout is off in a frozen tower even in train mode
        assert torch.equal(tower.encode(["Findings: mass."]), tower.encode(["Findings: mass."]))


def test_mean_pooling_ignores_padding_and_cls_pooling_differs(minilm: TextTower) -> None:
    short = "Impression: small lesion."
    long = prepare_report(findings="A long report " * 20, impression="another one")
    with torch.no_grad():
        alone = minilm.encode([short])  # 1, H
        padded = minilm.encode([short, long])[:1]  # 1, H, padded to the long report
        cls_tower = TextTower(minilm.model, minilm.tokenizer, pooling="cls", max_tokens=64)
        cls = cls_tower.encode([short])
    assert alone.shape == (1, minilm.hidden_size) == (1, 384)
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(alone, cls, atol=1e-3)


def test_truncation_keeps_the_start_of_the_report(minilm: TextTower) -> None:
    tower = TextTower(minilm.model, minilm.tokenizer, max_tokens=8)
    text = prepare_report(impression="glioma", findings="word " * 50)
    ids = tower.tokenize([text])["input_ids"]
    assert ids.shape == (1, 8)
    full = minilm.tokenize([text])["input_ids"]
    assert full.shape[1] > 50
    # The first 7 tokens survive ([CLS] + the impression), the findings' words are cut.
    assert torch.equal(ids[0, :7], full[0, :7]) and ids[0, -1] == minilm.tokenizer.sep_token_id
    assert "word" not in minilm.tokenizer.convert_ids_to_tokens(ids[0].tolist())


def test_max_tokens_defaults_to_the_sentence_transformers_length(minilm: TextTower) -> None:
    assert minilm.max_tokens == 256  # sentence_bert_config.json's max_seq_length


@pytest.mark.parametrize("k, trainable", [(0, set()), (2, {4, 5}), (-1, {0, 1, 2, 3, 4, 5, "emb"})])
def test_trainable_layers_unfreeze_from_the_top(minilm: TextTower, k: int, trainable: set) -> None:
    tower = copy.deepcopy(minilm)
    tower.set_trainable_layers(k)
    found = set()
    for name, p in tower.model.named_parameters():
        if p.requires_grad:
            found.add("emb" if name.startswith("embeddings") else int(name.split(".")[2]))
    assert found == trainable


@pytest.mark.parametrize("k", [-2, 7])
def test_trainable_layers_out_of_range_is_a_config_error(minilm: TextTower, k: int) -> None:
    with pytest.raises(ConfigError, match="text_trainable_layers"):
        copy.deepcopy(minilm).set_trainable_layers(k)


@pytest.mark.parametrize("kwargs", [{"pooling": "max"}, {"max_tokens": 1}])
def test_tower_rejects_bad_arguments(minilm: TextTower, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        TextTower(minilm.model, minilm.tokenizer, **kwargs)
