"""Training-step and embedding throughput of our ESM-2 vs ``transformers.EsmForMaskedLM`` (CPU).

Training: forward + backward of the MLM loss on the same batches of real sequences (lengths drawn
from ``mmseqs2_examples_db.fasta.gz``, cropped to ``--crop`` residues, 15% masked) for

* ``hf-padded``   — ``EsmForMaskedLM`` (SDPA attention) on right-padded batches,
* ``ours-padded`` — our model on the same padded batches (padding is dropped inside),
* ``ours-packed`` — our model on the same sequences packed into one row (no padding).

Embedding: final-layer hidden states (no grad) of sequences cropped to 1022 residues:
``hf-embed`` (``EsmModel`` = ``EsmForMaskedLM.esm``, padded batches of ``--embed-batch``),
``ours-embed`` (the same batches, packed) and ``ours-embed-zarr`` (``training.embed``: length-sorted
token-budget batches, FASTA in, compressed zarr out, end to end).

Every (variant, round) runs in a fresh subprocess with the same thread count, so each variant's
peak memory (``ru_maxrss``) is its own; variants alternate within a round and the median over
rounds is reported. Throughput counts real residues (not ``<cls>/<eos>``, not padding).

    .venv/bin/python benchmarks/model_step.py --presets 8M 35M --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "mmseqs2_examples_db.fasta.gz"
TRAIN_VARIANTS = ("hf-padded", "ours-padded", "ours-packed")
EMBED_VARIANTS = ("hf-embed", "ours-embed", "ours-embed-zarr")


# ----------------------------------------------------------------------------- data


def load_sequences(path: Path | None) -> tuple[list[str], str]:
    """Real sequences and a description of where they came from."""
    sys.path.insert(0, str(REPO))
    from pipeline.records import read_sequences
    from training.data.reference_sequences import REFERENCE_SEQUENCES

    if path is not None and path.is_file():
        return [seq for _, seq in read_sequences(path)], str(path)
    fallback = "training/data/reference_sequences.py (fallback)"
    return [seq for _, seq in REFERENCE_SEQUENCES], fallback


def make_training_batches(
    sequences: list[str], count: int, batch_size: int, crop: int, seed: int
) -> list[list[tuple[list[int], list[int]]]]:
    """``count`` batches of (token ids, labels): random crops, 15% masked (80/10/10)."""
    from training import alphabet

    rng = random.Random(seed)
    batches = []
    for _ in range(count):
        batch = []
        for seq in rng.choices(sequences, k=batch_size):
            start = rng.randrange(0, max(1, len(seq) - crop + 1))
            tokens = alphabet.encode(seq[start : start + crop])
            labels = [-100] * len(tokens)
            for pos in range(1, len(tokens) - 1):
                if rng.random() < 0.15:
                    labels[pos] = tokens[pos]
                    roll = rng.random()
                    if roll < 0.8:
                        tokens[pos] = alphabet.MASK
                    elif roll < 0.9:
                        tokens[pos] = rng.choice(alphabet.STANDARD_AA_IDS)
            batch.append((tokens, labels))
        batches.append(batch)
    return batches


# ----------------------------------------------------------------------------- workers


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build(preset: str, hf: bool):
    import torch
    import transformers  # noqa: F401  - imported by every variant, so library RSS is equal

    from training.model.convert import config_to_hf
    from training.model.esm2 import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset)
    if hf:
        from transformers import EsmConfig, EsmForMaskedLM

        return EsmForMaskedLM(EsmConfig(**config_to_hf(cfg)))
    return build_model(cfg)


def run_train_worker(spec: dict) -> dict:
    import torch

    from training import alphabet
    from training.model.layout import pack_token_lists

    torch.set_num_threads(spec["threads"])
    variant = spec["variant"]
    model = _build(spec["preset"], hf=variant.startswith("hf")).train()
    rss_model = _rss_mb()

    def step(batch: list[tuple[list[int], list[int]]]) -> None:
        tokens = [t for t, _ in batch]
        if variant == "ours-packed":
            ids, seq_ids = pack_token_lists(tokens)
            labels, _ = pack_token_lists([lab for _, lab in batch])
            labels[seq_ids < 0] = -100
            loss = model(ids, seq_ids=seq_ids, labels=labels)["loss"]
        else:
            ids, mask = alphabet.pad_token_lists(tokens)
            labels = torch.full_like(ids, -100)
            for row, (_, lab) in enumerate(batch):
                labels[row, : len(lab)] = torch.tensor(lab)
            if variant == "hf-padded":
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            else:
                loss = model(ids, attention_mask=mask, labels=labels)["loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)

    batches = spec["batches"]
    for batch in batches[: spec["warmup"]]:
        step(batch)
    residues = 0
    wall = cpu = 0.0
    for batch in batches[spec["warmup"] :]:
        t0, c0 = time.perf_counter(), time.process_time()
        step(batch)
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        residues += sum(len(t) - 2 for t, _ in batch)
    return {
        "residues": residues,
        "seconds": wall,
        "cpu_seconds": cpu,
        "residues_per_cpu_s": residues / cpu,
        "residues_per_s": residues / wall,
        "peak_rss_mb": _rss_mb(),
        "model_rss_mb": rss_model,
    }


def run_embed_worker(spec: dict) -> dict:
    import torch

    from training import alphabet
    from training.model.layout import pack_token_lists

    torch.set_num_threads(spec["threads"])
    variant = spec["variant"]
    model = _build(spec["preset"], hf=variant.startswith("hf")).eval()
    rss_model = _rss_mb()
    sequences = spec["sequences"]
    residues = sum(len(s) for s in sequences)
    t0, c0 = time.perf_counter(), time.process_time()
    if variant == "ours-embed-zarr":
        from training.embed import EmbedOptions, embed_fasta

        with tempfile.TemporaryDirectory() as tmp:
            fasta = Path(tmp) / "in.fasta"
            fasta.write_text("".join(f">s{i}\n{s}\n" for i, s in enumerate(sequences)))
            options = EmbedOptions(tokens_per_batch=spec["embed_tokens"], progress=False)
            embed_fasta(model, fasta, Path(tmp) / "out.zarr", options)
    else:
        size = spec["embed_batch"]
        with torch.inference_mode():
            for i in range(0, len(sequences), size):
                tokens = [alphabet.encode(s) for s in sequences[i : i + size]]
                if variant == "hf-embed":
                    ids, mask = alphabet.pad_token_lists(tokens)
                    model.esm(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
                else:
                    ids, seq_ids = pack_token_lists(tokens)
                    last = model.config.num_layers
                    model.hidden_states(ids, [last], seq_ids=seq_ids)[last].numpy()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return {
        "residues": residues,
        "seconds": wall,
        "cpu_seconds": cpu,
        "residues_per_s": residues / wall,
        "residues_per_cpu_s": residues / cpu,
        "peak_rss_mb": _rss_mb(),
        "model_rss_mb": rss_model,
    }


# ----------------------------------------------------------------------------- driver


def run_in_subprocess(spec: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(spec, handle)
    try:
        result = subprocess.run(
            [sys.executable, __file__, "--worker", handle.name],
            capture_output=True,
            text=True,
            check=False,
            cwd=REPO,
        )
    finally:
        os.unlink(handle.name)
    if result.returncode != 0:
        raise RuntimeError(f"worker {spec['variant']} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    return {
        "residues_per_s": statistics.median(r["residues_per_s"] for r in runs),
        "best_residues_per_s": max(r["residues_per_s"] for r in runs),
        "residues_per_cpu_s": statistics.median(r["residues_per_cpu_s"] for r in runs),
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        "model_rss_mb": statistics.median(r["model_rss_mb"] for r in runs),
        "step_mb": statistics.median(r["peak_rss_mb"] - r["model_rss_mb"] for r in runs),
        "rounds": [round(r["residues_per_s"], 1) for r in runs],
    }


def print_table(title: str, rows: dict[str, dict], baseline: str) -> None:
    base = rows[baseline]
    print(f"\n{title}")
    print(
        f"| variant | residues/s median | vs {baseline} | best round | vs {baseline} "
        f"| residues/CPU-s | vs {baseline} | peak RSS MB | vs {baseline} "
        f"| peak - RSS after build, MB | per round (residues/s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, row in rows.items():
        cells = []
        for key in ("residues_per_s", "best_residues_per_s", "residues_per_cpu_s"):
            cells.append(f"{row[key]:.0f} | {row[key] / base[key]:.2f}x")
        print(
            f"| {name} | {' | '.join(cells)} "
            f"| {row['peak_rss_mb']:.0f} | {row['peak_rss_mb'] / base['peak_rss_mb']:.2f}x "
            f"| {row['step_mb']:.0f} | {row['rounds']} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["8M", "35M"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per training batch")
    parser.add_argument("--crop", type=int, default=512, help="training crop (residues)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3, help="runs per variant (median)")
    parser.add_argument("--embed-sequences", type=int, default=48)
    parser.add_argument("--embed-batch", type=int, default=8, help="HF embedding batch size")
    parser.add_argument("--embed-tokens", type=int, default=8192, help="our embed token budget")
    parser.add_argument("--no-embed", action="store_true", help="skip the embedding benchmark")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        runner = run_train_worker if spec["kind"] == "train" else run_embed_worker
        print(json.dumps(runner(spec)))
        return 0

    import torch
    import transformers

    sequences, source = load_sequences(args.data)
    batches = make_training_batches(
        sequences, args.warmup + args.steps, args.batch_size, args.crop, args.seed
    )
    rng = random.Random(args.seed + 1)
    embed_sequences = [s[:1022] for s in rng.choices(sequences, k=args.embed_sequences)]
    padded = sum(len(b) * max(len(t) for t, _ in b) for b in batches)
    real = sum(len(t) for b in batches for t, _ in b)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"threads {args.threads}, cpu_count {os.cpu_count()}, load {os.getloadavg()}"
    )
    print(
        f"data: {source} ({len(sequences)} sequences); training batches of {args.batch_size} "
        f"crops <= {args.crop} residues, {args.warmup}+{args.steps} steps, {args.rounds} rounds; "
        f"padding is {1 - real / padded:.1%} of padded-batch tokens"
    )
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "train": {}, "embed": {}}
    for preset in args.presets:
        runs: dict[str, list[dict]] = {v: [] for v in TRAIN_VARIANTS}
        for _ in range(args.rounds):
            for variant in TRAIN_VARIANTS:
                spec = {
                    "kind": "train", "preset": preset, "variant": variant,
                    "threads": args.threads, "batches": batches, "warmup": args.warmup,
                }  # fmt: skip
                runs[variant].append(run_in_subprocess(spec))
        rows = {v: summarise(r) for v, r in runs.items()}
        results["train"][preset] = rows
        print_table(f"training step (forward+backward), {preset}", rows, "hf-padded")
        if args.no_embed:
            continue
        runs = {v: [] for v in EMBED_VARIANTS}
        for _ in range(args.rounds):
            for variant in EMBED_VARIANTS:
                spec = {
                    "kind": "embed", "preset": preset, "variant": variant,
                    "threads": args.threads, "sequences": embed_sequences,
                    "embed_batch": args.embed_batch, "embed_tokens": args.embed_tokens,
                }  # fmt: skip
                runs[variant].append(run_in_subprocess(spec))
        rows = {v: summarise(r) for v, r in runs.items()}
        results["embed"][preset] = rows
        print_table(f"embedding (last layer, no grad), {preset}", rows, "hf-embed")
    print(f"\nload average at the end: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
