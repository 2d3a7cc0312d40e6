"""Our checkpoint format: exact round trip, atomic writes, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import OutputExistsError
from training import alphabet
from training.data.reference_sequences import REFERENCE_SEQUENCES
from training.model.checkpoint import (
    CONFIG_FILE,
    FORMAT,
    MODEL_FILE,
    CheckpointError,
    load_checkpoint,
    load_config,
    read_state_dict,
    save_checkpoint,
)
from training.model.esm2 import ModelConfig, build_model


def random_model(**overrides):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("tiny", **overrides))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def test_save_and_load_round_trip_exactly(tmp_path: Path) -> None:
    model = random_model(token_dropout=False, emb_layer_norm_before=True)
    out = save_checkpoint(model, tmp_path / "ckpt", metadata={"step": 7})
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, MODEL_FILE]
    document = json.loads((out / CONFIG_FILE).read_text())
    assert document["format"] == FORMAT and document["version"] == 1
    assert document["metadata"] == {"step": 7}
    assert load_config(out) == model.config
    loaded = load_checkpoint(out)
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.lm_head.decoder.weight is loaded.embed_tokens.weight
    batch = alphabet.batch_encode([seq for _, seq in REFERENCE_SEQUENCES[:3]])
    # The weights are equal bit for bit (above); the logits of two calls need not be: CPU matrix
    # products may split their sums differently from call to call on a loaded machine (seen
    # once in a full test run, never alone), so they are compared to float32 rounding.
    with torch.no_grad():
        torch.testing.assert_close(model(**batch)["logits"], loaded.eval()(**batch)["logits"],
                                   rtol=1e-6, atol=1e-6)
    # Nothing but the checkpoint itself is left in the parent directory.
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_load_with_overrides_and_dtype(tmp_path: Path) -> None:
    save_checkpoint(random_model(), tmp_path / "ckpt")
    model = load_checkpoint(tmp_path / "ckpt", dtype=torch.bfloat16, activation_checkpointing=True)
    assert model.config.activation_checkpointing
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.rotary.inv_freq.dtype == torch.float32
    with pytest.raises(CheckpointError, match="unknown model config field"):
        load_checkpoint(tmp_path / "ckpt", layers=3)


def test_existing_output_is_not_overwritten_unless_asked(tmp_path: Path) -> None:
    first, second = random_model(), random_model(num_layers=3)
    save_checkpoint(first, tmp_path / "ckpt")
    with pytest.raises(OutputExistsError, match="already exists"):
        save_checkpoint(second, tmp_path / "ckpt")
    assert load_config(tmp_path / "ckpt").num_layers == 2
    save_checkpoint(second, tmp_path / "ckpt", overwrite=True)
    assert load_config(tmp_path / "ckpt").num_layers == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_a_failed_save_leaves_nothing(tmp_path: Path) -> None:
    model = random_model()
    state = model.state_dict()
    state["not_a_tensor"] = "oops"
    with pytest.raises(AttributeError):
        save_checkpoint(state, tmp_path / "ckpt", model.config)
    assert list(tmp_path.iterdir()) == []


def test_mismatched_shapes_give_a_clear_error(tmp_path: Path) -> None:
    out = save_checkpoint(random_model(), tmp_path / "ckpt")
    document = json.loads((out / CONFIG_FILE).read_text())
    document["model"]["ffn_size"] = 128  # the weights were saved with 256
    (out / CONFIG_FILE).write_text(json.dumps(document))
    expected = r"tensor 'layers\.0\.fc1\.bias' has shape \(256,\), the model expects \(128,\)"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(out)


def test_missing_and_unexpected_tensors_are_named(tmp_path: Path) -> None:
    out = save_checkpoint(random_model(), tmp_path / "ckpt")
    state = load_file(str(out / MODEL_FILE))
    del state["lm_head.bias"]
    state["layers.9.fc1.weight"] = torch.zeros(1)
    save_file(state, str(out / MODEL_FILE))
    with pytest.raises(CheckpointError, match=r"missing lm_head\.bias; unexpected layers\.9\.fc1"):
        load_checkpoint(out)


def test_missing_or_broken_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"has no config\.json"):
        load_checkpoint(tmp_path / "empty")
    out = save_checkpoint(random_model(), tmp_path / "ckpt")
    (out / MODEL_FILE).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_state_dict(out)
    (out / MODEL_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"has no model\.safetensors"):
        load_checkpoint(out)
    (out / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_config(out)
    (out / CONFIG_FILE).write_text(json.dumps({"model_type": "esm"}))
    with pytest.raises(CheckpointError, match="HuggingFace checkpoint; convert it"):
        load_config(out)
    (out / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, "version": 99, "model": {}}))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_config(out)
    bad = {"format": FORMAT, "version": 1, "model": {"num_heads": 7}}
    (out / CONFIG_FILE).write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="not a multiple"):
        load_config(out)
