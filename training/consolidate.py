"""Gather a DeepSpeed ZeRO checkpoint (any step of a run) into one of our checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from training.checkpoint import save_checkpoint
from training.errors import UserError
from training.model import build_model
from training.model_config import ModelConfig
from training.train import CHECKPOINTS


def locate(path: str | os.PathLike[str]) -> tuple[Path, str] | None:
    """(checkpoints dir, tag) for a run dir, its ``checkpoints/`` or one ``stepNNNNNNNN`` dir;
    None when ``path`` is not a DeepSpeed checkpoint."""
    p = Path(path)
    if (p / CHECKPOINTS / "latest").is_file():
        p = p / CHECKPOINTS
    if (p / "latest").is_file():
        return p, (p / "latest").read_text().strip()
    if p.name.startswith("step") and (p.parent / "config.json").is_file():
        return p.parent, p.name
    return None


def consolidate(path: str | os.PathLike[str], out: str | os.PathLike[str],
                overwrite: bool = False) -> Path:
    """Write the full fp32 weights of a ZeRO checkpoint as our checkpoint directory ``out``."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    found = locate(path)
    if found is None:
        raise UserError(f"{path}: not a DeepSpeed training checkpoint (no 'latest' file)")
    ckpt_dir, tag = found
    if not (ckpt_dir / tag).is_dir():
        raise UserError(f"{ckpt_dir / tag}: checkpoint not found")
    cfg = ModelConfig.from_dict(json.loads((ckpt_dir / "config.json").read_text())["model"])
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag)
    with torch.device("meta"):
        keys = set(build_model(cfg).state_dict())
    weights = {k: v.float().contiguous() for k, v in state.items() if k in keys}
    return save_checkpoint(weights, out, cfg, overwrite=overwrite,
                           metadata={"source": str(ckpt_dir / tag)})
