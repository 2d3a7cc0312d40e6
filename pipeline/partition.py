"""On-disk partitioning and deterministic Parquet streaming, for bounded-memory stages."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq


class BucketWriter:
    """Appends chunk tables to ``n`` on-disk partitions chosen by a key expression."""

    def __init__(self, root: Path, prefix: str, n: int) -> None:
        self.paths = [root / f"{prefix}-{i:05d}.parquet" for i in range(n)]
        self.writers: list[pq.ParquetWriter | None] = [None] * n
        self.n = n

    def write(self, df: pl.DataFrame, bucket: pl.Expr) -> None:
        if df.is_empty():
            return
        if self.n == 1:
            self._append(0, df)
            return
        for (b,), part in df.with_columns(bucket.alias("_b")).partition_by(
            "_b", as_dict=True, include_key=False
        ).items():
            self._append(int(b), part)

    def _append(self, i: int, df: pl.DataFrame) -> None:
        table = df.to_arrow()
        if self.writers[i] is None:
            self.writers[i] = pq.ParquetWriter(self.paths[i], table.schema, compression="lz4")
        self.writers[i].write_table(table)

    def close(self) -> list[Path | None]:
        out: list[Path | None] = []
        for path, writer in zip(self.paths, self.writers, strict=True):
            if writer is not None:
                writer.close()
            out.append(path if writer is not None else None)
        return out


class ParquetSink:
    """Streams polars frames into one zstd Parquet file in row groups of exactly
    ``row_group_rows`` (the last may be shorter), so the bytes do not depend on how the
    input was partitioned."""

    def __init__(self, path: Path, row_group_rows: int) -> None:
        self.path, self.row_group_rows = path, row_group_rows
        self.writer: pq.ParquetWriter | None = None
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.rows = 0

    def write(self, df: pl.DataFrame) -> None:
        table = df.to_arrow()
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema, compression="zstd")
        self.pending.append(table.cast(self.writer.schema))
        self.pending_rows += table.num_rows
        self.rows += table.num_rows
        if self.pending_rows >= self.row_group_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        table = pa.concat_tables(self.pending).combine_chunks()
        full = table.num_rows - (0 if final else table.num_rows % self.row_group_rows)
        if full:
            self.writer.write_table(table.slice(0, full), self.row_group_rows)
        rest = table.slice(full)
        self.pending, self.pending_rows = ([rest], rest.num_rows) if rest.num_rows else ([], 0)

    def close(self) -> None:
        if self.writer is None:
            return
        if self.pending_rows:
            self._flush(final=True)
        self.writer.close()
