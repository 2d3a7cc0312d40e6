"""The ESM-2 model: config and presets, the PyTorch model, its TransformerEngine blocks,
checkpoints and HuggingFace conversion (see ``training`` for the map)."""
