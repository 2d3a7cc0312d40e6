"""Deterministic synthetic protein families for scale tests and benchmarks.

Families are evolved from random seed sequences along a two-level tree: each family root gives
rise to sub-family ancestors at moderate divergence (typically 45-80% identity to the root), and
each ancestor to members at low divergence (typically > 90% identity), so that MMseqs2 at 90% and
50% identity recovers a UniRef-like hierarchy. Substitutions follow BLOSUM62 target frequencies,
short indels and N/C-terminal fragments add length variation, and root lengths follow a
log-normal close to UniProtKB's (median ~ 300). Output is UniProtKB-style FASTA (gzip).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from isal import igzip

from pipeline.atomic import atomic_path
from pipeline.progress import progress_bar

AMINO = "ARNDCQEGHILKMFPSTWYV"
# UniProtKB background frequencies (%), in AMINO order.
BACKGROUND = np.array(
    [8.25, 5.53, 4.06, 5.45, 1.37, 3.93, 6.75, 7.07, 2.27, 5.96,
     9.66, 5.84, 2.42, 3.86, 4.70, 6.56, 5.34, 1.08, 2.92, 6.87]
)
BLOSUM62 = np.array([
    [4, -1, -2, -2, 0, -1, -1, 0, -2, -1, -1, -1, -1, -2, -1, 1, 0, -3, -2, 0],
    [-1, 5, 0, -2, -3, 1, 0, -2, 0, -3, -2, 2, -1, -3, -2, -1, -1, -3, -2, -3],
    [-2, 0, 6, 1, -3, 0, 0, 0, 1, -3, -3, 0, -2, -3, -2, 1, 0, -4, -2, -3],
    [-2, -2, 1, 6, -3, 0, 2, -1, -1, -3, -4, -1, -3, -3, -1, 0, -1, -4, -3, -3],
    [0, -3, -3, -3, 9, -3, -4, -3, -3, -1, -1, -3, -1, -2, -3, -1, -1, -2, -2, -1],
    [-1, 1, 0, 0, -3, 5, 2, -2, 0, -3, -2, 1, 0, -3, -1, 0, -1, -2, -1, -2],
    [-1, 0, 0, 2, -4, 2, 5, -2, 0, -3, -3, 1, -2, -3, -1, 0, -1, -3, -2, -2],
    [0, -2, 0, -1, -3, -2, -2, 6, -2, -4, -4, -2, -3, -3, -2, 0, -2, -2, -3, -3],
    [-2, 0, 1, -1, -3, 0, 0, -2, 8, -3, -3, -1, -2, -1, -2, -1, -2, -2, 2, -3],
    [-1, -3, -3, -3, -1, -3, -3, -4, -3, 4, 2, -3, 1, 0, -3, -2, -1, -3, -1, 3],
    [-1, -2, -3, -4, -1, -2, -3, -4, -3, 2, 4, -2, 2, 0, -3, -2, -1, -2, -1, 1],
    [-1, 2, 0, -1, -3, 1, 1, -2, -1, -3, -2, 5, -1, -3, -1, 0, -1, -3, -2, -2],
    [-1, -1, -2, -3, -1, 0, -2, -3, -2, 1, 2, -1, 5, 0, -2, -1, -1, -1, -1, 1],
    [-2, -3, -3, -3, -2, -3, -3, -3, -1, 0, 0, -3, 0, 6, -4, -2, -2, 1, 3, -1],
    [-1, -2, -2, -1, -3, -1, -1, -2, -2, -3, -3, -1, -2, -4, 7, -1, -1, -4, -3, -2],
    [1, -1, 1, 0, -1, 0, 0, 0, -1, -2, -2, 0, -1, -2, -1, 4, 1, -3, -2, -2],
    [0, -1, 0, -1, -1, -1, -1, -2, -2, -1, -1, -1, -1, -2, -1, 1, 5, -2, -2, 0],
    [-3, -3, -4, -4, -2, -2, -3, -2, -2, -3, -2, -3, -1, 1, -4, -3, -2, 11, 2, -3],
    [-2, -2, -2, -3, -2, -1, -2, -3, 2, -1, -1, -2, -1, 3, -3, -2, -2, 2, 7, -1],
    [0, -3, -3, -3, -1, -2, -2, -3, -3, 3, 1, -2, 1, -1, -2, -2, 0, -3, -1, 4],
])
_LAMBDA = np.log(2) / 2  # BLOSUM62 is in half-bit units
_ALPHABET = np.frombuffer(AMINO.encode(), np.uint8)


def _substitution_cdf() -> np.ndarray:
    """Row a: cumulative P(b | a substituted), b != a, from BLOSUM62 target frequencies."""
    p = BACKGROUND / BACKGROUND.sum()
    q = p[:, None] * p[None, :] * np.exp(_LAMBDA * BLOSUM62)
    np.fill_diagonal(q, 0.0)
    q /= q.sum(axis=1, keepdims=True)
    return np.cumsum(q, axis=1)


_CDF = _substitution_cdf()
_P = BACKGROUND / BACKGROUND.sum()


def _random_sequence(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice(20, size=n, p=_P).astype(np.int8)


def _mutate(rng: np.random.Generator, seq: np.ndarray, subs_per_site: float) -> np.ndarray:
    """Substitutions (Poisson per site, BLOSUM62-conditioned) and short indels."""
    p_changed = 1.0 - np.exp(-subs_per_site)
    hit = rng.random(seq.shape[0]) < p_changed
    if hit.any():
        u = rng.random(int(hit.sum()))
        cdf = _CDF[seq[hit]]
        seq = seq.copy()
        seq[hit] = np.minimum((cdf < u[:, None]).sum(axis=1), 19)
    n_indels = rng.poisson(0.08 * subs_per_site * seq.shape[0] / 10)
    for _ in range(int(n_indels)):
        pos = int(rng.integers(0, max(seq.shape[0], 1)))
        size = int(rng.geometric(0.35))
        if rng.random() < 0.5 and seq.shape[0] > size + 20:
            seq = np.concatenate([seq[:pos], seq[pos + size :]])
        else:
            seq = np.concatenate([seq[:pos], _random_sequence(rng, size), seq[pos:]])
    return seq


def _fragment(rng: np.random.Generator, seq: np.ndarray) -> np.ndarray:
    keep = int(seq.shape[0] * rng.uniform(0.5, 0.95))
    start = int(rng.integers(0, seq.shape[0] - keep + 1))
    return seq[start : start + keep]


def iter_families(
    n_sequences: int, seed: int = 0, zipf_a: float = 2.0
) -> Iterator[tuple[int, int, int, np.ndarray, bool]]:
    """Yield ``(family, subfamily, member, residues, is_fragment)`` until ``n_sequences``.

    Family sizes are Zipf-distributed (exponent ``zipf_a``, at most 2,000), as UniRef50 cluster
    sizes are: mostly singletons and small families, with a heavy tail.
    """
    rng = np.random.default_rng(seed)
    produced = family = 0
    while produced < n_sequences:
        size = int(min(rng.zipf(zipf_a), 2000, n_sequences - produced))
        length = int(np.clip(rng.lognormal(np.log(300), 0.55), 30, 4000))
        root = _random_sequence(rng, length)
        member = 0
        sub = 0
        while member < size:
            ancestor = _mutate(rng, root, rng.uniform(0.25, 0.75)) if sub else root
            sub_size = min(size - member, 1 + int(rng.geometric(0.3)))
            for _ in range(sub_size):
                seq = _mutate(rng, ancestor, rng.uniform(0.0, 0.07))
                frag = rng.random() < 0.08
                if frag:
                    seq = _fragment(rng, seq)
                yield family, sub, member, seq, frag
                member += 1
            sub += 1
        produced += size
        family += 1


def _maybe_gzip(sink: io.BufferedWriter, gz: bool, level: int) -> io.BufferedIOBase:
    """A buffered writer on ``sink``, gzip-compressed with a fixed header (no name, mtime 0)."""
    if not gz:
        return io.BufferedWriter(sink, 1 << 20)
    return igzip.IGzipFile(filename="", mode="wb", compresslevel=level, fileobj=sink, mtime=0)


def write_families(
    out: str | os.PathLike[str], n_sequences: int, seed: int = 0, compresslevel: int = 1
) -> Path:
    """Write ``n_sequences`` synthetic family members as UniProtKB-style FASTA (.gz if named so)."""
    path = Path(out)
    with atomic_path(path) as tmp, progress_bar(
        total=n_sequences, desc=f"generate {path.name}", unit=" seq", unit_scale=True
    ) as bar, open(tmp, "wb") as sink, _maybe_gzip(sink, path.suffix == ".gz", compresslevel) as fh:
        for i, (fam, sub, mem, seq, frag) in enumerate(iter_families(n_sequences, seed)):
            acc = f"S{i:09d}"
            name = "Synthetic family protein" + (" (Fragment)" if frag else "")
            header = (
                f">tr|{acc}|{acc}_SYNTH {name} OS=Synthetica familiaris OX=32630 "
                f"GN=fam{fam}.{sub}.{mem} PE=4 SV=1\n"
            )
            residues = _ALPHABET[seq].tobytes()
            body = b"\n".join(residues[j : j + 60] for j in range(0, len(residues), 60))
            fh.write(header.encode() + body + b"\n")
            bar.update(1)
    return path
