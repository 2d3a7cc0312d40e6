"""HuggingFace interop: import-hf / export against real transformers models (no downloads)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import EsmConfig, EsmForMaskedLM, EsmTokenizer

from tests.helpers import REPO
from tests.helpers import real_sequences as _real_sequences
from training import alphabet
from training.cli import main
from training.model.checkpoint import load_checkpoint, read_state_dict, save_checkpoint
from training.model.convert import (
    ConversionError,
    config_from_hf,
    export_hf,
    import_hf,
    load_any_model,
    state_dict_from_hf,
)
from training.model.esm2 import ModelConfig, build_model

SHAPES = {
    # ESM-2 style: token dropout, no embedding LayerNorm
    "esm2": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4},
    # token dropout off, LayerNorm before the blocks, odd MLP width
    "no-dropout-ln": {
        "num_hidden_layers": 3,
        "hidden_size": 48,
        "num_attention_heads": 2,
        "intermediate_size": 80,
        "token_dropout": False,
        "emb_layer_norm_before": True,
    },
    # head size 24: the query scale 24**-0.5 is not a power of two
    "head24": {"num_hidden_layers": 2, "hidden_size": 96, "num_attention_heads": 4},
}


def hf_config(**overrides) -> EsmConfig:
    values = {
        "vocab_size": 33,
        "mask_token_id": 32,
        "pad_token_id": 1,
        "position_embedding_type": "rotary",
        "token_dropout": True,
        "emb_layer_norm_before": False,
        "layer_norm_eps": 1e-5,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": 1026,
        **SHAPES["esm2"],
    }
    values.update(overrides)
    values.setdefault("intermediate_size", 4 * values["hidden_size"])
    return EsmConfig(**values)


def random_hf_model(seed: int = 0, **overrides) -> EsmForMaskedLM:
    """A randomly initialised EsmForMaskedLM with every parameter perturbed (eval mode)."""
    torch.manual_seed(seed)
    model = EsmForMaskedLM(hf_config(**overrides))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def real_sequences(limit: int = 8, max_len: int = 300) -> list[str]:
    """Real sequences (the MMseqs2 example database when present, else the reference set)."""
    return _real_sequences(limit, max_len, name="mmseqs2_examples_db.fasta.gz")


def masked_batch(sequences: list[str]) -> dict[str, torch.Tensor]:
    """Padded batch with every 9th residue of every other sequence masked."""
    token_lists = []
    for i, seq in enumerate(sequences):
        toks = alphabet.encode(seq)
        if i % 2:
            for pos in range(3, len(toks) - 1, 9):
                toks[pos] = alphabet.MASK
        token_lists.append(toks)
    input_ids, attention_mask = alphabet.pad_token_lists(token_lists)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def assert_logits_match(ours, hf: EsmForMaskedLM, batch: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        want = hf(**batch, output_hidden_states=True)
        got = ours.eval()(**batch, output_hidden_states=True)
    real = batch["attention_mask"].bool()
    diff = (got["logits"][real] - want.logits[real]).abs().max().item()
    assert diff <= 1e-5, diff
    for layer, (a, b) in enumerate(zip(got["hidden_states"], want.hidden_states, strict=True)):
        assert (a[real] - b[real]).abs().max().item() <= 1e-5, layer


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_imported_model_matches_hf_logits(tmp_path: Path, shape: str) -> None:
    hf = random_hf_model(**SHAPES[shape])
    hf.save_pretrained(tmp_path / "hf")
    out = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    ours = load_checkpoint(out)
    assert ours.config.num_layers == SHAPES[shape]["num_hidden_layers"]
    assert ours.config.token_dropout == SHAPES[shape].get("token_dropout", True)
    assert_logits_match(ours, hf, masked_batch(real_sequences()))


def test_import_reads_pytorch_bin_and_sharded_safetensors(tmp_path: Path) -> None:
    hf = random_hf_model()
    batch = masked_batch(real_sequences(6, 200))
    (tmp_path / "bin").mkdir()
    hf.config.to_json_file(str(tmp_path / "bin" / "config.json"))
    full_state = hf.state_dict()  # includes the tied lm_head.decoder.weight
    # As in the facebook/esm2_* files: position_ids, and inv_freq stored once per layer.
    full_state["esm.embeddings.position_ids"] = torch.arange(1026)[None]
    inv_freq = full_state.pop("esm.rotary_embeddings.inv_freq")
    for i in range(hf.config.num_hidden_layers):
        full_state[f"esm.encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq"] = inv_freq
    torch.save(full_state, tmp_path / "bin" / "pytorch_model.bin")
    assert_logits_match(load_checkpoint(import_hf(tmp_path / "bin", tmp_path / "c1")), hf, batch)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert_logits_match(load_any_model(tmp_path / "sharded"), hf, batch)


def test_exported_directory_loads_in_transformers_offline(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(1)
    ours = build_model(ModelConfig.from_preset("tiny", num_layers=3))
    with torch.no_grad():
        for param in ours.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    save_checkpoint(ours, tmp_path / "ckpt")
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.txt",
    ]
    hf, info = EsmForMaskedLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert (
        hf.lm_head.decoder.weight.data_ptr() == hf.esm.embeddings.word_embeddings.weight.data_ptr()
    )
    assert_logits_match(ours, hf.eval(), masked_batch(real_sequences(8, 300)))
    tokenizer = EsmTokenizer.from_pretrained(str(out))
    for seq in real_sequences(8):
        assert tokenizer(seq)["input_ids"] == alphabet.encode(seq)
    assert tokenizer.mask_token == "<mask>" and tokenizer.pad_token_id == alphabet.PAD


def test_export_then_import_is_bitwise_exact(tmp_path: Path) -> None:
    torch.manual_seed(2)
    ours = build_model(ModelConfig.from_preset("tiny", emb_layer_norm_before=True))
    with torch.no_grad():
        for param in ours.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    save_checkpoint(ours, tmp_path / "a")
    export_hf(tmp_path / "a", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "b")
    first, second = read_state_dict(tmp_path / "a"), read_state_dict(tmp_path / "b")
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert value.dtype == second[key].dtype and torch.equal(value, second[key]), key


def test_hf_import_then_export_is_bitwise_exact_with_checkpoint_inv_freq(tmp_path: Path) -> None:
    hf = random_hf_model()
    # Frequencies stored at reduced precision (as in checkpoints saved in fp16) must be kept.
    inv_freq = hf.esm.rotary_embeddings.inv_freq
    inv_freq.copy_(inv_freq.half().float())
    assert not torch.equal(inv_freq, 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)))
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert torch.equal(read_state_dict(tmp_path / "ckpt")["rotary.inv_freq"], inv_freq)
    export_hf(tmp_path / "ckpt", tmp_path / "hf2")
    exported = load_file(str(tmp_path / "hf2" / "model.safetensors"))
    original = {k: v for k, v in hf.state_dict().items() if k != "lm_head.decoder.weight"}
    assert exported.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(exported[key], value), key
    reloaded = EsmForMaskedLM.from_pretrained(str(tmp_path / "hf2")).eval()
    assert torch.equal(reloaded.esm.rotary_embeddings.inv_freq, inv_freq)
    assert_logits_match(
        load_checkpoint(tmp_path / "ckpt"), reloaded, masked_batch(real_sequences(4))
    )


def test_bf16_checkpoints_export_as_bf16(tmp_path: Path) -> None:
    ours = build_model(ModelConfig.from_preset("tiny")).to(torch.bfloat16)
    save_checkpoint(ours, tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    hf = EsmForMaskedLM.from_pretrained(str(tmp_path / "hf"), dtype="auto")
    assert hf.esm.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    assert torch.equal(hf.esm.embeddings.word_embeddings.weight, ours.embed_tokens.weight)


# ----------------------------------------------------------------------------- failures


def test_config_checks() -> None:
    good = hf_config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4).to_dict()
    assert config_from_hf(good).ffn_size == 256
    for change, message in [
        ({"position_embedding_type": "absolute"}, "only ESM-2 \\(rotary\\) converts"),
        ({"vocab_size": 35}, "vocab_size is 35"),
        ({"is_folding_model": True}, "ESMFold"),
        ({"model_type": "bert"}, "not 'esm'"),
        ({"num_attention_heads": 5}, "not a multiple"),
    ]:
        with pytest.raises(ConversionError, match=message):
            config_from_hf({**good, **change})
    missing = {k: v for k, v in good.items() if k != "hidden_size"}
    with pytest.raises(ConversionError, match="missing hidden_size"):
        config_from_hf(missing)


def test_state_dict_checks() -> None:
    hf = random_hf_model()
    cfg = config_from_hf(hf.config.to_dict())
    state = hf.state_dict()
    assert "contact_head.regression.weight" in state_dict_from_hf(state, cfg)
    untied = dict(state)
    untied["lm_head.decoder.weight"] = state["lm_head.decoder.weight"] + 1
    with pytest.raises(ConversionError, match="differs from the word embeddings"):
        state_dict_from_hf(untied, cfg)
    extra = {**state, "esm.encoder.layer.5.output.dense.weight": torch.zeros(1)}
    with pytest.raises(ConversionError, match="tensors this model does not use"):
        state_dict_from_hf(extra, cfg)
    lacking = {k: v for k, v in state.items() if "layer.1.intermediate" not in k}
    with pytest.raises(
        ConversionError, match=r"missing tensor 'esm\.encoder\.layer\.1\.intermediate"
    ):
        state_dict_from_hf(lacking, cfg)
    encoder_only = {k: v for k, v in state.items() if not k.startswith("lm_head")}
    with pytest.raises(ConversionError, match="not an EsmForMaskedLM"):
        state_dict_from_hf(encoder_only, cfg)


def test_import_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="does not exist"):
        import_hf(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match=r"has no config\.json"):
        import_hf(tmp_path / "empty", tmp_path / "out")
    hf_config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4).to_json_file(
        str(tmp_path / "empty" / "config.json")
    )
    with pytest.raises(ConversionError, match=r"no model\.safetensors, pytorch_model\.bin"):
        import_hf(tmp_path / "empty", tmp_path / "out")
    hf = random_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["intermediate_size"] = 128
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="has shape"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConversionError, match="cannot read"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pickles_with_code_are_refused(tmp_path: Path) -> None:
    hf = random_hf_model()
    (tmp_path / "bin").mkdir()
    hf.config.to_json_file(str(tmp_path / "bin" / "config.json"))
    torch.save({"weights": hf.state_dict(), "fn": print}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="cannot read"):
        import_hf(tmp_path / "bin", tmp_path / "out")


# ----------------------------------------------------------------------------- CLI


def test_cli_import_and_export(tmp_path: Path, capsys) -> None:
    hf = random_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(exported["lm_head.bias"], hf.lm_head.bias)
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("esm2-train: error: ") and "already exists" in err
    assert err.count("\n") == 1
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--overwrite"]) == 0


def test_cli_errors_are_one_line_without_traceback(tmp_path: Path, capsys) -> None:
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("esm2-train: error: ") and err.count("\n") == 1, err
    # The installed entry point, in a fresh interpreter: no traceback either.
    result = subprocess.run(
        [sys.executable, "-m", "training.cli", "import-hf", str(tmp_path / "nope"), "out"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("esm2-train: error: "), result.stderr
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
