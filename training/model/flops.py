"""Model FLOPs of a training step, for throughput and model FLOPs utilisation (MFU).

Counted as in the PaLM paper's appendix B and Megatron-LM: every matrix multiply, forward pass
2 FLOPs per multiply-add, backward twice the forward (so x3). Attention scores and the weighted
sum cost ``4 * seq_len * hidden`` per token and layer in the forward pass; with packed batches
``seq_len`` is the length-weighted mean of the packed sequences (attention is per sequence).
Element-wise work (norms, softmax, rotary, GELU) is not counted, as is usual for MFU.
"""

from __future__ import annotations

from collections.abc import Iterable

from training.model.config import ModelConfig


def training_flops_per_token(cfg: ModelConfig, seq_len: float) -> float:
    """FLOPs of forward + backward per token for sequences of (effective) length ``seq_len``."""
    h, f = cfg.hidden_size, cfg.ffn_size
    per_layer = 2 * (4 * h * h + 2 * h * f) + 4 * seq_len * h  # qkv + out, fc1 + fc2, attention
    lm_head = 2 * (h * h + h * cfg.vocab_size)
    return 3.0 * (cfg.num_layers * per_layer + lm_head)


def attention_length(lengths: Iterable[int]) -> float:
    """The effective ``seq_len`` of a batch of sequences: sum(l^2) / sum(l)."""
    values = list(lengths)
    total = sum(values)
    if not total:
        raise ValueError("attention_length needs at least one non-empty sequence")
    return sum(v * v for v in values) / total


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOPs/s over the hardware's peak FLOPs/s."""
    return tokens_per_s * flops_per_token / peak_flops
