"""The ingest stage's defaults, defined once: :class:`pipeline.config.IngestConfig` validates a
build's values against them, and :mod:`pipeline.ingest` uses them for callers that pass none
(without loading the configuration's validators: ``esm2-data ingest FILE --out DIR`` starts
parsing sooner)."""

CHUNK_BYTES = 8 << 20  # decompressed bytes parsed per chunk
ROW_GROUP_ROWS = 100_000  # rows per row group of sequences.parquet and records.parquet
BUCKET_BYTES = 32 << 20  # FASTA bytes per on-disk dedup partition
