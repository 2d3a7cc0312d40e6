"""DeepSpeed ZeRO-3 training of ESM-2 on cluster shards, with exact, elastic resume.

Run one process per rank (``torchrun --nproc_per_node N -m training.cli train …``, the
``deepspeed --module`` launcher, or plain ``esm2-train train`` for one process); on CPU set
``DS_ACCELERATOR=cpu`` (ranks talk over gloo). Every optimiser step trains on one *global batch*
(:mod:`training.data.sampler`): the same clusters for any world size, each rank taking its share as
the same number of micro-batches. The loss is the mean over the global batch's masked tokens, so
the step does not depend on how the batch was shared out.

A checkpoint (every ``run.checkpoint_every`` steps and at the end) holds DeepSpeed's state (model,
optimizer partitions, scheduler) and the global data position (epoch, global batches consumed):
``--resume`` continues the same sample sequence exactly, also on another number of ranks (the
ZeRO partitions are then converted to DeepSpeed's universal checkpoint format first).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.shard_reader import SplitIndex
from training.alphabet import IGNORE_INDEX
from training.config import TrainConfig
from training.data.batches import make_loader
from training.data.build_source import BuildSource
from training.data.sampler import Position
from training.errors import RankError, StoppedByPeer, UserError
from training.evaluate import evaluation_batches, model_forward, perplexity
from training.model.esm2 import build_model
from training.trainer.engine_config import deepspeed_config, group_decays, lr_factor, param_groups
from training.trainer.run_dir import RunDir


def single_process_env() -> None:
    """Rendezvous variables for a run started without a launcher (one process)."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    with socket.socket() as sock:  # a free port on this machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


SHM_DIR = Path("/dev/shm")


def release_shm_names(rank: int) -> None:
    """Unlink this rank's DeepSpeed shared-memory all-reduce buffer once every rank has mapped
    it (call on every rank, right after ``deepspeed.init_distributed``).

    On CPU, where the launcher says all ranks share the machine (the deepspeed launcher sets
    ``LOCAL_SIZE``), DeepSpeed (0.19) creates a 69 MB segment per rank in /dev/shm and never
    unlinks it: every run left them in memory until the machine restarted (4.3 GB after a day of
    this project's tests). Each rank maps the others' as it initialises, so after a barrier the
    names are no longer needed; the mappings last as long as the processes, and a run killed
    later leaves nothing behind."""
    dist.barrier()  # every rank's init_distributed has returned: all buffers are mapped
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    (SHM_DIR / name).unlink(missing_ok=True)


def launch_rank() -> int:
    """This process's rank as the launcher set it (0 when there is none)."""
    return int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))


def check_split_feeds(train: SplitIndex, world: int, source: object) -> None:
    """Every rank needs at least one train cluster (else one error, before any collective)."""
    if len(train) < world:
        raise UserError(
            f"{source}: the train split has {len(train)} UniRef50 clusters, fewer than the "
            f"{world} ranks: every rank needs at least one cluster (use fewer ranks or a larger "
            "build)")


