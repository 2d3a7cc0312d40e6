"""``esm2-train``: command-line entry point (``train``, ``evaluate``, ``import-hf``, ``export``,
``embed``).

Expected errors (missing files, bad configs, bad input) print one line
``esm2-train: error: ...`` and exit with status 1; argument errors exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.errors import PipelineError
from training.data.batches import EVAL_SEED
from training.errors import UserError
from training.model.config import MAX_RESIDUES

PROG = "esm2-train"


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"unknown device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but no CUDA GPU is visible")
    return device


def _cmd_import_hf(args: argparse.Namespace) -> int:
    from training.model.convert import import_hf

    out = import_hf(args.hf_dir, args.out, overwrite=args.overwrite)
    print(f"wrote checkpoint {out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import tempfile

    from training.model.convert import export_hf
    from training.trainer.consolidate import consolidate
    from training.trainer.run_dir import RunDir

    if RunDir.locate(args.checkpoint) is None:
        out = export_hf(args.checkpoint, args.out, overwrite=args.overwrite)
    else:  # a ZeRO checkpoint of a run: gather the partitions first
        with tempfile.TemporaryDirectory() as tmp:
            gathered = consolidate(args.checkpoint, f"{tmp}/model")
            out = export_hf(gathered, args.out, overwrite=args.overwrite)
    print(f"wrote HuggingFace EsmForMaskedLM directory {out}")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from training.embed import EmbedOptions, embed_fasta
    from training.model.convert import load_any_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    model = load_any_model(args.checkpoint, device=device, backend=args.backend)
    trained = model.config.max_position_embeddings - 2
    if args.max_residues > trained:  # (a window is at most --max-residues)
        print(f"{PROG}: warning: --max-residues {args.max_residues} is beyond the {trained} "
              "residues per sequence the model was trained on; longer inputs are extrapolated",
              file=sys.stderr)
    if args.bf16:
        model.to(torch.bfloat16)
    options = EmbedOptions(
        layers=args.layers,
        max_residues=args.max_residues,
        window=args.window,
        window_overlap=args.window_overlap,
        tokens_per_batch=args.tokens_per_batch,
        progress=not args.no_progress,
    )
    summary = embed_fasta(
        model, args.fasta, args.out, options, overwrite=args.overwrite, source=str(args.checkpoint)
    )
    print(
        f"wrote {summary.path}: {summary.num_sequences} sequences, "
        f"{summary.total_residues} residues, layers {summary.layers}, "
        f"{summary.truncated} truncated, {summary.windowed} windowed"
    )
    return 0


def _launch(args: argparse.Namespace, resume: str) -> int:
    """``esm2-train train --nproc-per-node N``: check what every rank would check, once, then
    start N ranks with torchrun's machinery on this machine."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from pipeline.shard_reader import SplitIndex
    from training.config import load_train_config
    from training.data.build_source import BuildSource
    from training.trainer.run_dir import RunDir
    from training.trainer.train import check_split_feeds

    load_train_config(args.config)
    source = BuildSource(args.data, args.cache_dir)
    check_split_feeds(SplitIndex(source.split_dir("train")), args.nproc_per_node, source)
    RunDir(Path(args.out)).resume_tag(resume, args.overwrite)
    rest = list(args.argv)
    at = next(i for i, a in enumerate(rest) if a.startswith("--nproc-per-node"))
    del rest[at : at + (1 if "=" in rest[at] else 2)]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        run(parse_args(["--standalone", "--nproc-per-node", str(args.nproc_per_node),
                        "--module", "training.cli", *rest]))
    except ChildFailedError as exc:  # the failing rank printed why; say who stopped, how
        how = ", ".join(f"rank {rank} status {failure.exitcode}"
                        for rank, failure in sorted(exc.failures.items()))
        print(f"{PROG}: training stopped ({how})", file=sys.stderr)
        return 1
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from training.config import load_train_config
    from training.data.build_source import BuildSource
    from training.trainer.train import run_training

    resume = "auto" if args.resume_or_start else "yes" if args.resume else "no"
    if args.nproc_per_node and "RANK" not in os.environ:
        return _launch(args, resume)
    cfg = load_train_config(args.config)
    if args.steps:
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"steps": args.steps})})
    trainer, history = run_training(cfg, BuildSource(args.data, args.cache_dir), Path(args.out),
                                    resume, args.overwrite, progress=not args.no_progress)
    if trainer.rank == 0 and history:
        last = history[-1]
        val = f", validation perplexity {last['val_perplexity']:.3f}" if (
            "val_perplexity" in last) else ""
        print(f"step {last['step']}: loss {last['loss']:.4f}{val}; weights in {args.out}/final")
    elif trainer.rank == 0:
        print(f"{args.out}: already at step {trainer.step} of {cfg.run.steps}; nothing to do")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from training.evaluate import evaluate_model, evaluate_run
    from training.model.convert import load_any_model
    from training.trainer.run_dir import RunDir

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    if RunDir.locate(args.checkpoint) is not None:  # a run: its own data and settings
        result = evaluate_run(args.checkpoint, args.data, device, args.cache_dir)
    else:
        from training.data.build_source import BuildSource

        shards = [Path(s) for s in args.shards]
        if not shards and args.data:
            shard = BuildSource(args.data, args.cache_dir).validation_shard()
            shards = [shard] if shard else []
        if not shards:
            raise UserError("evaluate: give --data BUILD (with validation/) or --shards FILES")
        model = load_any_model(args.checkpoint, device=device)
        result = evaluate_model(model, shards, seed=args.seed, limit=args.limit)
        result = {"checkpoint": str(args.checkpoint), "masking_seed": args.seed, **result}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"perplexity {result['perplexity']:.4f} (loss {result['loss']:.4f} over "
          f"{result['masked_tokens']} masked tokens)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``esm2-train``."""
    parser = argparse.ArgumentParser(prog=PROG, description="ESM-2 model tools.")
    # the deepspeed launcher passes --local_rank=N before the subcommand; the rank comes from the
    # environment (LOCAL_RANK) either way
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="DeepSpeed ZeRO-3 training (run under torchrun/deepspeed)")
    p.add_argument("--config", required=True, help="training config YAML (config/train/*.yaml)")
    p.add_argument("--data", required=True, help="dataset build: a directory, or an http(s):// "
                   "or object-store URL of one (fetched into --cache-dir)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, final)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--resume", action="store_true",
                     help="continue from the latest complete checkpoint (an error if none)")
    how.add_argument("--resume-or-start", action="store_true",
                     help="continue if there is a checkpoint, else start fresh (requeued jobs)")
    how.add_argument("--overwrite", action="store_true",
                     help="replace a previous run in --out (its checkpoints, metrics, final/)")
    p.add_argument("--steps", type=int, default=0, help="override run.steps")
    p.add_argument("--nproc-per-node", type=int, default=0, metavar="N",
                   help="start N ranks on this machine (torchrun's machinery, after checking the "
                   "config, data and run directory once); omit under torchrun/deepspeed")
    p.add_argument("--cache-dir", default=None, help="local cache of a remote build "
                   "(default: $ESM2_CACHE or ~/.cache/esm2-pretrain)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="validation perplexity with fixed masking")
    p.add_argument("--checkpoint", required=True, help="a training run (its latest checkpoint, "
                   "with the run's data and settings), checkpoints/stepN, our checkpoint or a "
                   "HuggingFace dir")
    p.add_argument("--data", help="dataset build (uses validation/); a run's own by default")
    p.add_argument("--cache-dir", default=None, help="local cache of a remote build")
    p.add_argument("--shards", nargs="*", default=[], help="cluster shards to evaluate on")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="masking seed (fixed per report)")
    p.add_argument("--limit", type=int, default=0, help="at most this many sequences")
    p.add_argument("--out", help="write the result as JSON here")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if any)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "import-hf",
        help="convert a HuggingFace EsmForMaskedLM directory into our checkpoint",
        description="Convert a HuggingFace EsmForMaskedLM directory (config.json + "
        "model.safetensors or pytorch_model.bin) into an esm2-pretrain checkpoint.",
    )
    p.add_argument("hf_dir", metavar="DIR", help="HuggingFace model directory")
    p.add_argument("out", metavar="OUT", help="checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_import_hf)

    p = sub.add_parser(
        "export",
        help="write a checkpoint as a HuggingFace EsmForMaskedLM directory",
        description="Write an esm2-pretrain checkpoint as a directory that "
        "EsmForMaskedLM.from_pretrained and EsmTokenizer.from_pretrained load.",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="our checkpoint directory, or a training "
                   "run / its checkpoints/ / one checkpoints/stepN (ZeRO partitions are gathered)")
    p.add_argument("out", metavar="OUT", help="directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "embed",
        help="per-residue and mean embeddings of a FASTA file into a zarr store",
        description="Embed the sequences of a FASTA file (plain or gzip) into a zarr v3 store: "
        "per-residue embeddings (ragged, with offsets) and mean-pooled embeddings.",
    )
    p.add_argument(
        "--checkpoint", required=True, help="our checkpoint or a HuggingFace ESM directory"
    )
    p.add_argument("--fasta", required=True, help="FASTA file (.gz allowed)")
    p.add_argument("--out", required=True, help="zarr store to write (e.g. out.zarr)")
    p.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=[-1],
        help="layers to store: 0 = embeddings, N = last (after the final LayerNorm), "
        "negative counts from the end (default: -1)",
    )
    p.add_argument(
        "--max-residues",
        type=int,
        default=MAX_RESIDUES,
        help=f"longer sequences are truncated (or windowed with --window); default {MAX_RESIDUES}",
    )
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help="embed sequences over --max-residues as overlapping windows of this many residues",
    )
    p.add_argument(
        "--window-overlap", type=int, default=None, help="residues shared by neighbouring windows"
    )
    p.add_argument(
        "--tokens-per-batch", type=int, default=8192, help="token budget of a batch (default 8192)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    p.add_argument("--backend", choices=("torch", "te"), default="torch", help="block backend")
    p.add_argument("--bf16", action="store_true", help="run the model in bfloat16")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_embed)
    return parser


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))


