"""ESM-2 training for esm2-pretrain: the flow from a dataset build to a trained model.

::

    data/      a build's shards → masked, token-budget batches for one rank
               sampler (epoch order, global batches, the deal to ranks), batches (crop, mask,
               collate; the loader), build_source (a local or remote build, cached),
               reference_sequences (built-in real sequences for checks)
    model/     ESM-2: config (presets, MAX_RESIDUES), esm2 (the PyTorch model, loss in
               forward(labels=...)), layout (padded/packed token slots), rotary, te_backend
               (TransformerEngine blocks), checkpoint (our safetensors format), convert
               (HuggingFace EsmForMaskedLM both ways), flops
    trainer/   train (the DeepSpeed ZeRO-3 loop, exact and elastic resume), engine_config
               (DeepSpeed config, schedule, optimiser groups), run_dir (a run directory's
               layout), consolidate (ZeRO partitions → one checkpoint)
    evaluate   validation perplexity with fixed masking (of a model, a run, a checkpoint)
    embed      embeddings of a FASTA file to zarr
    config     the training config (``config/train/*.yaml``), alphabet (the 33 ESM tokens),
    cli        ``esm2-train``, errors

``training`` may import ``pipeline`` (the shard format and reader); ``pipeline`` never imports
``training``.
"""
