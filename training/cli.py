"""``esm2-train``: command-line entry point (``train``, ``evaluate``, ``import-hf``, ``export``,
``embed``).

Expected errors (missing files, bad configs, bad input) print one line
``esm2-train: error: ...`` and exit with status 1; argument errors exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from pipeline.errors import PipelineError
from training.errors import UserError

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
    from training.convert import import_hf

    out = import_hf(args.hf_dir, args.out, overwrite=args.overwrite)
    print(f"wrote checkpoint {out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import tempfile

    from training.consolidate import consolidate, locate
    from training.convert import export_hf

    if locate(args.checkpoint) is None:
        out = export_hf(args.checkpoint, args.out, overwrite=args.overwrite)
    else:  # a ZeRO checkpoint of a run: gather the partitions first
        with tempfile.TemporaryDirectory() as tmp:
            gathered = consolidate(args.checkpoint, f"{tmp}/model")
            out = export_hf(gathered, args.out, overwrite=args.overwrite)
    print(f"wrote HuggingFace EsmForMaskedLM directory {out}")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from training.convert import load_any_model
    from training.embed import EmbedOptions, embed_fasta

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    model = load_any_model(args.checkpoint, device=device, backend=args.backend)
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


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from training.config import load_train_config
    from training.train import run_training

    cfg = load_train_config(args.config)
    if args.steps:
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"steps": args.steps})})
    trainer, history = run_training(cfg, Path(args.data), Path(args.out), args.resume,
                                    progress=not args.no_progress)
    if trainer.rank == 0 and history:
        last = history[-1]
        val = f", validation perplexity {last['val_perplexity']:.3f}" if (
            "val_perplexity" in last) else ""
        print(f"step {last['step']}: loss {last['loss']:.4f}{val}; weights in {args.out}/final")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from training.convert import load_any_model
    from training.evaluate import evaluate_model
    from training.train import split_shards_or_none

    if args.threads:
        torch.set_num_threads(args.threads)
    shards = [Path(s) for s in args.shards] or split_shards_or_none(Path(args.data or "."))
    if not shards:
        raise UserError("evaluate: give --data BUILD_DIR (with validation/) or --shards FILES")
    model = load_any_model(args.checkpoint, device=_device(args.device))
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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="DeepSpeed ZeRO-3 training (run under torchrun/deepspeed)")
    p.add_argument("--config", required=True, help="training config YAML (config/train/*.yaml)")
    p.add_argument("--data", required=True, help="dataset build directory (with shards/)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, final)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--steps", type=int, default=0, help="override run.steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="validation perplexity with fixed masking")
    p.add_argument("--checkpoint", required=True, help="our checkpoint or a HuggingFace dir")
    p.add_argument("--data", help="dataset build directory (uses validation/)")
    p.add_argument("--shards", nargs="*", default=[], help="cluster shards to evaluate on")
    p.add_argument("--seed", type=int, default=12345, help="masking seed (fixed per report)")
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
        default=1022,
        help="longer sequences are truncated (or windowed with --window); default 1022",
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``esm2-train``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PipelineError as exc:  # UserError and the dataset side's errors
        message = " ".join(str(exc).split())  # always one line
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