def _peer_failure(exc: BaseException) -> bool:
    """Whether an exception says a collective broke (a peer died, or the timeout passed)."""
    if isinstance(exc, torch.distributed.DistError):
        return True
    text = str(exc)
    return any(k in text for k in ("gloo", "NCCL", "Connection closed", "Connection reset",
                                   "timed out", "Timed out", "ProcessGroup"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``esm2-train``; returns the exit status.

    Under a launcher, an error that every rank meets alike (a bad config, a run directory in
    use) is printed by rank 0 only; an error of one rank (a damaged shard) by that rank. A rank
    that fails during training leaves at once (``os._exit``), without waiting in collectives or
    exit handlers: the launcher then stops the others, and without a launcher their collectives
    time out after ``run.dist_timeout_s``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    quiet = False  # a rank that leaves the report of an error to another rank
    args.argv = [a for a in argv if not a.startswith("--local_rank") and
                 not a.startswith("--local-rank")]
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        status = args.func(args)
    except PipelineError as exc:  # UserError and the dataset side's errors
        message = " ".join(str(exc).split())  # always one line
        if getattr(exc, "silent", False):
            quiet = True
        elif not distributed or _rank() == 0 or getattr(exc, "rank_local", False):
            where = f"rank {_rank()}: " if distributed and getattr(exc, "rank_local", False) else ""
            sys.stdout.flush()  # the error stays the last line of a log holding both streams
            print(f"{PROG}: error: {where}{message}", file=sys.stderr, flush=True)
        else:
            quiet = True
        status = 1
    except (torch.distributed.DistError, RuntimeError) as exc:
        if not (distributed and _peer_failure(exc)):
            raise
        first = " ".join(str(exc).split())[:200]
        print(f"{PROG}: rank {_rank()} stopped: a collective failed ({first}); another rank "
              "failed or stalled: see its error", file=sys.stderr, flush=True)
        status = 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        status = 130
    if distributed:
        _leave(status, quiet)
    return status


def _leave(status: int, quiet: bool) -> None:
    """End a rank of a distributed run with ``status``. A rank that succeeded tears its
    process group down first; then every rank leaves without the interpreter's finalisation,
    whose C++ destructors can meet gloo's threads still running and abort the process
    ("terminate called without an active exception") after a run that succeeded."""
    import logging

    if status == 0 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # after the run's last barrier: no waiting
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    if quiet:  # let the reporting rank print before the launcher stops everyone
        time.sleep(3)
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
