"""What a run's DeepSpeed engine is built from: the generated DeepSpeed config (the training
config's ``deepspeed:`` merged in last), ESM-2's learning-rate schedule and the optimiser's
weight-decay groups."""

from __future__ import annotations

from collections.abc import Callable

import torch

from training.config import OptimSection, TrainConfig
from training.trainer.run_dir import RunDir


def lr_factor(optim: OptimSection) -> Callable[[int], float]:
    """ESM-2's schedule: linear warm-up to the peak, then linear decay to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        span = max(optim.decay_steps - optim.warmup_steps, 1)
        done = min((step - optim.warmup_steps) / span, 1.0)
        return 1.0 - (1.0 - optim.min_lr_ratio) * done

    return factor


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def deepspeed_config(cfg: TrainConfig, bf16: bool, run: RunDir, universal: bool = False) -> dict:
    """The DeepSpeed config generated from ours; ``cfg.deepspeed`` is merged in last.

    Gradient accumulation is ours: a global batch is as many micro-batches per rank as its share
    needs (the same on every rank), so DeepSpeed's counter is off
    (``managed_gradient_accumulation: false``) and each ``engine.step()`` ends a global batch.
    """
    generated = {
        "train_micro_batch_size_per_gpu": 1,  # one token-budget batch per micro-step
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.run.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.run.tensorboard:  # DeepSpeed's monitor: loss and lr curves under <out>/tensorboard
        generated["tensorboard"] = {"enabled": True, "output_path": str(run.tensorboard),
                                    "job_name": "train"}
    if universal:
        generated["checkpoint"] = {"load_universal": True}
    return _merge(generated, cfg.deepspeed)


def group_decays(weight_decay: float) -> list[float]:
    """The weight decay of each optimiser group, in order: matrices, then every other tensor."""
    return [weight_decay, 0.0]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; not biases, norms or other vectors. Frozen parameters are left out."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": params, "weight_decay": wd}
            for params, wd in zip((decay, no_decay), group_decays(weight_decay), strict=True)]
