"""Our model checkpoint: a directory with ``model.safetensors`` and ``config.json``.

``config.json`` is ``{"format": "esm2-pretrain.model", "version": 1, "model": {ModelConfig}}``
(plus optional ``"metadata"``); ``model.safetensors`` holds ``ESM2.state_dict()`` — parameter
names as documented in ``training.model.esm2``, the tied decoder weight left out, identical for the
``torch`` and ``te`` backends. Directories are written atomically (temporary name + rename).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.atomic import atomic_dir
from training.errors import UserError
from training.model.config import ConfigError, ModelConfig
from training.model.esm2 import ESM2, build_model

FORMAT = "esm2-pretrain.model"
VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, malformed, or does not fit the model."""


def save_checkpoint(
    model: ESM2 | Mapping[str, torch.Tensor],
    out: str | os.PathLike[str],
    config: ModelConfig | None = None,
    *,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (or a state dict with its ``config``) as a checkpoint directory."""
    if isinstance(model, ESM2):
        config = config or model.config
        state = model.state_dict()
    else:
        if config is None:
            raise ValueError("save_checkpoint needs config= when given a state dict")
        state = dict(model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    document: dict[str, Any] = {"format": FORMAT, "version": VERSION, "model": config.to_dict()}
    if metadata:
        document["metadata"] = metadata
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt", "esm2": FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return Path(out)


def load_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The ``ModelConfig`` of a checkpoint directory."""
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    if not config_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {CONFIG_FILE}")
    try:
        document = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise CheckpointError(f"{config_path} is not a JSON object")
    if document.get("model_type") == "esm":
        raise CheckpointError(
            f"{path} is a HuggingFace checkpoint; convert it with `esm2-train import-hf`"
        )
    if document.get("format") != FORMAT:
        raise CheckpointError(f"{config_path} is not an {FORMAT} checkpoint config")
    if document.get("version") != VERSION:
        raise CheckpointError(
            f"{config_path} has format version {document.get('version')!r}; "
            f"this code reads version {VERSION}"
        )
    try:
        return ModelConfig.from_dict(document.get("model"))
    except ConfigError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from exc


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint directory (on CPU)."""
    weights = Path(path) / MODEL_FILE
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MODEL_FILE}")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {weights}: {exc}") from exc


def check_state_dict(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: str
) -> None:
    """Raise one clear ``CheckpointError`` for missing, unknown or misshaped tensors."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts))
    for name, tensor in state.items():
        want = tuple(expected[name].shape)
        if tuple(tensor.shape) != want:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {want}"
            )


def validate_state_dict(
    config: ModelConfig, state: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Check that ``state`` has exactly the tensors (names, shapes) of the model of ``config``."""
    check_state_dict(
        build_model(config.replace(backend="torch"), "meta").state_dict(), state, source
    )


def load_state_dict_checked(
    model: ESM2, state: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """``model.load_state_dict`` with one clear error for missing, unknown or misshaped tensors."""
    check_state_dict(model.state_dict(), state, source)
    model.load_state_dict(dict(state), strict=True)


def load_checkpoint(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> ESM2:
    """Build the model of a checkpoint directory and load its weights.

    ``overrides`` replace config fields (e.g. ``backend="torch"`` to run a checkpoint trained with
    TransformerEngine on a CPU, or ``activation_checkpointing=True``).
    """
    config = load_config(path)
    if overrides:
        try:
            config = config.replace(**overrides)
        except ConfigError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
    return instantiate(
        config, read_state_dict(path), device, source=f"checkpoint {path}", dtype=dtype
    )


def instantiate(
    config: ModelConfig,
    state: Mapping[str, torch.Tensor],
    device: torch.device | str = "cpu",
    source: str = "checkpoint",
    dtype: torch.dtype | None = None,
) -> ESM2:
    """A model of ``config`` on ``device`` holding ``state`` (built on the meta device first)."""
    model = build_model(config, device="meta")
    model.to_empty(device=device)
    model.tie_weights()
    load_state_dict_checked(model, state, source=source)
    if dtype is not None:
        model.to(dtype=dtype)
    return model


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
