"""Split pins: IDs whose UniRef50 clusters must go to a given split (or be excluded).

Two sources, both read by the split stage: ``split.pins``, an (id, split) table (a previous
build's splits.parquet, or a TSV), and ``split.pin_lists``, files of IDs that all go to one
split (e.g. the UniRef50 clusters ESM-2 held out). An ID is one of this build's UniRef50 IDs, a
UniProtKB accession (its cluster), or a UniRef50/90/100 ID from elsewhere, which names its
representative's accession (``UniRef50_P12345`` -> the cluster holding P12345 here).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from pipeline.build_dir import EXCLUDED, SPLITS
from pipeline.config import PinList
from pipeline.errors import PipelineError

PIN_SPLITS = (*SPLITS, EXCLUDED)


def read_pins(path: str | Path) -> pl.DataFrame:
    """An (id, split) table from a previous build's splits.parquet or a two-column TSV."""
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"{p}: split pins file not found")
    if p.suffix == ".parquet":
        df = pl.read_parquet(p)
        if df.columns[:1] == ["rep50"]:
            df = df.rename({"rep50": "id"})
    else:
        df = pl.read_csv(p, separator="\t", has_header=False, new_columns=["id", "split"],
                         comment_prefix="#", schema_overrides={"id": pl.String,
                                                               "split": pl.String})
        if df.height and df.row(0) in (("rep50", "split"), ("id", "split")):
            df = df.slice(1)
    if df.columns[:2] != ["id", "split"]:
        raise PipelineError(f"{p}: expected columns rep50 (or id), split; found {df.columns}")
    bad = df.filter(~pl.col("split").is_in(PIN_SPLITS))
    if bad.height:
        raise PipelineError(f"{p}: {bad.row(0)[0]}: unknown split {bad.row(0)[1]!r} "
                            f"(one of {', '.join(PIN_SPLITS)})")
    dup = df.filter(pl.col("id").is_duplicated())
    if dup.height:
        raise PipelineError(f"{p}: {dup.row(0)[0]} is pinned more than once")
    return df.select("id", "split")


def read_pin_list(pins: PinList) -> pl.DataFrame:
    """An (id, split) table: every ID of the list file (one per line, ``#`` comments)."""
    p = Path(pins.path)
    if not p.is_file():
        raise PipelineError(f"{p}: pin list not found")
    ids = []
    for number, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if len(text.split()) != 1:
            raise PipelineError(f"{p}: line {number}: expected one ID, found {text!r}")
        ids.append(text)
    return pl.DataFrame({"id": ids, "split": [pins.split] * len(ids)},
                        schema={"id": pl.String, "split": pl.String}).unique("id",
                                                                             maintain_order=True)


def resolve_pins(pins: pl.DataFrame, clusters: pl.DataFrame) -> pl.DataFrame:
    """(rep50, split, id) for the pins found in this build's ``clusters`` (accession, rep50).

    An ID that is one of the build's UniRef50 IDs pins that cluster; otherwise the accession
    it names (itself, or a UniRef ID's representative) pins the cluster that holds it.
    """
    reps = clusters.select("rep50").unique()
    direct = pins.join(reps, left_on="id", right_on="rep50", how="semi").with_columns(
        pl.col("id").alias("rep50"))
    rest = pins.join(direct, on="id", how="anti").with_columns(
        pl.col("id").str.replace(r"^UniRef(?:50|90|100)_", "").alias("accession"))
    by_accession = rest.join(clusters.select("accession", "rep50"), on="accession").drop(
        "accession")
    return pl.concat([direct.select("rep50", "split", "id"),
                      by_accession.select("rep50", "split", "id")])


def group_pins(pinned: pl.DataFrame) -> pl.DataFrame:
    """(group, group_split, conflicting) per split group with a pin: its pinned split; a
    group pinned ``excluded`` anywhere is excluded; other disagreements go to train, so that no
    held-out sequence has a linked homolog in train."""
    per_group = pinned.group_by("group").agg(pl.col("split").unique().alias("pins"))
    return per_group.select(
        "group",
        pl.when(pl.col("pins").list.contains(EXCLUDED)).then(pl.lit(EXCLUDED))
        .when(pl.col("pins").list.len() == 1).then(pl.col("pins").list.first())
        .otherwise(pl.lit("train")).alias("group_split"),
        (pl.col("pins").list.len() > 1).alias("conflicting"),
    )
