"""Training run configuration (``config/train/*.yaml``): model, data, optimiser, schedule, run."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field

from pipeline.settings import Section, read_yaml, validate
from training.data.batches import EVAL_SEED, DataConfig
from training.model.config import ModelConfig


class ModelSection(Section):
    preset: str = "tiny"
    # ModelConfig fields (e.g. backend: te, token_dropout: false)
    overrides: dict[str, Any] = Field(default_factory=dict)

    def build(self) -> ModelConfig:
        """The ModelConfig this section describes (the preset with the overrides applied)."""
        return ModelConfig.from_preset(self.preset, **self.overrides)


class OptimSection(Section):
    """AdamW and ESM-2's schedule: linear warm-up, then linear decay to ``min_lr_ratio``."""

    lr: float = Field(4e-4, gt=0)
    betas: list[float] = Field([0.9, 0.98], min_length=2, max_length=2)
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = Field(2000, ge=0)
    decay_steps: int = Field(500_000, gt=0)  # step at which the lr reaches lr * min_lr_ratio
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0)


class RunSection(Section):
    steps: int = Field(gt=0)  # optimiser steps
    # tokens of a global batch (all ranks together; the same clusters for any world size);
    # 0: data.tokens_per_batch
    tokens_per_step: int = Field(0, ge=0)
    dist_timeout_s: float = Field(600.0, gt=0)  # a collective waiting longer fails the run
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(0, ge=0)  # 0: only at the end
    checkpoint_every: int = Field(0, ge=0)  # 0: only at the end
    keep_last: int = Field(3, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    zero_stage: int = Field(3, ge=0, le=3)
    eval_max_sequences: int = Field(0, ge=0)  # 0: the whole validation set
    eval_seed: int = EVAL_SEED  # fixed masking of the validation set
    tensorboard: bool = False


class TrainConfig(Section):
    model: ModelSection = ModelSection()
    data: DataConfig = DataConfig()
    optim: OptimSection = OptimSection()
    run: RunSection
    # merged last into the generated DeepSpeed config
    deepspeed: dict[str, Any] = Field(default_factory=dict)


def load_train_config(path: str | os.PathLike[str]) -> TrainConfig:
    """Load and validate a YAML training config."""
    return validate(TrainConfig, read_yaml(path), str(path))
