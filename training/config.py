"""Training run configuration (``config/train/*.yaml``): model, data, optimiser, schedule, run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from training.data import DataConfig
from training.errors import UserError
from training.model_config import ModelConfig


class TrainConfigError(UserError, ValueError):
    """The training config is invalid."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelSection(_Section):
    preset: str = "tiny"
    overrides: dict[str, Any] = {}  # ModelConfig fields (e.g. backend: te, token_dropout: false)

    def build(self) -> ModelConfig:
        """The ModelConfig this section describes (the preset with the overrides applied)."""
        return ModelConfig.from_preset(self.preset, **self.overrides)


class DataSection(_Section):
    seed: int = 0
    max_residues: int = Field(1022, gt=0)
    tokens_per_batch: int = Field(16_384, gt=0)  # per micro-batch and rank
    packed: bool = True
    sort_window: int = Field(256, gt=0)  # validation batching
    shuffle_chunk: int = Field(4096, gt=0)  # consecutive clusters shuffled together
    num_workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _budget_holds_a_sequence(self) -> DataSection:
        if self.tokens_per_batch < self.max_residues + 2:
            raise ValueError(f"tokens_per_batch ({self.tokens_per_batch}) must hold one cropped "
                             f"sequence: at least max_residues + 2 = {self.max_residues + 2}")
        return self

    def loader_config(self) -> DataConfig:
        """The loader's view of this section."""
        return DataConfig(seed=self.seed, max_residues=self.max_residues,
                          tokens_per_batch=self.tokens_per_batch, sort_window=self.sort_window,
                          packed=self.packed, shuffle_chunk=self.shuffle_chunk)


class OptimSection(_Section):
    """AdamW and ESM-2's schedule: linear warm-up, then linear decay to ``min_lr_ratio``."""

    lr: float = Field(4e-4, gt=0)
    betas: list[float] = Field([0.9, 0.98], min_length=2, max_length=2)
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = Field(2000, ge=0)
    decay_steps: int = Field(500_000, gt=0)  # step at which the lr reaches lr * min_lr_ratio
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0)


class RunSection(_Section):
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
    eval_seed: int = 12345  # fixed masking of the validation set
    tensorboard: bool = False


class TrainConfig(_Section):
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    run: RunSection
    deepspeed: dict[str, Any] = {}  # merged last into the generated DeepSpeed config


def load_train_config(path: str | os.PathLike[str]) -> TrainConfig:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as err:
        raise TrainConfigError(f"{p}: cannot read config: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise TrainConfigError(f"{p}: not valid YAML: {str(err).splitlines()[0]}") from None
    try:
        return TrainConfig.model_validate(data or {})
    except ValidationError as err:
        parts = []
        for e in err.errors():
            loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {'unknown key' if e['type'] == 'extra_forbidden' else msg}")
        raise TrainConfigError(f"{p}: invalid config: " + "; ".join(parts)) from None
