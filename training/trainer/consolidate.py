"""Gather a DeepSpeed ZeRO checkpoint (any step of a run) into one of our checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from training.errors import UserError
from training.model.checkpoint import save_checkpoint
from training.model.config import ModelConfig
from training.model.esm2 import build_model
from training.trainer.run_dir import RunDir


def consolidate(path: str | os.PathLike[str], out: str | os.PathLike[str],
                overwrite: bool = False) -> Path:
    """Write the full fp32 weights of a ZeRO checkpoint as our checkpoint directory ``out``."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    found = RunDir.locate(path)
    if found is None:
        raise UserError(f"{path}: not a training run or checkpoint (no complete checkpoint)")
    run, tag = found
    ckpt_dir = run.checkpoints
    if not run.is_complete(tag):
        raise UserError(f"{run.step_dir(tag)}: not a complete checkpoint")
    cfg = ModelConfig.from_dict(json.loads(run.config.read_text())["model"])
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag)
    with torch.device("meta"):
        keys = set(build_model(cfg).state_dict())
    weights = {k: v.float().contiguous() for k, v in state.items() if k in keys}
    return save_checkpoint(weights, out, cfg, overwrite=overwrite,
                           metadata={"source": str(ckpt_dir / tag)})
