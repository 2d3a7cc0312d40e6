"""``esm2-data``: one subcommand per dataset-build stage."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

# numpy's OpenBLAS starts a thread per CPU when it loads, and they spin (0.1-0.2 CPU-s seen on
# 2 CPUs, taken from the parse workers); no esm2-data stage does linear algebra with numpy. A
# value the user set wins; it must be set before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.config import BuildConfig

Handler = Callable[[argparse.Namespace], int]
_HANDLERS: dict[str, Handler] = {}


def _command(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _HANDLERS[name] = fn
        return fn

    return register


def _config(args: argparse.Namespace) -> BuildConfig:
    from pipeline.config import load_config  # its validators load only where a config is read

    cfg = load_config(args.config)
    threads = getattr(args, "threads", None)
    if threads:  # e.g. Snakemake's {threads}; outputs do not depend on it
        cfg = cfg.model_copy(update={"threads": threads})
    return cfg


def _run(name: str, args: argparse.Namespace, lock: str | None = None, **options: object) -> dict:
    from pipeline.stages import run_stage

    return run_stage(name, _config(args), lock, **options)


@_command("download")
def _download(args: argparse.Namespace) -> int:
    for item in _run("download", args)["inputs"]:
        print(f"{item['path']}\t{item['size']} bytes\tsha256 {item['sha256']}")
    return 0


def _settle() -> None:
    """Put what the process holds now out of the garbage collector's sight: its collections,
    and the one at exit, no longer walk it. Once a command's modules are imported (they live
    as long as the process: the ingest benchmark's process ended 0.03-0.08 s sooner), and once
    the command is done (its objects, and the modules loaded while it ran, only wait for the
    process to end: the last 0.067 s before exit became 0.015 s)."""
    gc.freeze()


@_command("ingest")
def _ingest(args: argparse.Namespace) -> int:
    from pipeline.ingest import ingest

    _settle()

    if (args.part is not None or args.merge) and not args.config:
        raise PipelineError("ingest: --part and --merge need --config")
    if args.part is not None and args.merge:
        raise PipelineError("ingest: give --part or --merge, not both")
    if args.config and args.part is not None and not args.inputs:
        info = _run("ingest", args, lock=f"ingest-part-{args.part}", part=args.part,
                    worker_kind=args.worker_kind)
        print(f"ingest part {args.part}: {info['input']['records']} records of "
              f"{info['input']['file']} in {info['partitions']} partitions")
        return 0
    if args.config and not args.inputs:
        stats = _run("ingest", args, merge=args.merge, worker_kind=args.worker_kind)
        out = Path(_config(args).out_dir)
    elif args.inputs and args.out and not args.config:
        stats = ingest(args.inputs, args.out, on_error=args.on_error or "fail",
                       workers=args.threads or 0, worker_kind=args.worker_kind)
        out = args.out
    else:
        raise PipelineError("ingest: give either --config, or FASTA files and --out")
    print(
        f"ingested {stats['records_kept']} records ({stats['records_rejected']} rejected) -> "
        f"{stats['unique_sequences']} unique sequences in {Path(out) / 'sequences.parquet'}"
    )
    _settle()
    return 0


@_command("export-table")
def _export_table(args: argparse.Namespace) -> int:
    from pipeline.export import export_table

    cfg = _config(args)
    rows = export_table(cfg.out_dir, args.split, args.out, args.format, bool(cfg.decontaminate))
    print(f"{args.split}: {rows} UniRef90 clusters (ur50_id, ur90_id, sequence) -> {args.out}")
    return 0


@_command("cluster")
def _cluster(args: argparse.Namespace) -> int:
    stats = _run("cluster", args)
    print(
        f"{stats['records']} records, {stats['sequences']} distinct sequences -> "
        f"{stats['uniref90']['clusters']} UniRef90 / {stats['uniref50']['clusters']} UniRef50 "
        "clusters"
    )
    return 0


@_command("split")
def _split(args: argparse.Namespace) -> int:
    for name, row in _run("split", args)["splits"].items():
        print(f"{name:<6} {row['uniref50_clusters']:>9} UniRef50 {row['sequences']:>11} sequences")
    return 0


@_command("check-leakage")
def _check_leakage(args: argparse.Namespace) -> int:
    report = _run("check-leakage", args)
    print(
        f"leakage: {report['at_or_above_threshold']} of {report['queries']} held-out sequences "
        f"({report['fraction_at_or_above_threshold']:.2%}) have a train hit >= "
        f"{report['identity_threshold']:.0%} identity (limit {report['max_fraction']:.2%})"
    )
    return 0


@_command("decontaminate")
def _decontaminate(args: argparse.Namespace) -> int:
    stats = _run("decontaminate", args)
    for name, row in stats["sets"].items():
        print(f"{name}: {row['sequences_with_hit']} of {row['sequences']} sequences hit train; "
              f"{row['excluded']['uniref50_clusters']} UniRef50 clusters "
              f"({row['excluded']['sequences']} records) leave train")
    total = stats["excluded"]
    print(f"excluded from train: {total['groups']} split groups, {total['uniref50_clusters']} "
          f"UniRef50 clusters, {total['sequences']} records, {total['residues']} residues")
    return 0


@_command("shards")
def _shards(args: argparse.Namespace) -> int:
    for name, row in _run("shards", args).items():
        print(f"{name:<6} {row['samples']:>9} clusters in {row['shards']} shards, "
              f"{row['bytes']} bytes")
    return 0


@_command("validation")
def _validation(args: argparse.Namespace) -> int:
    if args.regenerate:
        from pipeline.regenerate import regenerate_validation

        work, problems = regenerate_validation(args.regenerate, args.workdir, args.keep)
        for line in problems:
            print(f"DIFFERS {line}", file=sys.stderr)
        if problems:
            raise PipelineError(f"validation set differs from {args.regenerate} "
                                f"({len(problems)} files); regenerated files kept in {work}")
        print(f"validation set regenerated from {args.regenerate}: every sha256 matches")
        return 0
    if not args.config:
        raise PipelineError("validation: give --config, or --regenerate MANIFEST")
    summary = _run("validation", args)
    print(f"validation: {summary['sequences']} UniRef50 representatives "
          f"(of {summary['valid_clusters_available']} valid clusters)")
    return 0


@_command("manifest")
def _manifest(args: argparse.Namespace) -> int:
    from pipeline.manifest import write_manifest

    print(write_manifest(_config(args), args.out))
    return 0


@_command("verify")
def _verify(args: argparse.Namespace) -> int:
    from pipeline.manifest import verify

    problems = verify(args.manifest, args.out_dir)
    for line in problems:
        print(f"DIFFERS {line}", file=sys.stderr)
    if problems:
        raise PipelineError(f"{args.manifest}: {len(problems)} difference(s) found")
    print(f"{args.manifest}: every output matches")
    return 0


@_command("stats")
def _stats(args: argparse.Namespace) -> int:
    from pipeline.manifest import load_manifest, summary

    print(summary(load_manifest(args.manifest)))
    return 0


@_command("mmseqs-version")
def _mmseqs_version(args: argparse.Namespace) -> int:
    from pipeline.mmseqs import find_mmseqs, mmseqs_version

    binary = find_mmseqs(args.mmseqs)
    print(f"{binary}\t{mmseqs_version(binary)}")
    return 0


@_command("generate")
def _generate(args: argparse.Namespace) -> int:
    from pipeline.generate import write_families

    path = write_families(args.out, args.n, seed=args.seed)
    print(f"{path}: {args.n} synthetic family sequences (seed {args.seed})")
    return 0


@_command("show-config")
def _show_config(args: argparse.Namespace) -> int:
    from pipeline.config import config_to_dict

    print(json.dumps(config_to_dict(_config(args)), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="esm2-data", description="Build a UniProt/UniRef pretraining dataset for ESM-2."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("download", help="fetch the release files (resumable, checksum-verified)")
    p.add_argument("--config", required=True, help="build config YAML")

    p = sub.add_parser("ingest", help="FASTA -> sequences.parquet + records.parquet + stats")
    p.add_argument("--config", help="build config YAML (reads <out_dir>/raw/*)")
    p.add_argument("inputs", nargs="*", type=Path, help="FASTA files (plain or .gz)")
    p.add_argument("--out", type=Path, help="output directory (without --config)")
    p.add_argument("--on-error", choices=["fail", "skip"], help="override ingest.on_error")
    p.add_argument("--part", type=int, metavar="I",
                   help="parse only input I into <out_dir>/ingest_parts/I (one job per input)")
    p.add_argument("--merge", action="store_true",
                   help="finish the ingest from every input's --part directory")
    p.add_argument("--threads", type=int, help="parse workers (default: the config's threads; "
                   "without --config, one per CPU)")
    p.add_argument("--worker-kind", choices=["auto", "thread", "process"], default="auto",
                   help="parse in threads or spawned processes (auto: threads up to 4 workers)")

    for name, text in (
        ("cluster", "MMseqs2 UniRef90 then UniRef50 clustering -> clusters.parquet"),
        ("split", "assign whole UniRef50 clusters to train/valid/test -> splits.parquet"),
        ("check-leakage", "search valid/test against train; fail above the configured bound"),
        ("decontaminate", "move train groups hit by the evaluation sets out of train -> "
                          "decontamination.parquet"),
        ("shards", "WebDataset shards, one sample per UniRef50 cluster -> shards/<split>/"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=True, help="build config YAML")
        p.add_argument("--threads", type=int, help="override the config's threads")

    p = sub.add_parser("validation", help="the fixed validation set -> validation/")
    p.add_argument("--config", help="build config YAML")
    p.add_argument("--regenerate", metavar="MANIFEST",
                   help="rebuild the set from a manifest's inputs and config and check sha256s")
    p.add_argument("--workdir", type=Path, help="where --regenerate builds (default: beside "
                   "the build's out_dir)")
    p.add_argument("--keep", action="store_true", help="keep the --regenerate work directory")

    p = sub.add_parser("manifest", help="write data_manifests/<build>.json for a finished build")
    p.add_argument("--config", required=True, help="build config YAML")
    p.add_argument("--out", type=Path, help="manifest path (default: <manifest_dir>/<build>.json)")

    p = sub.add_parser("verify", help="re-hash a build against its manifest")
    p.add_argument("manifest", type=Path)
    p.add_argument("--out-dir", type=Path, help="build directory (default: the manifest's)")

    p = sub.add_parser("stats", help="readable summary of a manifest")
    p.add_argument("manifest", type=Path)

    p = sub.add_parser("export-table", help="one split as (ur50_id, ur90_id, sequence) rows "
                       "(BioNeMo's ESM-2 table, HF datasets)")
    p.add_argument("--config", required=True, help="build config YAML")
    p.add_argument("--split", required=True, choices=["train", "valid", "test"])
    p.add_argument("--format", default="parquet", choices=["parquet", "tsv"])
    p.add_argument("--out", required=True, type=Path, help="output file")

    p = sub.add_parser("mmseqs-version", help="print the MMseqs2 binary in use and its version")
    p.add_argument("--mmseqs", help="explicit path to the binary")

    p = sub.add_parser("generate", help="write synthetic protein families (benchmarks)")
    p.add_argument("--n", type=int, required=True, help="number of sequences")
    p.add_argument("--out", type=Path, required=True, help="output FASTA (.gz compresses)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("show-config", help="print the resolved config (defaults filled in)")
    p.add_argument("--config", required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return _HANDLERS[args.command](args)
    except PipelineError as err:
        sys.stdout.flush()  # the error stays the last line of a log that holds both streams
        print(f"esm2-data: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("esm2-data: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`esm2-data show-config ... | head`)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
