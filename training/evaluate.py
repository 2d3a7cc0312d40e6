"""Validation perplexity: exp(mean cross-entropy over masked positions), with fixed masking."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from pipeline.shard_reader import iter_clusters
from training.data.batches import (
    EVAL_SEED,
    DataConfig,
    Example,
    batch_by_tokens,
    collate,
    make_example,
)
from training.errors import UserError
from training.model.config import MAX_RESIDUES

if TYPE_CHECKING:
    from training.config import TrainConfig


def validation_examples(
    shards: Sequence[Path], seed: int, max_residues: int = MAX_RESIDUES, limit: int = 0
) -> list[Example]:
    """The validation set's examples, masked with a fixed seed (the same every evaluation)."""
    cfg = DataConfig(seed=seed, max_residues=max_residues)
    out = []
    for sample in iter_clusters(shards):
        out.append(make_example(sample, 0, cfg))
        if limit and len(out) == limit:
            break
    return out


def validation_batches(
    examples: Sequence[Example], tokens_per_batch: int, packed: bool
) -> list[dict[str, torch.Tensor]]:
    cfg = DataConfig(
        tokens_per_batch=tokens_per_batch, packed=packed, sort_window=max(len(examples), 1)
    )
    return [collate(b, packed) for b in batch_by_tokens(examples, cfg)]


def evaluation_batches(shards: Sequence[Path], cfg: TrainConfig) -> list[dict[str, torch.Tensor]]:
    """The validation batches of a training run: its eval seed and limit, its crop, budget and
    packing (what the trainer's validation and ``esm2-train evaluate RUN`` both use)."""
    examples = validation_examples(shards, cfg.run.eval_seed, cfg.data.max_residues,
                                   cfg.run.eval_max_sequences)
    return validation_batches(examples, cfg.data.tokens_per_batch, cfg.data.packed)


@torch.no_grad()
def perplexity(
    forward: Callable[[dict[str, torch.Tensor]], dict],
    batches: Sequence[dict[str, torch.Tensor]],
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Perplexity of ``forward`` (batch → the model's output with its ``nll`` and ``scored``,
    :func:`model_forward`) on ``batches``; ranks share the work.

    Under torch.distributed every rank runs the same number of forwards (ZeRO-3 gathers
    parameters collectively): rank r takes batches r, r + world, …, and ranks that run out repeat
    a batch whose result they discard. Totals are summed across ranks.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = list(batches[rank::world])
    rounds = math.ceil(len(batches) / world) if batches else 0
    nll, count = 0.0, 0
    for i in range(rounds):
        batch = mine[i] if i < len(mine) else batches[0]
        moved = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        out = forward(moved)
        if i < len(mine):
            nll, count = nll + float(out["nll"]), count + int(out["scored"])
    totals = torch.tensor([nll, float(count)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(totals)
    nll, count = float(totals[0]), int(totals[1])
    mean = nll / count if count else float("nan")
    return {
        "loss": mean,
        "perplexity": math.exp(mean) if count else float("nan"),
        "masked_tokens": count,
    }


def model_forward(model: torch.nn.Module) -> Callable[[dict[str, torch.Tensor]], dict]:
    """Batch dict → our ESM2's output with its loss (padded or packed batches)."""

    def run(batch: dict[str, torch.Tensor]) -> dict:
        return model(
            batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            seq_ids=batch.get("seq_ids"),
            labels=batch["labels"],
        )

    return run


def evaluate_model(
    model: torch.nn.Module,
    shards: Iterable[Path],
    seed: int = EVAL_SEED,
    tokens_per_batch: int = 8192,
    limit: int = 0,
) -> dict[str, float]:
    """Perplexity of a (non-distributed) model on validation shards with fixed masking."""
    model.eval()
    examples = validation_examples(list(shards), seed, limit=limit)
    batches = validation_batches(examples, tokens_per_batch, packed=True)
    device = next(model.parameters()).device
    return perplexity(model_forward(model), batches, device)


def evaluate_run(path: str | Path, data: str | None = None, device: str | torch.device = "cpu",
                 cache_dir: str | None = None) -> dict:
    """Perplexity of a training run's checkpoint (a run dir → its latest complete checkpoint, or
    ``checkpoints/stepN``) on its build's validation set, with the run's own data settings: the
    number the trainer's validation logged at that step."""
    from training.config import TrainConfig
    from training.data.build_source import BuildSource
    from training.model.checkpoint import load_checkpoint
    from training.trainer.consolidate import consolidate
    from training.trainer.run_dir import RunDir

    found = RunDir.locate(path)
    if found is None:
        raise UserError(f"{path}: not a training run or checkpoint (no complete checkpoint)")
    run, tag = found
    saved = json.loads(run.config.read_text())
    cfg = TrainConfig.model_validate(saved["train"])
    source = BuildSource(data or saved["data"], cache_dir)
    shard = source.validation_shard()
    if shard is None:
        raise UserError(f"{source}: the build has no validation set (validation/)")
    with tempfile.TemporaryDirectory() as tmp:
        model = load_checkpoint(consolidate(run.step_dir(tag), f"{tmp}/model"), device=device)
    model.eval()
    result = perplexity(model_forward(model), evaluation_batches([shard], cfg),
                        next(model.parameters()).device)
    return {"checkpoint": str(run.step_dir(tag)), "step": run.meta(tag)["step"],
            "data": str(source), "masking_seed": cfg.run.eval_seed, **result}
