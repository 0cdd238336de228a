"""Export and load: bit-exact round trips, text tower storage, and rejected files."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

import fedmri
from fedmri import load_encoder, save_encoder
from fedmri.align import AlignedModel, build_aligned_model
from fedmri.config import load_config
from fedmri.errors import ConfigError, InputError
from fedmri.export import FORMAT_VERSION, weights_digest
from fedmri.models import ViT3D, build_encoder


@pytest.fixture
def cfg():
    return load_config("tiny", overrides=["model.img_size=[32,32,32]", "model.depth=2", "model.embed_dim=48",
                                          "model.num_heads=2", "align.embed_dim=32"])


@pytest.fixture
def vit(cfg) -> ViT3D:
    torch.manual_seed(0)
    return build_encoder(cfg)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _images() -> torch.Tensor:
    return torch.rand(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))


def _rewrite_weights(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    # A consistent but wrong export: new weights with matching sha256 and size.
    save_file(tensors, str(folder / "model.safetensors"))
    meta = json.loads((folder / "config.json").read_text())
    data = (folder / "model.safetensors").read_bytes()
    meta["weights"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (folder / "config.json").write_text(json.dumps(meta))


def test_vit_round_trip_is_bit_exact(tmp_path: Path, cfg, vit: ViT3D) -> None:
    with torch.no_grad():
        vit.pos_embed.pos_embed.add_(0.1)  # not the init values
    folder = save_encoder(tmp_path / "export", vit, config=cfg, extra={"sites": ["a", "b"], "rounds": 3})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((folder / "config.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["fedmri_version"] == fedmri.__version__
    assert meta["kind"] == "vit3d" and meta["model"]["embed_dim"] == 48 and meta["extra"]["rounds"] == 3
    assert meta["weights"]["sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    loaded = load_encoder(folder)
    assert isinstance(loaded, ViT3D) and not loaded.training
    _assert_same_weights(vit, loaded)
    with torch.no_grad():
        a, b = vit.eval()(_images(), return_layers=(0,)), loaded(_images(), return_layers=(0,))
    assert torch.equal(a["cls"], b["cls"]) and torch.equal(a["patch"], b["patch"])
    assert torch.equal(a["layers"][0], b["layers"][0])


def test_a_conv_stem_encoder_round_trips(tmp_path: Path, cfg) -> None:
    conv = OmegaConf.merge(cfg, {"model": {"stem": "conv"}})
    torch.manual_seed(0)
    vit = build_encoder(conv).eval()
    loaded = load_encoder(save_encoder(tmp_path / "export", vit, config=conv))
    assert loaded.patch_embed.stem == "conv"
    _assert_same_weights(vit, loaded)
    with torch.no_grad():
        assert torch.equal(vit(_images())["patch"], loaded(_images())["patch"])


def test_frozen_unmodified_text_tower_is_stored_as_a_reference(tmp_path: Path, cfg, vit, minilm) -> None:
    model = build_aligned_model(cfg, image_encoder=vit, text_tower=minilm)
    folder = save_encoder(tmp_path / "aligned", model, config=cfg)
    meta = json.loads((folder / "config.json").read_text())
    assert meta["text"]["storage"] == "reference" and meta["text"]["source"] == "minilm"
    assert not any(k.startswith("text_tower.") for k in load_file(str(folder / "model.safetensors")))
    loaded = load_encoder(folder)
    assert isinstance(loaded, AlignedModel)
    _assert_same_weights(model, loaded)
    tokens = minilm.tokenize(["Impression: mass.", "Findings: normal."])
    model.eval()
    with torch.no_grad():
        a, b = model(_images(), **tokens), loaded(_images(), **tokens)
    assert all(torch.equal(a[k], b[k]) for k in ("image_features", "text_features", "logit_scale"))


def test_trained_text_tower_and_siglip_bias_are_embedded(tmp_path: Path, cfg, vit, minilm) -> None:
    cfg = OmegaConf.merge(cfg, {"align": {"loss": "siglip", "text_trainable_layers": 1}})
    model = build_aligned_model(cfg, image_encoder=vit, text_tower=copy.deepcopy(minilm))
    with torch.no_grad():
        model.text_tower.model.encoder.layer[5].output.dense.weight.mul_(1.01)  # "trained"
        model.logit_bias.fill_(-7.5)
    folder = save_encoder(tmp_path / "aligned", model, config=cfg)
    meta = json.loads((folder / "config.json").read_text())
    assert meta["text"]["storage"] == "embedded" and (folder / "text" / "config.json").is_file()
    assert meta["align"]["has_logit_bias"] and meta["align"]["loss"] == "siglip"
    loaded = load_encoder(folder)
    _assert_same_weights(model, loaded)
    assert loaded.logit_bias.item() == -7.5
    model.eval()
    with torch.no_grad():
        texts = ["Impression: small left lesion."]
        assert torch.equal(model.text_tower.encode(texts), loaded.text_tower.encode(texts))


def test_a_changed_referenced_text_model_is_refused(tmp_path: Path, cfg, vit, minilm) -> None:
    folder = save_encoder(tmp_path / "aligned", build_aligned_model(cfg, image_encoder=vit, text_tower=minilm),
                          config=cfg)
    meta = json.loads((folder / "config.json").read_text())
    meta["text"]["digest"] = "0" * 64
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="differs"):
        load_encoder(folder)


def test_truncated_weights_are_rejected(tmp_path: Path, cfg, vit) -> None:
    folder = save_encoder(tmp_path / "e", vit, config=cfg)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated"):
        load_encoder(folder)


def test_modified_weights_are_rejected(tmp_path: Path, cfg, vit) -> None:
    folder = save_encoder(tmp_path / "e", vit, config=cfg)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(InputError, match="SHA-256"):
        load_encoder(folder)


def test_a_cut_file_with_a_matching_checksum_is_still_rejected(tmp_path: Path, cfg, vit) -> None:
    folder = save_encoder(tmp_path / "e", vit, config=cfg)
    data = (folder / "model.safetensors").read_bytes()[:1000]
    (folder / "model.safetensors").write_bytes(data)
    meta = json.loads((folder / "config.json").read_text())
    meta["weights"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="not a readable safetensors"):
        load_encoder(folder)


def test_wrong_format_version_is_rejected(tmp_path: Path, cfg, vit) -> None:
    folder = save_encoder(tmp_path / "e", vit, config=cfg)
    meta = json.loads((folder / "config.json").read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="format version"):
        load_encoder(folder)


def test_shape_mismatch_is_rejected(tmp_path: Path, cfg, vit) -> None:
    folder = save_encoder(tmp_path / "e", vit, config=cfg)
    meta = json.loads((folder / "config.json").read_text())
    meta["model"]["mlp_ratio"] = 2.0  # the MLP weights no longer fit
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="wrong shape"):
        load_encoder(folder)


def test_key_mismatch_is_rejected(tmp_path: Path, cfg, vit) -> None:
    folder = save_encoder(tmp_path / "e", vit, config=cfg)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["surprise"] = torch.zeros(1)
    del tensors["norm.weight"]
    _rewrite_weights(folder, tensors)
    with pytest.raises(InputError, match="missing.*norm.weight.*unexpected.*surprise"):
        load_encoder(folder)


@pytest.mark.parametrize("setup", ["no_folder", "bad_json", "other_format"])
def test_missing_or_foreign_exports_are_rejected(tmp_path: Path, setup: str) -> None:
    folder = tmp_path / "x"
    if setup != "no_folder":
        folder.mkdir()
        (folder / "config.json").write_text("{oops" if setup == "bad_json" else json.dumps({"format": "onnx"}))
    with pytest.raises(InputError):
        load_encoder(folder)


def test_save_checks_config_extra_and_model_type(tmp_path: Path, cfg, vit) -> None:
    with pytest.raises(ConfigError, match="does not describe"):
        save_encoder(tmp_path / "a", vit, config=OmegaConf.merge(cfg, {"model": {"depth": 3}}))
    with pytest.raises(InputError, match="JSON"):
        save_encoder(tmp_path / "b", vit, config=cfg, extra={"when": object()})
    with pytest.raises(InputError, match="ViT3D or an AlignedModel"):
        save_encoder(tmp_path / "c", torch.nn.Linear(2, 2), config=cfg)


def test_weights_digest_sees_a_single_changed_value(vit) -> None:
    before = weights_digest(vit)
    with torch.no_grad():
        vit.norm.bias[0] += 1e-6
    assert weights_digest(vit) != before


def test_loading_imports_no_training_code(tmp_path: Path, cfg, vit) -> None:
    folder = save_encoder(tmp_path / "e", vit, config=cfg)
    code = (
        "import sys, fedmri\n"
        f"m = fedmri.load_encoder({str(folder)!r})\n"
        "bad = [n for n in sys.modules if n.startswith(('fedmri.losses', 'fedmri.ssl', 'fedmri.client',"
        " 'fedmri.server', 'fedmri.align.objective', 'monai', 'opacus', 'flwr'))]\n"
        "print(type(m).__name__, bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ViT3D []"


def test_a_bad_align_section_is_rejected(tmp_path: Path, cfg, vit, minilm) -> None:
    folder = save_encoder(tmp_path / "aligned", build_aligned_model(cfg, image_encoder=vit, text_tower=minilm),
                          config=cfg)
    meta = json.loads((folder / "config.json").read_text())
    del meta["align"]["embed_dim"]
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="align/text section"):
        load_encoder(folder)


@pytest.mark.parametrize("trunk_dim", [0, 16])
def test_heads_round_trip_and_a_folder_without_heads_is_refused(tmp_path: Path, cfg, vit, trunk_dim: int) -> None:
    from fedmri.heads.export import heads_card, load_heads, save_heads
    from fedmri.heads.tasks import TRUNK, build_task_heads, task_heads_state

    cfg = OmegaConf.merge(cfg, {"heads": {"trunk_dim": trunk_dim}})
    bare = save_encoder(tmp_path / "bare", vit, config=cfg)
    with pytest.raises(InputError, match="no task heads"):
        load_heads(bare)

    heads = build_task_heads(cfg)
    assert (TRUNK in heads) == bool(trunk_dim)
    for p in heads.parameters():
        torch.nn.init.normal_(p)  # not the init a rebuild would give
    card = heads_card(cfg, {"sequence_accuracy": 0.5, "findings_auroc/T2_HYPER": 0.7, "loss": 1.0})
    assert card["tasks"]["sequence"]["metrics"] == {"accuracy": 0.5}
    folder = save_encoder(tmp_path / "with", vit, config=cfg, extra={"heads": card})
    save_heads(folder, task_heads_state(heads) | {"encoder/x": torch.zeros(1)})
    loaded = load_heads(folder)
    assert not loaded.training
    assert list(loaded) == list(heads)
    for task in heads:
        _assert_same_weights(heads[task], loaded[task])
    if not trunk_dim:  # an export from before heads.trunk_dim existed has no such key in its card
        meta = json.loads((folder / "config.json").read_text())
        del meta["extra"]["heads"]["config"]["trunk_dim"]
        (folder / "config.json").write_text(json.dumps(meta))
        assert list(load_heads(folder)) == list(heads)

    (folder / "heads.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="heads"):
        load_heads(folder)
