"""ESM-2 model, checkpoints, HuggingFace interop and embeddings for esm2-pretrain.

Modules: ``alphabet`` (tokens), ``model_config`` / ``model`` (ESM-2 in PyTorch, packed or padded),
``te_backend`` (TransformerEngine blocks), ``checkpoint`` (our on-disk format), ``convert``
(HuggingFace ``EsmForMaskedLM`` both ways), ``embed`` (embeddings to zarr), ``cli``
(``esm2-train``).
"""
