"""Per-residue and mean-pooled ESM-2 embeddings of a FASTA file, written to a zarr v3 store.

Store layout (``N`` sequences, ``R`` embedded residues in all, ``H`` hidden size)::

    ids                    [N] str      record ids (first word of the header), FASTA order
    lengths                [N] int64    residues in the FASTA record
    embedded_lengths       [N] int64    rows of sequence i in per_residue (< lengths[i] when
                                        the sequence was truncated to max_residues)
    offsets                [N+1] int64  sequence i is per_residue[offsets[i]:offsets[i+1]]
    layer_<L>/per_residue  [R, H] float32, ragged: sequences concatenated, no <cls>/<eos>
    layer_<L>/mean         [N, H] float32, mean over the embedded residues
    attrs                  layers, model config, truncation / window counts, sources

Layer numbers: 0 = embedding output, ``i`` = block ``i``, ``num_layers`` = after the final
LayerNorm (what ESM and HF call the last hidden state); negative numbers count from the end, so
``-1`` is the last layer. Sequences over ``max_residues`` (ESM-2's limit,
:data:`training.model.config.MAX_RESIDUES`) are truncated to their first ``max_residues``, or
with ``window`` embedded as overlapping windows whose per-residue values are averaged. Batches
are formed by a token budget over sequences sorted by length (within blocks of bounded memory)
and run packed (no padding). Arrays are compressed
with Blosc/zstd; the store is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from tqdm import tqdm

from pipeline.atomic import atomic_dir
from pipeline.records import read_sequences
from training.alphabet import CLS, EOS, encode
from training.data.sampler import greedy_batches
from training.errors import UserError
from training.model.config import MAX_RESIDUES
from training.model.esm2 import ESM2
from training.model.layout import pack_token_lists

FORMAT = "esm2-pretrain.embeddings"
CHUNK_BYTES = 4 << 20
BLOCK_BYTES = 64 << 20


class EmbedError(UserError, ValueError):
    """Embedding options that cannot work."""


@dataclass
class EmbedOptions:
    """What to embed and how to batch it."""

    layers: Sequence[int] = (-1,)
    max_residues: int = MAX_RESIDUES
    window: int | None = None
    window_overlap: int | None = None  # default: window // 2
    tokens_per_batch: int = 8192
    block_bytes: int = BLOCK_BYTES  # memory for buffered per-residue values, per layer
    progress: bool = True


@dataclass
class EmbedSummary:
    """What ``embed_fasta`` wrote."""

    path: Path
    num_sequences: int
    total_residues: int
    layers: list[int]
    truncated: int
    windowed: int
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Piece:
    record: int  # index in the block
    start: int  # first residue of the piece in the sequence
    residues: str


def resolve_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """Absolute layer numbers (0..num_layers) for possibly negative ones, duplicates dropped."""
    resolved: list[int] = []
    for layer in layers:
        absolute = layer + num_layers + 1 if layer < 0 else layer
        if not 0 <= absolute <= num_layers:
            raise EmbedError(
                f"layer {layer} does not exist: the model has layers 0..{num_layers} "
                f"(or -{num_layers + 1}..-1)"
            )
        if absolute not in resolved:
            resolved.append(absolute)
    if not resolved:
        raise EmbedError("no layers to embed")
    return resolved


def window_starts(length: int, window: int, overlap: int) -> list[int]:
    """Starts of windows of ``window`` residues, ``overlap`` apart, covering ``length``."""
    if length <= window:
        return [0]
    stride = window - overlap
    starts = list(range(0, length - window, stride))
    starts.append(length - window)
    return starts


def _check_options(options: EmbedOptions) -> tuple[int | None, int]:
    if options.max_residues < 1:
        raise EmbedError("max_residues must be at least 1")
    if options.tokens_per_batch < 3:
        raise EmbedError("tokens_per_batch must be at least 3")
    if options.window is None:
        if options.window_overlap is not None:
            raise EmbedError("a window overlap needs a window (--window)")
        return None, 0
    window = options.window
    overlap = window // 2 if options.window_overlap is None else options.window_overlap
    if not 1 <= window <= options.max_residues:
        raise EmbedError(f"window must be between 1 and {options.max_residues}, got {window}")
    if not 0 <= overlap < window:
        raise EmbedError(f"window overlap must be in [0, {window}), got {overlap}")
    return window, overlap


def _pieces(
    sequence: str, record: int, options: EmbedOptions, window: int | None, overlap: int
) -> list[_Piece]:
    if len(sequence) <= options.max_residues:
        return [_Piece(record, 0, sequence)]
    if window is None:
        return [_Piece(record, 0, sequence[: options.max_residues])]
    return [
        _Piece(record, s, sequence[s : s + window])
        for s in window_starts(len(sequence), window, overlap)
    ]


def _batches(pieces: list[_Piece], tokens_per_batch: int) -> Iterator[list[_Piece]]:
    """Pieces sorted longest first, grouped while the (packed) batch stays within the budget."""
    order = sorted(pieces, key=lambda p: -len(p.residues))
    for batch in greedy_batches([len(p.residues) + 2 for p in order], tokens_per_batch, True):
        yield [order[i] for i in batch]


@torch.inference_mode()
def _run_batch(model: ESM2, batch: list[_Piece], layers: list[int]) -> list[dict[int, np.ndarray]]:
    """Per piece: {layer: [residues, H] float32} (without <cls>/<eos>)."""
    token_lists = [encode(p.residues) for p in batch]
    for toks, piece in zip(token_lists, batch, strict=True):
        if len(toks) != len(piece.residues) + 2 or toks[0] != CLS or toks[-1] != EOS:
            raise EmbedError(f"cannot tokenise a piece of record {piece.record}")
    device = next(model.parameters()).device
    input_ids, seq_ids = pack_token_lists(token_lists)
    input_ids, seq_ids = input_ids.to(device), seq_ids.to(device)
    layout = model.layout(input_ids, seq_ids=seq_ids)
    _, kept = model.run(input_ids, layout, layers)
    host = {layer: kept[layer].float().cpu().numpy() for layer in layers}
    bounds = layout.cu_seqlens.tolist()
    return [
        {layer: host[layer][bounds[i] + 1 : bounds[i + 1] - 1] for layer in layers}
        for i in range(len(batch))
    ]


def embed_fasta(
    model: ESM2,
    fasta: str | os.PathLike[str],
    out: str | os.PathLike[str],
    options: EmbedOptions | None = None,
    *,
    overwrite: bool = False,
    source: str | None = None,
) -> EmbedSummary:
    """Embed every record of ``fasta`` with ``model`` into the zarr store ``out``."""
    options = options or EmbedOptions()
    window, overlap = _check_options(options)
    cfg = model.config
    layers = resolve_layers(options.layers, cfg.num_layers)
    hidden = cfg.hidden_size

    ids: list[str] = []
    lengths: list[int] = []
    for record_id, sequence in read_sequences(fasta):
        ids.append(record_id)
        lengths.append(len(sequence))
    if not ids:
        raise EmbedError(f"{fasta} has no FASTA records")
    lengths_arr = np.asarray(lengths, dtype=np.int64)
    long = lengths_arr > options.max_residues
    embedded = np.where(long & (window is None), options.max_residues, lengths_arr).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(embedded)]).astype(np.int64)
    total = int(offsets[-1])
    truncated = int(long.sum()) if window is None else 0
    windowed = int(long.sum()) if window is not None else 0

    attrs: dict[str, Any] = {
        "format": FORMAT,
        "version": 1,
        "layers": layers,
        "num_layers": cfg.num_layers,
        "hidden_size": hidden,
        "num_sequences": len(ids),
        "total_residues": total,
        "max_residues": options.max_residues,
        "truncated_sequences": truncated,
        "windowed_sequences": windowed,
        "window": window,
        "window_overlap": overlap if window is not None else None,
        "pooling": "mean over the embedded residues (<cls> and <eos> excluded)",
        "fasta": str(Path(fasta).resolve()),
        "checkpoint": source,
        "model": cfg.to_dict(),
    }
    model.eval()
    chunk_rows = max(64, CHUNK_BYTES // (4 * hidden))
    block_rows = max(1, options.block_bytes // (4 * hidden))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        compressor = zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
        id_array = root.create_array(
            "ids", shape=(len(ids),), dtype=str, chunks=(min(len(ids), 65536),)
        )
        id_array[:] = np.asarray(ids)
        for name, values in (("lengths", lengths_arr), ("embedded_lengths", embedded),
                             ("offsets", offsets)):
            arr = root.create_array(
                name, shape=values.shape, dtype="int64", chunks=(min(len(values), 65536),)
            )
            arr[:] = values
        residue_arrays, mean_arrays = {}, {}
        for layer in layers:
            group = root.create_group(f"layer_{layer}")
            residue_arrays[layer] = group.create_array(
                "per_residue",
                shape=(total, hidden),
                dtype="float32",
                chunks=(min(max(total, 1), chunk_rows), hidden),
                compressors=compressor,
            )
            mean_arrays[layer] = group.create_array(
                "mean",
                shape=(len(ids), hidden),
                dtype="float32",
                chunks=(min(len(ids), chunk_rows), hidden),
                compressors=compressor,
            )
        with tqdm(total=total, unit="res", desc="embed", disable=not options.progress) as bar:
            for first, sequences in _blocks(read_sequences(fasta), embedded, block_rows):
                _embed_block(
                    model, sequences, first, offsets, layers, options, window, overlap,
                    residue_arrays, mean_arrays,
                )  # fmt: skip
                bar.update(int(offsets[first + len(sequences)] - offsets[first]))
        root.attrs.update(attrs)
    return EmbedSummary(Path(out), len(ids), total, layers, truncated, windowed, attrs)


def _blocks(
    records: Iterator[tuple[str, str]], embedded: np.ndarray, block_rows: int
) -> Iterator[tuple[int, list[str]]]:
    """Consecutive records whose embedded residues fit ``block_rows`` (at least one each)."""
    first, rows = 0, 0
    block: list[str] = []
    for index, (_, sequence) in enumerate(records):
        size = int(embedded[index])
        if block and rows + size > block_rows:
            yield first, block
            first, rows, block = index, 0, []
        block.append(sequence)
        rows += size
    if block:
        yield first, block


def _embed_block(
    model: ESM2,
    sequences: list[str],
    first: int,
    offsets: np.ndarray,
    layers: list[int],
    options: EmbedOptions,
    window: int | None,
    overlap: int,
    residue_arrays: dict[int, Any],
    mean_arrays: dict[int, Any],
) -> None:
    base = int(offsets[first])
    rows = int(offsets[first + len(sequences)]) - base
    hidden = model.config.hidden_size
    sums = {layer: np.zeros((rows, hidden), dtype=np.float32) for layer in layers}
    counts = np.zeros(rows, dtype=np.float32)
    pieces = [
        piece
        for record, sequence in enumerate(sequences)
        for piece in _pieces(sequence, record, options, window, overlap)
    ]
    for batch in _batches(pieces, options.tokens_per_batch):
        for piece, values in zip(batch, _run_batch(model, batch, layers), strict=True):
            start = int(offsets[first + piece.record]) - base + piece.start
            stop = start + len(piece.residues)
            counts[start:stop] += 1
            for layer in layers:
                sums[layer][start:stop] += values[layer]
    if counts.max() > 1:  # overlapping windows: average
        for layer in layers:
            sums[layer] /= counts[:, None]
    for layer in layers:
        residue_arrays[layer][base : base + rows] = sums[layer]
        means = np.stack(
            [
                sums[layer][offsets[first + i] - base : offsets[first + i + 1] - base].mean(0)
                for i in range(len(sequences))
            ]
        )
        mean_arrays[layer][first : first + len(sequences)] = means
