"""DeepSpeed ZeRO-3 training of ESM-2 on cluster shards, with exact resume.

Run one process per rank (``torchrun --nproc_per_node N -m training.cli train …`` or the
``deepspeed`` launcher); on CPU set ``DS_ACCELERATOR=cpu`` (ranks talk over gloo). Each rank reads
its own shards (see :mod:`training.data`). A checkpoint (every ``run.checkpoint_every`` steps and
at the end) holds the DeepSpeed state (model, optimizer partitions, scheduler) plus, per rank, the
loader position and RNG states, so ``--resume`` continues exactly where the run stopped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from training.config import OptimSection, TrainConfig
from training.data import DataConfig, StreamPosition, make_loader, split_shards
from training.errors import UserError
from training.evaluate import model_forward, perplexity, validation_batches, validation_examples
from training.model import build_model, mlm_loss

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"


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


def deepspeed_config(cfg: TrainConfig, world: int, bf16: bool, out_dir: Path) -> dict:
    """The DeepSpeed config generated from ours; ``cfg.deepspeed`` is merged in last."""
    per_batch = cfg.data.tokens_per_batch * world
    accum = max(1, math.ceil(cfg.run.tokens_per_step / per_batch)) if cfg.run.tokens_per_step else 1
    generated = {
        "train_micro_batch_size_per_gpu": 1,  # one token-budget batch per micro-step
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.run.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.run.tensorboard:  # DeepSpeed's monitor: loss and lr curves under <out>/tensorboard
        generated["tensorboard"] = {"enabled": True, "output_path": str(out_dir / "tensorboard"),
                                    "job_name": "train"}
    return _merge(generated, cfg.deepspeed)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; not biases, norms or other vectors. Frozen parameters are left out."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _rank_state_path(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rank{rank:05d}_state.pt"


class Trainer:
    """One rank of a training run."""

    def __init__(self, cfg: TrainConfig, data_dir: Path, out_dir: Path) -> None:
        import deepspeed

        self.cfg, self.data_dir, self.out = cfg, Path(data_dir), Path(out_dir)
        cuda = torch.cuda.is_available()
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        )
        bf16 = cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and cuda)
        torch.manual_seed(cfg.data.seed)  # identical initial weights on every rank
        self.model_config = cfg.model.build()
        model = build_model(self.model_config)
        optimizer = torch.optim.AdamW(
            param_groups(model, cfg.optim.weight_decay),
            lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            eps=cfg.optim.eps,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.optim))
        self.ds_config = deepspeed_config(cfg, self.world, bf16, self.out)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
        )
        self.accum = self.ds_config["gradient_accumulation_steps"]
        self.data = DataConfig(
            seed=cfg.data.seed,
            max_residues=cfg.data.max_residues,
            tokens_per_batch=cfg.data.tokens_per_batch,
            sort_window=cfg.data.sort_window,
            packed=cfg.data.packed,
        )
        self.position: dict | None = None
        self.step = 0

    # checkpoints -------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out / CHECKPOINTS

    def save(self, position: StreamPosition) -> None:
        tag = f"step{self.step:08d}"
        tag_dir = self.checkpoint_dir / tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        # our per-rank state first: DeepSpeed writes "latest" last, so a kill mid-save resumes
        # from the previous complete checkpoint
        torch.save(
            {"loader": position.state(), "torch_rng": torch.get_rng_state(), "step": self.step},
            _rank_state_path(tag_dir, self.rank),
        )
        dist.barrier()
        self.engine.save_checkpoint(
            str(self.checkpoint_dir), tag=tag, client_state={"step": self.step}
        )
        dist.barrier()
        if self.rank == 0:
            (self.checkpoint_dir / "config.json").write_text(
                json.dumps(
                    {
                        "train": self.cfg.model_dump(mode="json"),
                        "model": self.model_config.to_dict(),
                    },
                    indent=2,
                )
            )
            tags = sorted(p for p in self.checkpoint_dir.glob("step*") if p.is_dir())
            for old in tags[: -self.cfg.run.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def resume(self) -> bool:
        latest = self.checkpoint_dir / "latest"
        if not latest.is_file():
            return False
        tag = latest.read_text().strip()
        path, client = self.engine.load_checkpoint(str(self.checkpoint_dir), tag=tag)
        if path is None:
            raise UserError(f"{self.checkpoint_dir / tag}: could not load the checkpoint")
        state = torch.load(
            _rank_state_path(self.checkpoint_dir / tag, self.rank), weights_only=False
        )
        torch.set_rng_state(state["torch_rng"])
        self.position = state["loader"]
        self.step = int(client["step"])
        return True

    # training ----------------------------------------------------------------------------------
    def _forward(self, batch: dict[str, Any]) -> torch.Tensor:
        moved = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        out = self.engine(
            moved["input_ids"],
            attention_mask=moved.get("attention_mask"),
            seq_ids=moved.get("seq_ids"),
        )
        return mlm_loss(out["logits"], moved["labels"])

    def evaluate(self) -> dict[str, float] | None:
        shards = split_shards_or_none(self.data_dir)
        if shards is None:
            return None
        examples = validation_examples(
            shards,
            self.cfg.run.eval_seed,
            self.cfg.data.max_residues,
            self.cfg.run.eval_max_sequences,
        )
        batches = validation_batches(examples, self.cfg.data.tokens_per_batch, self.cfg.data.packed)
        self.engine.eval()
        result = perplexity(model_forward(self.engine), batches, self.device)
        self.engine.train()
        return result

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.out / METRICS, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def _trim_metrics(self) -> None:
        """On resume, drop metric lines past the checkpoint (they will be produced again)."""
        path = self.out / METRICS
        if self.rank != 0 or not path.is_file():
            return
        keep = [
            line
            for line in path.read_text().splitlines()
            if line and json.loads(line).get("step", 0) <= self.step
        ]
        path.write_text("".join(f"{line}\n" for line in keep))

    def fit(self, resume: bool = False, progress: bool = True) -> list[dict]:
        from tqdm.auto import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        if resume and self.resume():
            self._trim_metrics()
        elif self.rank == 0:
            (self.out / METRICS).unlink(missing_ok=True)
        position = StreamPosition(self.cfg.data.num_workers, self.position)
        loader = make_loader(
            split_shards(self.data_dir, "train"),
            self.data,
            self.rank,
            self.world,
            self.cfg.data.num_workers,
            self.position,
        )
        batches = iter(loader)
        history = []
        run = self.cfg.run
        bar = tqdm(
            total=run.steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not progress or self.rank != 0,
        )
        self.engine.train()
        while self.step < run.steps:
            start = time.perf_counter()
            loss_sum, tokens = 0.0, 0
            for _ in range(self.accum):
                batch = next(batches)
                position.update(batch)
                loss = self._forward(batch)
                self.engine.backward(loss)
                self.engine.step()
                loss_sum += float(loss.detach())
                tokens += int((batch["input_ids"] != 1).sum())  # real tokens (not <pad>)
            self.step += 1
            totals = torch.tensor([loss_sum / self.accum, float(tokens)], dtype=torch.float64)
            dist.all_reduce(totals)
            mean_loss = float(totals[0]) / self.world
            record = {
                "step": self.step,
                "loss": mean_loss,
                "perplexity": math.exp(min(mean_loss, 50)),
                "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                "tokens": int(totals[1]),
                "tokens_per_s": float(totals[1]) / (time.perf_counter() - start),
            }
            final = self.step == run.steps
            if (run.eval_every and self.step % run.eval_every == 0) or final:
                result = self.evaluate()
                if result is not None:
                    record.update({f"val_{k}": v for k, v in result.items()})
            self._log(record)
            history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.3f}")
            if (run.checkpoint_every and self.step % run.checkpoint_every == 0) or final:
                self.save(position)
        bar.close()
        return history

    def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full weights gathered from the ZeRO partitions (on rank 0; None elsewhere)."""
        if self.ds_config["zero_optimization"]["stage"] == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.engine.module.state_dict()
        if self.rank != 0:
            return None
        # the model's own keys (its state-dict hook leaves out the tied LM decoder weight)
        keys = set(self.engine.module.state_dict().keys())
        return {k: v.detach().float().cpu().clone() for k, v in state.items() if k in keys}


def split_shards_or_none(data_dir: Path) -> list[Path] | None:
    """The validation set's shard of a build, if it has one."""
    shard = data_dir / "validation" / "validation-000000.tar"
    return [shard] if shard.is_file() else None


def run_training(cfg: TrainConfig, data_dir: Path, out_dir: Path, resume: bool,
                 progress: bool = True) -> tuple[Trainer, list[dict]]:
    """Train (every rank calls this); rank 0 writes the final weights to ``out_dir/final``
    (our checkpoint format; ``esm2-train export`` turns it into a HuggingFace directory)."""
    if not (Path(data_dir) / "shards" / "train" / "index.json").is_file():
        raise UserError(f"{data_dir}: not a dataset build (no shards/train/index.json)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trainer = Trainer(cfg, data_dir, out_dir)
    history = trainer.fit(resume=resume, progress=progress)
    state = trainer.consolidated_state_dict()
    if trainer.rank == 0 and state is not None:
        from training.checkpoint import save_checkpoint

        save_checkpoint(
            state,
            Path(out_dir) / "final",
            trainer.model_config,
            overwrite=True,
            metadata={"step": str(trainer.step)},
        )
    dist.barrier()
    return trainer, history
