"""ESM-2 in PyTorch, numerically matching ``transformers.EsmForMaskedLM``.

Embedding with token dropout -> ``num_layers`` pre-LayerNorm blocks (rotary self-attention, GELU
MLP) -> final LayerNorm (``emb_layer_norm_after``) -> LM head (dense, GELU, LayerNorm, decoder tied
to the embedding, bias). Batches are padded (``attention_mask``) or packed (``seq_ids``: several
sequences per row, attention restricted to each, rotary positions restarting per sequence). Either
way the blocks run on a slot stream laid out by ``training.model.layout``: batch padding is dropped,
sequences of similar length are bucketed for attention, so padded and packed batches give the same
values at the same cost. Numerics follow HF (query scaled by ``head_dim**-0.5`` before the rotary
embedding, rotary in float32, exact erf GELU, token dropout rescaling by each sequence's own mask
ratio); logits agree with ``EsmForMaskedLM`` to ~1e-6 in float32.

Parameter names (what checkpoints hold)::

    embed_tokens.weight                  [33, H]   (lm_head.decoder.weight is the same tensor)
    emb_layer_norm_before.{weight,bias}  only with emb_layer_norm_before
    rotary.inv_freq                      buffer, kept in float32
    layers.N.attn_norm.{weight,bias}     layers.N.qkv.{weight,bias} [3H, H] (q; k; v)
    layers.N.out_proj.{weight,bias}      layers.N.mlp_norm.{weight,bias}
    layers.N.fc1.{weight,bias}           layers.N.fc2.{weight,bias}
    emb_layer_norm_after.{weight,bias}
    lm_head.dense.{weight,bias}  lm_head.layer_norm.{weight,bias}  lm_head.bias
    contact_head.regression.{weight,bias}  carried for HuggingFace round trips; not trained by MLM
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from training.alphabet import IGNORE_INDEX, MASK, PAD
from training.model.config import PRESETS, ConfigError, ModelConfig
from training.model.layout import TokenLayout, build_layout
from training.model.rotary import RotaryEmbedding, RotaryTables, apply_rotary
from training.model.te_backend import TEBlock, fp8_autocast, fp8_padding

__all__ = [
    "ESM2",
    "PRESETS",
    "ConfigError",
    "ModelConfig",
    "build_model",
    "count_parameters",
]

#: Masking rate of all ESM training runs (15% selected x 80% replaced by <mask>).
MASK_RATIO_TRAIN = 0.15 * 0.8
#: Name of the tied decoder weight, left out of ``state_dict()`` (it is ``embed_tokens.weight``).
TIED_KEY = "lm_head.decoder.weight"


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, dropout_p: float
) -> torch.Tensor:
    """Attention within each sequence; ``q, k, v``: ``[s, heads, d]`` slots -> ``[s, H]``.

    One ``scaled_dot_product_attention`` call per bucket, on views of the slot stream (split,
    not sliced, so that backward concatenates instead of zero-filling). The query is expected
    pre-scaled (ESM scales it before the rotary embedding). An unbucketed layout (the
    TransformerEngine one) falls back to one call per sequence.
    """
    _, heads, dim = q.shape
    if layout.buckets:
        shapes = [(b.count, b.width, b.mask) for b in layout.buckets]
    else:
        shapes = [(1, int(n), None) for n in layout.cu_seqlens.diff().tolist()]
    sizes = [count * width for count, width, _ in shapes]
    parts = zip(q.split(sizes), k.split(sizes), v.split(sizes), shapes, strict=True)
    outs = []
    for qp, kp, vp, (count, width, mask) in parts:
        qb, kb, vb = (z.view(count, width, heads, dim).transpose(1, 2) for z in (qp, kp, vp))
        out = F.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=mask, dropout_p=dropout_p, scale=1.0
        )
        outs.append(out.transpose(1, 2).reshape(count * width, heads * dim))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class TransformerBlock(nn.Module):
    """Pre-LN block: x + attn(LN(x)); x + fc2(gelu(fc1(LN(x)))) — the PyTorch backend."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.hidden_dropout = cfg.hidden_dropout
        self.attention_dropout = cfg.attention_dropout
        self.attn_norm = nn.LayerNorm(hidden, eps=cfg.layer_norm_eps)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out_proj = nn.Linear(hidden, hidden)
        self.mlp_norm = nn.LayerNorm(hidden, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(hidden, cfg.ffn_size)
        self.fc2 = nn.Linear(cfg.ffn_size, hidden)

    def forward(self, x: torch.Tensor, rope: RotaryTables, layout: TokenLayout) -> torch.Tensor:
        """``x``: ``[s, hidden]`` slots -> same."""
        qkv = self.qkv(self.attn_norm(x)).view(-1, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(1)
        q = apply_rotary(q, rope.cos_q, rope.sin_q)
        k = apply_rotary(k, rope.cos_k, rope.sin_k)
        p_attn = self.attention_dropout if self.training else 0.0
        attn = attention(q, k, v, layout, p_attn)
        x = x + F.dropout(self.out_proj(attn), self.hidden_dropout, self.training)
        mlp = self.fc2(F.gelu(self.fc1(self.mlp_norm(x))))
        return x + F.dropout(mlp, self.hidden_dropout, self.training)


class LMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder (tied to the input embedding) + bias."""

    def __init__(self, cfg: ModelConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.decoder.weight = embedding.weight  # tied: the same Parameter object
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the alphabet."""
        return self.decoder(self.layer_norm(F.gelu(self.dense(x)))) + self.bias


class ContactHead(nn.Module):
    """Weights of ESM's contact regression (layers x heads -> 1); kept for HF interop only."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.regression = nn.Linear(cfg.num_layers * cfg.num_heads, 1)
        self.requires_grad_(False)


class ESM2(nn.Module):
    """ESM-2 masked language model. ``forward`` takes padded or packed ``[B, T]`` batches."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=PAD)
        self.emb_layer_norm_before = (
            nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
            if cfg.emb_layer_norm_before
            else None
        )
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.layers = nn.ModuleList(_make_blocks(cfg))
        self.emb_layer_norm_after = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.lm_head = LMHead(cfg, self.embed_tokens)
        self.contact_head = ContactHead(cfg)
        self.register_state_dict_post_hook(_drop_tied_key)
        self.register_load_state_dict_post_hook(_ignore_missing_tied_key)
        self.reset_parameters()

    def tie_weights(self) -> None:
        """Make the LM decoder use the embedding matrix (again, e.g. after ``to_empty``)."""
        self.lm_head.decoder.weight = self.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise as HF ``EsmPreTrainedModel`` does: N(0, 0.02) weights, zero biases."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if module is not self.lm_head.decoder:
                    nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                module.weight[PAD].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()  # rotary frequencies, TransformerEngine modules
        self.lm_head.bias.zero_()

    def layout(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
    ) -> TokenLayout:
        """The token layout of a batch; without a mask, ``<pad>`` tokens are padding."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got {tuple(input_ids.shape)}")
        if attention_mask is None and seq_ids is None:
            attention_mask = input_ids != PAD
        for name, other in (("attention_mask", attention_mask), ("seq_ids", seq_ids)):
            if other is not None and other.shape != input_ids.shape:
                raise ValueError(
                    f"{name} has shape {tuple(other.shape)}, input_ids {tuple(input_ids.shape)}"
                )
        if seq_ids is None and attention_mask is not None and bool((attention_mask < 0).any()):
            raise ValueError("attention_mask holds negative values; pass packed ids as seq_ids=")
        return build_layout(
            attention_mask,
            seq_ids,
            input_shape=tuple(input_ids.shape),
            bucketed=self.config.backend == "torch",
            token_cost=2.4 * self.config.hidden_size,
        )

    def embed(self, input_ids: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Token embeddings of the slots ``[s, hidden]``, with ESM's token dropout."""
        ids = layout.to_slots(input_ids, fill=PAD)
        x = self.embed_tokens(ids)
        if self.config.token_dropout:
            is_mask = ids == MASK
            x = x.masked_fill(is_mask[:, None], 0.0)
            masked = torch.zeros(layout.num_sequences, device=x.device, dtype=torch.float32)
            masked = masked.index_add(0, layout.seq_index, is_mask.float())
            observed = masked / layout.lengths
            x = (x * (1 - MASK_RATIO_TRAIN) / (1 - observed)[layout.seq_index, None]).to(x.dtype)
        if self.emb_layer_norm_before is not None:
            x = self.emb_layer_norm_before(x)
        return x

    def run(
        self,
        input_ids: torch.Tensor,
        layout: TokenLayout,
        keep_layers: Sequence[int] = (),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run the encoder: ``(final hidden [t, H], {layer: hidden [t, H]})`` for real tokens.

        Layer 0 is the embedding output, layer ``i`` the output of block ``i``, and the last
        layer (``num_layers``) is taken after ``emb_layer_norm_after`` (as ESM and HF report it).
        Tokens are in batch order (``layout.token_index``).
        """
        keep = set(keep_layers)
        kept: dict[int, torch.Tensor] = {}
        x = self.embed(input_ids, layout)
        num_slots = x.shape[0]
        if 0 in keep:
            kept[0] = layout.from_slots(x)
        stream = layout
        extra = fp8_padding(self.config, num_slots)
        if extra:
            stream = layout.with_extra_sequence(extra)
            x = torch.cat([x, x.new_zeros(extra, x.shape[1])])
        rope = self.rotary.tables(stream.positions, self.config.head_dim**-0.5)
        last = len(self.layers)
        with _te_autocast(self.config):
            for i, block in enumerate(self.layers, start=1):
                if self.config.activation_checkpointing and self.training:
                    x = checkpoint(block, x, rope, stream, use_reentrant=False)
                else:
                    x = block(x, rope, stream)
                if i in keep and i != last:
                    kept[i] = layout.from_slots(x[:num_slots])
        x = self.emb_layer_norm_after(layout.from_slots(x[:num_slots]))
        if last in keep:
            kept[last] = x
        return x, kept

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> dict[str, Any]:
        """``{"logits": [B, T, 33] (zeros at padding), "hidden_states": tuple | None}``.

        ``attention_mask`` marks real tokens of a right-padded batch; ``seq_ids`` marks the
        sequences of a packed batch (-1 = padding). ``hidden_states`` (when asked for) holds
        ``num_layers + 1`` tensors ``[B, T, H]``, numbered as in ``run``. With ``labels``
        (``[B, T]``, ``-100`` where not scored) the MLM loss comes with the logits, as HF's
        ``EsmForMaskedLM`` gives it: ``loss`` (mean cross-entropy over the scored positions, 0
        when there are none), ``nll`` (their float32 sum) and ``scored`` (their count), the sum
        and count being what a trainer normalises over all ranks.
        """
        layout = self.layout(input_ids, attention_mask, seq_ids)
        keep = range(len(self.layers) + 1) if output_hidden_states else range(0)
        final, kept = self.run(input_ids, layout, keep)
        logits = layout.scatter(self.lm_head(final))
        hidden = tuple(layout.scatter(kept[i]) for i in keep) if output_hidden_states else None
        out = {"logits": logits, "hidden_states": hidden}
        if labels is not None:
            nll, scored = _masked_nll(logits, labels)
            out.update(loss=nll / scored.clamp(min=1), nll=nll, scored=scored)
        return out

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        layers: Sequence[int],
        attention_mask: torch.Tensor | None = None,
        seq_ids: torch.Tensor | None = None,
    ) -> dict[int, torch.Tensor]:
        """Hidden states ``[B, T, H]`` of some layers (0..num_layers), without the LM head."""
        for layer in layers:
            if not 0 <= layer <= len(self.layers):
                raise ValueError(f"layer {layer} is outside 0..{len(self.layers)}")
        layout = self.layout(input_ids, attention_mask, seq_ids)
        _, kept = self.run(input_ids, layout, layers)
        return {i: layout.scatter(kept[i]) for i in layers}


def _make_blocks(cfg: ModelConfig) -> list[nn.Module]:
    block = TEBlock if cfg.backend == "te" else TransformerBlock
    return [block(cfg) for _ in range(cfg.num_layers)]


def _te_autocast(cfg: ModelConfig) -> contextlib.AbstractContextManager:
    if cfg.backend == "te" and cfg.te_fp8:
        return fp8_autocast(cfg)
    return contextlib.nullcontext()


def _drop_tied_key(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    state_dict.pop(prefix + TIED_KEY, None)


def _ignore_missing_tied_key(module: nn.Module, incompatible_keys: Any) -> None:
    missing = incompatible_keys.missing_keys
    for key in [k for k in missing if k.endswith(TIED_KEY)]:
        missing.remove(key)


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> ESM2:
    """An initialised ``ESM2`` for ``cfg`` (``device="meta"`` builds without memory)."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return ESM2(cfg)


def _masked_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed float32 cross-entropy over the positions whose label is not ``IGNORE_INDEX`` (0
    when there are none, no host sync) and the number of those positions."""
    flat = labels.reshape(-1)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat,
                          ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, (flat != IGNORE_INDEX).sum()


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, each shared tensor counted once (as HF ``num_parameters``)."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) in seen or (trainable_only and not param.requires_grad):
            continue
        seen.add(id(param))
        total += param.numel()
    return total
