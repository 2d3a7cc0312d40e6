"""Dataset build for esm2-pretrain: UniProt download, ingest, clustering, splits, shards."""

__version__ = "0.1.0"