class Trainer:
    """One rank of a training run."""

    def __init__(self, cfg: TrainConfig, data: BuildSource | str | Path, out_dir: Path,
                 resume: str = "no", overwrite: bool = False) -> None:
        """``resume``: ``no`` (the run directory must be fresh unless ``overwrite``),
        ``yes`` (a complete checkpoint must exist) or ``auto`` (resume if there is one)."""
        import deepspeed

        self.cfg = cfg
        self.source = data if isinstance(data, BuildSource) else BuildSource(data)
        self.run_dir = RunDir(Path(out_dir))
        self.out = self.run_dir.root
        cuda = torch.cuda.is_available()
        single_process_env()
        deepspeed.init_distributed(
            dist_backend="nccl" if cuda else "gloo",
            timeout=datetime.timedelta(seconds=cfg.run.dist_timeout_s))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        release_shm_names(self.rank)
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        )
        self.train_dir = self.source.split_dir("train")
        check_split_feeds(SplitIndex(self.train_dir), self.world, self.source)
        self.tokens_per_step = cfg.run.tokens_per_step or cfg.data.tokens_per_batch
        self.resume_tag = self._prepare_run_dir(resume, overwrite)
        universal = False
        if self.resume_tag is not None:
            saved_world = self.run_dir.meta(self.resume_tag)["world_size"]
            universal = saved_world != self.world
            if universal:
                self._convert_to_universal(self.resume_tag)
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
        self.ds_config = deepspeed_config(cfg, bf16, self.run_dir, universal)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
        )
        self.data = cfg.data
        self.position = Position()
        self.step = 0
        if self.resume_tag is not None:
            self._load(self.resume_tag, universal)

    # run directory and checkpoints ------------------------------------------------------------
    def _prepare_run_dir(self, resume: str, overwrite: bool) -> str | None:
        """The tag to resume from; a fresh start clears what a previous run left."""
        tag = self.run_dir.resume_tag(resume, overwrite)
        if tag is None:
            dist.barrier()
            if self.rank == 0:
                self.run_dir.clear()
            dist.barrier()
        return tag

    def _convert_to_universal(self, tag: str) -> None:
        """ZeRO partitions saved on another world size → DeepSpeed's universal checkpoint."""
        target = self.run_dir.step_dir(tag) / "universal"
        if self.rank == 0 and not (target / "zero").is_dir():
            import argparse

            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            from pipeline.atomic import atomic_dir

            with atomic_dir(target) as tmp:
                ds_to_universal(argparse.Namespace(
                    input_folder=str(self.run_dir.step_dir(tag)), output_folder=str(tmp),
                    num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                    strict=True, inject_missing_state=False))
        dist.barrier()

    def _load(self, tag: str, universal: bool) -> None:
        load_dir = self.run_dir.step_dir(tag) if universal else self.run_dir.checkpoints
        path, _ = self.engine.load_checkpoint(str(load_dir), tag="universal" if universal else tag)
        if path is None:
            raise UserError(f"{self.run_dir.step_dir(tag)}: could not load the checkpoint")
        if universal:
            self._repair_universal_load()
        meta = self.run_dir.meta(tag)
        self.step = int(meta["step"])
        self.position = Position.from_dict(meta["position"])
        self.scheduler.load_state_dict(meta["scheduler"])
        state = torch.load(self.run_dir.rng_state(tag), weights_only=True)
        torch.set_rng_state(state)

    def _repair_universal_load(self) -> None:
        """Undo two side effects of DeepSpeed's universal ZeRO-3 load (0.19): every parameter
        group gets the first group's settings (here: the weight decay of matrices would reach
        norms and biases), and every group's Adam ``step`` is one shared tensor, so each
        optimiser step would count once per group (a wrong bias correction)."""
        decays = group_decays(self.cfg.optim.weight_decay)
        for group, decay in zip(self.engine.optimizer.param_groups, decays, strict=True):
            group["weight_decay"] = decay
        zero = self.engine.optimizer
        for flat in getattr(zero, "fp32_partitioned_groups_flat", []):
            state = zero.optimizer.state.get(flat, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    def save(self) -> None:
        run, tag = self.run_dir, RunDir.tag(self.step)
        run.step_dir(tag).mkdir(parents=True, exist_ok=True)
        dist.barrier()
        self.engine.save_checkpoint(str(run.checkpoints), tag=tag, save_latest=False)
        dist.barrier()
        if self.rank == 0:
            run.config.write_text(json.dumps(
                {"train": self.cfg.model_dump(mode="json"), "model": self.model_config.to_dict(),
                 "data": str(self.source)}, indent=2))
            torch.save(torch.get_rng_state(), run.rng_state(tag))
            run.mark_complete(tag, {
                "step": self.step, "position": self.position.to_dict(),
                "world_size": self.world, "scheduler": self.scheduler.state_dict()})
            run.prune(self.cfg.run.keep_last, tag)
        dist.barrier()

    # training ----------------------------------------------------------------------------------
    def _nll(self, batch: dict[str, Any]) -> torch.Tensor:
        """Summed cross-entropy over the micro-batch's masked positions."""
        moved = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        out = model_forward(self.engine)(moved)
        return out["nll"] + 0.0 * out["logits"].sum()  # a graph even when no position is masked

    def evaluate(self) -> dict[str, float] | None:
        shard = self.source.validation_shard()
        if shard is None:
            return None
        batches = evaluation_batches([shard], self.cfg)
        self.engine.eval()
        result = perplexity(model_forward(self.engine), batches, self.device)
        self.engine.train()
        return result

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.run_dir.metrics, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def _trim_metrics(self) -> None:
        """On resume, drop metric lines past the checkpoint (they will be produced again)."""
        path = self.run_dir.metrics
        if self.rank != 0 or not path.is_file():
            return
        keep = [
            line
            for line in path.read_text().splitlines()
            if line and json.loads(line).get("step", 0) <= self.step
        ]
        path.write_text("".join(f"{line}\n" for line in keep))

    def global_batches(self) -> Iterator[list[dict]]:
        """This rank's micro-batches, one list per global batch (from the current position)."""
        loader = make_loader(self.train_dir, self.data, self.tokens_per_step, self.rank,
                             self.world, self.cfg.data.num_workers, self.position,
                             local_shard=self.source.shard_opener("train"))
        micro: list[dict] = []
        for batch in loader:
            if "error" in batch:
                raise RankError(batch["error"])
            micro.append(batch)
            if batch["micro"] == batch["micros"] - 1:
                yield micro
                micro = []

    def _gather_step(self, batches: Iterator[list[dict]]) -> tuple[list[dict], torch.Tensor]:
        """This rank's micro-batches of the next global batch, and the batch's masked and real
        token counts over all ranks. The same collective tells every rank whether any rank could
        not read its share: then the lowest such rank reports why and every rank stops."""
        failure: RankError | None = None
        try:
            micro = next(batches)
        except RankError as exc:
            failure, micro = exc, []
        counts = torch.zeros(2 + self.world, dtype=torch.float64)
        counts[0] = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro)
        counts[1] = sum(int((b["input_ids"] != 1).sum()) for b in micro)
        counts[2 + self.rank] = failure is not None
        dist.all_reduce(counts)
        failed = [r for r in range(self.world) if counts[2 + r] > 0]
        if failed:
            if failure is not None and self.rank == failed[0]:
                raise failure
            raise StoppedByPeer(f"rank {failed[0]} could not read its data")
        return micro, counts[:2]

    def fit(self, progress: bool = True, trace_clusters: bool = False) -> list[dict]:
        """Train to ``run.steps``; returns the metrics of the steps run (``trace_clusters``: also
        each step's cluster ids, gathered from every rank)."""
        from tqdm.auto import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        self._trim_metrics()
        history = []
        run = self.cfg.run
        bar = tqdm(total=run.steps, initial=self.step, desc="train", unit="step",
                   disable=not progress or self.rank != 0)
        self.engine.train()
        batches = self.global_batches()
        while self.step < run.steps:
            start = time.perf_counter()
            micro, counts = self._gather_step(batches)
            masked = max(float(counts[0]), 1.0)
            nll_sum = 0.0
            for batch in micro:
                nll = self._nll(batch)
                # DeepSpeed averages gradients over ranks: scale so that the step's gradient is
                # that of the mean loss over every masked token of the global batch
                self.engine.backward(nll * (self.world / masked), scale_wrt_gas=False)
                nll_sum += float(nll.detach())
            self.engine.step()
            self.step += 1
            self.position = Position.from_dict(micro[-1]["end"])
            total = torch.tensor([nll_sum], dtype=torch.float64)
            dist.all_reduce(total)
            mean_loss = float(total[0]) / masked
            record = {
                "step": self.step,
                "loss": mean_loss,
                "perplexity": math.exp(min(mean_loss, 50)),
                "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                "tokens": int(counts[1]),
                "clusters": sum(len(b["clusters"]) for b in micro),
                "micro_batches": len(micro),
                "epoch": micro[-1]["epoch"],
                "tokens_per_s": float(counts[1]) / (time.perf_counter() - start),
            }
            if trace_clusters:
                gathered: list[list[str] | None] = [None] * self.world
                dist.all_gather_object(gathered, [c for b in micro for c in b["clusters"]])
                record["cluster_ids"] = sorted(c for part in gathered for c in part or [])
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
                self.save()
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


def run_training(cfg: TrainConfig, data: str | Path | BuildSource, out_dir: Path,
                 resume: str = "no", overwrite: bool = False, progress: bool = True,
                 trace_clusters: bool = False) -> tuple[Trainer, list[dict]]:
    """Train (every rank calls this); rank 0 writes the final weights to ``out_dir/final``
    (our checkpoint format; ``esm2-train export`` turns it into a HuggingFace directory)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trainer = Trainer(cfg, data, out_dir, resume, overwrite)
    history = trainer.fit(progress=progress, trace_clusters=trace_clusters)
    state = trainer.consolidated_state_dict()
    if trainer.rank == 0 and state is not None:
        from training.model.checkpoint import save_checkpoint

        save_checkpoint(
            state,
            trainer.run_dir.final,
            trainer.model_config,
            overwrite=True,
            metadata={"step": str(trainer.step)},
        )
    dist.barrier()
    return trainer, history
