from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from pipeline.generate import _CDF, iter_families, write_families
from pipeline.ingest import ingest


def identity(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    return float((a[:n] == b[:n]).mean())


def test_generator_is_deterministic_and_ingestible(tmp_path: Path) -> None:
    a = write_families(tmp_path / "a.fasta.gz", 2000, seed=7)
    b = write_families(tmp_path / "b.fasta.gz", 2000, seed=7)
    c = write_families(tmp_path / "c.fasta.gz", 2000, seed=8)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    stats = ingest([a], tmp_path / "out")
    assert stats["records_kept"] == 2000 and stats["records_rejected"] == 0
    seqs = pl.read_parquet(tmp_path / "out" / "sequences.parquet")
    assert 150 < seqs.get_column("length").median() < 600


def test_family_structure() -> None:
    members = list(iter_families(3000, seed=1))
    assert len(members) == 3000
    by_sub: dict[tuple[int, int], list[np.ndarray]] = {}
    for fam, sub, _, seq, frag in members:
        if not frag:
            by_sub.setdefault((fam, sub), []).append(seq)
    same_len = [
        identity(s[0], s[1]) for s in by_sub.values() if len(s) > 1 and len(s[0]) == len(s[1])
    ]
    # members of one sub-family are close (UniRef90-like), before indels shift the frame
    assert np.median(same_len) > 0.9
    families = {fam for fam, *_ in members}
    sizes = np.bincount([fam for fam, *_ in members])
    assert len(families) > 300 and (sizes == 1).sum() > 0.3 * len(families)


def test_substitution_model_rows_are_distributions() -> None:
    assert np.allclose(_CDF[:, -1], 1.0)
    assert (np.diff(_CDF, axis=1) >= 0).all()
    # BLOSUM62: I is much more likely to become V than W
    i, v, w = "ARNDCQEGHILKMFPSTWYV".index("I"), 19, 17
    probs = np.diff(np.concatenate([[0.0], _CDF[i]]))
    assert probs[v] > 10 * probs[w]
