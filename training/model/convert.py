"""HuggingFace interop: ``EsmForMaskedLM`` directories <-> our checkpoints.

``import_hf`` reads an ``EsmForMaskedLM`` directory (``config.json`` plus ``model.safetensors``,
``pytorch_model.bin`` — loaded with ``weights_only=True`` — or a sharded ``*.index.json``) and
writes our checkpoint; ``export_hf`` a directory that HF's ``from_pretrained`` loads offline.
Neither needs ``transformers``; tensors are copied, never recomputed (round trips are exact).
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.atomic import atomic_dir
from training.alphabet import MASK, PAD, TOKENS, VOCAB_SIZE, vocab_text
from training.errors import UserError
from training.model.checkpoint import (
    CheckpointError,
    instantiate,
    load_checkpoint,
    load_config,
    read_state_dict,
    save_checkpoint,
    validate_state_dict,
)
from training.model.config import MAX_POSITIONS, ConfigError, ModelConfig
from training.model.esm2 import ESM2
from training.model.rotary import RotaryEmbedding


class ConversionError(UserError, ValueError):
    """A HuggingFace checkpoint that is not an ESM-2 ``EsmForMaskedLM`` we can convert."""


# Per-layer names: ours -> HF (under esm.encoder.layer.N.).
_LAYER_MAP = {
    "attn_norm": "attention.LayerNorm",
    "out_proj": "attention.output.dense",
    "mlp_norm": "LayerNorm",
    "fc1": "intermediate.dense",
    "fc2": "output.dense",
}
_GLOBAL_MAP = {
    "embed_tokens.weight": "esm.embeddings.word_embeddings.weight",
    "emb_layer_norm_before.weight": "esm.embeddings.layer_norm.weight",
    "emb_layer_norm_before.bias": "esm.embeddings.layer_norm.bias",
    "emb_layer_norm_after.weight": "esm.encoder.emb_layer_norm_after.weight",
    "emb_layer_norm_after.bias": "esm.encoder.emb_layer_norm_after.bias",
    "lm_head.dense.weight": "lm_head.dense.weight",
    "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.layer_norm.weight": "lm_head.layer_norm.weight",
    "lm_head.layer_norm.bias": "lm_head.layer_norm.bias",
    "lm_head.bias": "lm_head.bias",
    "contact_head.regression.weight": "esm.contact_head.regression.weight",
    "contact_head.regression.bias": "esm.contact_head.regression.bias",
    "rotary.inv_freq": "esm.rotary_embeddings.inv_freq",
}
_INV_FREQ_RE = re.compile(r"(^|\.)rotary_embeddings\.inv_freq$")
_IGNORED_RE = re.compile(r"(^|\.)(position_ids|pooler\.[^.]+\.[^.]+)$")


# ----------------------------------------------------------------------------- configs


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """Our ``ModelConfig`` for an ESM-2 ``EsmConfig`` dict (defaults as ``EsmConfig``'s)."""
    if hf.get("model_type", "esm") != "esm":
        raise ConversionError(f"{source}: model_type is {hf.get('model_type')!r}, not 'esm'")
    if hf.get("is_folding_model"):
        raise ConversionError(f"{source}: ESMFold checkpoints are not supported")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ConversionError(f"{source}: decoder / cross-attention ESM models are not supported")
    position = hf.get("position_embedding_type", "absolute")
    if position != "rotary":
        raise ConversionError(
            f"{source}: position_embedding_type is {position!r}; only ESM-2 (rotary) converts"
        )
    checks = {"vocab_size": VOCAB_SIZE, "pad_token_id": PAD, "mask_token_id": MASK}
    for key, want in checks.items():
        if hf.get(key, want) != want:
            raise ConversionError(
                f"{source}: {key} is {hf.get(key)!r}, the ESM alphabet has {want}"
            )
    if hf.get("vocab_list") not in (None, list(TOKENS)):
        raise ConversionError(f"{source}: vocab_list differs from the ESM alphabet")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"{source}: hidden_act {hf.get('hidden_act')!r} is not gelu")
    missing = [
        k
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        if k not in hf
    ]
    if missing:
        raise ConversionError(f"{source}: missing {', '.join(missing)}")
    try:
        return ModelConfig(
            num_layers=hf["num_hidden_layers"],
            hidden_size=hf["hidden_size"],
            num_heads=hf["num_attention_heads"],
            ffn_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", MAX_POSITIONS),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            rope_theta=hf.get("rope_theta", 10000.0),
            token_dropout=bool(hf.get("token_dropout", False)),
            emb_layer_norm_before=bool(hf.get("emb_layer_norm_before") or False),
            hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            initializer_range=hf.get("initializer_range", 0.02),
        )
    except (ConfigError, TypeError) as exc:
        raise ConversionError(f"{source}: {exc}") from exc


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` dict of ``EsmForMaskedLM`` for ``cfg``."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["EsmForMaskedLM"],
        "model_type": "esm",
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "classifier_dropout": None,
        "dtype": dtype_name,
        "emb_layer_norm_before": cfg.emb_layer_norm_before,
        "esmfold_config": None,
        "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.hidden_dropout,
        "hidden_size": cfg.hidden_size,
        "initializer_range": cfg.initializer_range,
        "intermediate_size": cfg.ffn_size,
        "is_folding_model": False,
        "layer_norm_eps": cfg.layer_norm_eps,
        "mask_token_id": MASK,
        "max_position_embeddings": cfg.max_position_embeddings,
        "num_attention_heads": cfg.num_heads,
        "num_hidden_layers": cfg.num_layers,
        "pad_token_id": PAD,
        "position_embedding_type": "rotary",
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": True,
        "token_dropout": cfg.token_dropout,
        "torch_dtype": dtype_name,
        "use_cache": True,
        "vocab_list": None,
        "vocab_size": VOCAB_SIZE,
    }


# ----------------------------------------------------------------------------- weights


def _canonical_hf_key(key: str) -> str:
    """Undo naming variants: ``LayerNorm.gamma/beta`` (transformers 5 saves these)."""
    if key.endswith("LayerNorm.gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith("LayerNorm.beta"):
        return key[: -len("beta")] + "bias"
    return key


def state_dict_from_hf(
    hf_state: Mapping[str, torch.Tensor], cfg: ModelConfig, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Our state dict from an ``EsmForMaskedLM`` state dict (tensors copied, not changed)."""
    hf = {_canonical_hf_key(k): v for k, v in hf_state.items()}
    if not any(k.startswith("lm_head.") for k in hf):
        raise ConversionError(f"{source} has no lm_head.* tensors: not an EsmForMaskedLM")
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in hf:
            raise ConversionError(f"{source} is missing tensor {key!r}")
        used.add(key)
        return hf[key]

    ours: dict[str, torch.Tensor] = {}
    for name, hf_name in _GLOBAL_MAP.items():
        if name.startswith("emb_layer_norm_before") and not cfg.emb_layer_norm_before:
            continue
        if name == "rotary.inv_freq" or name.startswith("contact_head"):
            continue
        ours[name] = take(hf_name)
    for i in range(cfg.num_layers):
        hf_prefix = f"esm.encoder.layer.{i}."
        for part in ("weight", "bias"):
            ours[f"layers.{i}.qkv.{part}"] = torch.cat(
                [take(f"{hf_prefix}attention.self.{p}.{part}") for p in ("query", "key", "value")]
            )
            for name, hf_name in _LAYER_MAP.items():
                ours[f"layers.{i}.{name}.{part}"] = take(f"{hf_prefix}{hf_name}.{part}")

    # Contact regression: carried when present (zeros otherwise, as it only serves HF).
    n_in = cfg.num_layers * cfg.num_heads
    weight_key, bias_key = (_GLOBAL_MAP[f"contact_head.regression.{p}"] for p in ("weight", "bias"))
    if weight_key in hf and bias_key in hf:
        ours["contact_head.regression.weight"] = take(weight_key)
        ours["contact_head.regression.bias"] = take(bias_key)
    else:
        ours["contact_head.regression.weight"] = torch.zeros(1, n_in)
        ours["contact_head.regression.bias"] = torch.zeros(1)

    # Rotary frequencies: the checkpoint's (older ones hold one per layer; HF takes the first).
    inv_keys = sorted(k for k in hf if _INV_FREQ_RE.search(k))
    if inv_keys:
        ours["rotary.inv_freq"] = hf[inv_keys[0]].float()
        used.update(inv_keys)
    else:
        ours["rotary.inv_freq"] = RotaryEmbedding(cfg.head_dim, cfg.rope_theta).inv_freq

    decoder = hf.get("lm_head.decoder.weight")
    if decoder is not None:
        used.add("lm_head.decoder.weight")
        if not torch.equal(decoder, ours["embed_tokens.weight"]):
            raise ConversionError(
                f"{source}: lm_head.decoder.weight differs from the word embeddings "
                "(ESM-2 ties them)"
            )
    decoder_bias = hf.get("lm_head.decoder.bias")
    if decoder_bias is not None:
        used.add("lm_head.decoder.bias")
        if not torch.equal(decoder_bias, ours["lm_head.bias"]):
            raise ConversionError(f"{source}: lm_head.decoder.bias differs from lm_head.bias")
    leftover = sorted(k for k in hf if k not in used and not _IGNORED_RE.search(k))
    if leftover:
        shown = ", ".join(leftover[:5]) + (" ..." if len(leftover) > 5 else "")
        raise ConversionError(f"{source} has tensors this model does not use: {shown}")
    return ours


def state_dict_to_hf(
    state: Mapping[str, torch.Tensor], cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """The ``EsmForMaskedLM`` state dict (tied decoder left out, as HF saves it)."""
    hf: dict[str, torch.Tensor] = {}
    for name, hf_name in _GLOBAL_MAP.items():
        if name in state:
            hf[hf_name] = state[name]
    hidden = cfg.hidden_size
    for i in range(cfg.num_layers):
        hf_prefix = f"esm.encoder.layer.{i}."
        for part in ("weight", "bias"):
            q, k, v = state[f"layers.{i}.qkv.{part}"].split(hidden)
            for hf_part, tensor in zip(("query", "key", "value"), (q, k, v), strict=True):
                hf[f"{hf_prefix}attention.self.{hf_part}.{part}"] = tensor
            for name, hf_name in _LAYER_MAP.items():
                hf[f"{hf_prefix}{hf_name}.{part}"] = state[f"layers.{i}.{name}.{part}"]
    return hf


# ----------------------------------------------------------------------------- files


def read_hf_directory(
    src: str | os.PathLike[str],
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config dict, state dict)`` of a HuggingFace model directory."""
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"{src} does not exist or is not a directory")
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{src} has no config.json")
    try:
        hf_config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise ConversionError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(hf_config, dict):
        raise ConversionError(f"{config_path} is not a JSON object")
    return hf_config, _read_hf_weights(src)


def _read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ConversionError(f"{index} is not a weight index: {exc}") from exc
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                state.update(_read_weight_file(src / shard))
            return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (src / name).is_file():
            return _read_weight_file(src / name)
    raise ConversionError(
        f"{src} has no model.safetensors, pytorch_model.bin or sharded *.index.json weights"
    )


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConversionError(f"weight file {path} is missing")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConversionError(f"cannot read {path}: {first_line}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} does not hold a flat dict of tensors")
    return state


def _convert_hf_directory(
    src: str | os.PathLike[str],
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    hf_config, hf_state = read_hf_directory(src)
    cfg = config_from_hf(hf_config, source=f"{src}/config.json")
    state = state_dict_from_hf(hf_state, cfg, source=str(src))
    try:
        validate_state_dict(cfg, state, source=str(src))
    except CheckpointError as exc:
        raise ConversionError(str(exc)) from exc
    return cfg, state


def load_hf_model(src: str | os.PathLike[str], device: torch.device | str = "cpu") -> ESM2:
    """Our model with the weights of a HuggingFace ``EsmForMaskedLM`` directory (in memory)."""
    cfg, state = _convert_hf_directory(src)
    return instantiate(cfg, state, device, source=str(src))


def import_hf(
    src: str | os.PathLike[str], out: str | os.PathLike[str], overwrite: bool = False
) -> Path:
    """Convert a HuggingFace ``EsmForMaskedLM`` directory into our checkpoint at ``out``.

    Tensors keep their dtype and values (the rotary ``inv_freq`` is stored as float32).
    """
    cfg, state = _convert_hf_directory(src)
    return save_checkpoint(
        state, out, cfg, overwrite=overwrite, metadata={"imported_from": str(Path(src).resolve())}
    )


def export_hf(
    checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], overwrite: bool = False
) -> Path:
    """Write our checkpoint as a HuggingFace ``EsmForMaskedLM`` + ``EsmTokenizer`` directory."""
    cfg = load_config(checkpoint)
    state = read_state_dict(checkpoint)
    validate_state_dict(cfg, state, source=f"checkpoint {checkpoint}")
    dtype = state["embed_tokens.weight"].dtype
    hf_state = {k: v.contiguous() for k, v in state_dict_to_hf(state, cfg).items()}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", config_to_hf(cfg, dtype))
        (tmp / "vocab.txt").write_text(vocab_text())
        specials = {
            "cls_token": "<cls>",
            "eos_token": "<eos>",
            "mask_token": "<mask>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
        }
        _write_json(tmp / "special_tokens_map.json", specials)
        _write_json(
            tmp / "tokenizer_config.json",
            {
                "tokenizer_class": "EsmTokenizer",
                "model_max_length": cfg.max_position_embeddings,
                "clean_up_tokenization_spaces": True,
                **specials,
            },
        )
    return Path(out)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def is_hf_directory(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a HuggingFace ESM ``config.json`` (``model_type: esm``)."""
    config_path = Path(path) / "config.json"
    try:
        return json.loads(config_path.read_text()).get("model_type") == "esm"
    except (OSError, ValueError, AttributeError):
        return False


def load_any_model(
    path: str | os.PathLike[str], device: torch.device | str = "cpu", backend: str = "torch"
) -> ESM2:
    """Our checkpoint or a HuggingFace ``EsmForMaskedLM`` directory, as a model on ``device``."""
    if is_hf_directory(path):
        cfg, state = _convert_hf_directory(path)
        return instantiate(cfg.replace(backend=backend), state, device, source=str(path))
    return load_checkpoint(path, device=device, backend=backend)
