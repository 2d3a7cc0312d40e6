"""The training loop and what it owns: the DeepSpeed engine config, the run directory, the
consolidation of ZeRO checkpoints (see ``training`` for the map)."""
