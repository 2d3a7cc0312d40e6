"""TransformerEngine blocks (``model.backend: te``) with the PyTorch block's parameter names.

Each block uses ``te.LayerNormLinear`` (attention LayerNorm fused with the QKV projection),
``te.Linear`` (output projection), ``te.LayerNormLinear`` + exact GELU + ``te.Linear`` (MLP; TE's
fused ``LayerNormMLP`` only offers the tanh-approximate GELU, which is not ESM's), and
``te.DotProductAttention`` on the unpadded stream (``qkv_format="thd"`` with ``cu_seqlens``), so
packed batches run without padding. Rotary embeddings and ESM's query scaling are applied exactly
as in the PyTorch block. Run it in bf16 (``model.to(torch.bfloat16)``); ``te_fp8`` adds an FP8
autocast around the blocks.

State-dict names are mapped in hooks so that ``state_dict()`` / ``load_state_dict()`` speak the
PyTorch block's names (``attn_norm.weight`` <-> ``qkv.layer_norm_weight`` ...); TE's
``_extra_state`` (FP8 scaling history) is not part of the checkpoint and is rebuilt after
``amax_history_len`` steps. ``transformer_engine`` is imported only when a TE block is built.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.errors import UserError
from training.model.config import ModelConfig
from training.model.layout import TokenLayout
from training.model.rotary import RotaryTables, apply_rotary

#: Block-relative names: ours -> TransformerEngine's (the rest are the same in both).
OURS_TO_TE = {
    "attn_norm.weight": "qkv.layer_norm_weight",
    "attn_norm.bias": "qkv.layer_norm_bias",
    "mlp_norm.weight": "fc1.layer_norm_weight",
    "mlp_norm.bias": "fc1.layer_norm_bias",
}
TE_TO_OURS = {te: ours for ours, te in OURS_TO_TE.items()}
#: FP8 GEMMs need the token count to be a multiple of this.
FP8_TOKEN_MULTIPLE = 16


class BackendUnavailableError(UserError, RuntimeError):
    """``backend: te`` was asked for where TransformerEngine or CUDA is missing."""


def require_transformer_engine() -> Any:
    """Import ``transformer_engine.pytorch`` or raise one clear ``BackendUnavailableError``."""
    problems = []
    if not torch.cuda.is_available():
        problems.append("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    if importlib.util.find_spec("transformer_engine") is None:
        problems.append("transformer_engine is not installed (pip install transformer_engine)")
    if not problems:
        try:
            import transformer_engine.pytorch as te
        except Exception as exc:  # TE raises OSError or RuntimeError on broken set-ups
            problems.append(f"importing transformer_engine.pytorch failed: {exc}")
        else:
            return te
    raise BackendUnavailableError(
        "model.backend 'te' needs TransformerEngine on an NVIDIA GPU: "
        + "; ".join(problems)
        + " (use model.backend: torch)"
    )


def rename_to_te(state: dict[str, Any], prefix: str) -> None:
    """In place: our block-relative names under ``prefix`` -> TransformerEngine's."""
    _rename(state, prefix, OURS_TO_TE)


def rename_from_te(state: dict[str, Any], prefix: str) -> None:
    """In place: TransformerEngine's names under ``prefix`` -> ours; drop ``_extra_state``."""
    _rename(state, prefix, TE_TO_OURS)
    for key in [k for k in state if k.startswith(prefix) and k.endswith("_extra_state")]:
        del state[key]


def _rename(state: dict[str, Any], prefix: str, mapping: dict[str, str]) -> None:
    for src, dst in mapping.items():
        if prefix + src in state:
            state[prefix + dst] = state.pop(prefix + src)


class TEBlock(nn.Module):
    """Pre-LN ESM block built from TransformerEngine modules (same math as ``TransformerBlock``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        te = require_transformer_engine()
        hidden = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.hidden_dropout = cfg.hidden_dropout
        on_meta = torch.empty(0).device.type == "meta"
        common = {
            "params_dtype": torch.get_default_dtype(),
            "device": "meta" if on_meta else "cuda",
            "init_method": functools.partial(nn.init.normal_, mean=0.0, std=cfg.initializer_range),
        }
        eps = cfg.layer_norm_eps
        self.qkv = te.LayerNormLinear(hidden, 3 * hidden, eps=eps, bias=True, **common)
        self.out_proj = te.Linear(hidden, hidden, bias=True, **common)
        self.fc1 = te.LayerNormLinear(hidden, cfg.ffn_size, eps=eps, bias=True, **common)
        self.fc2 = te.Linear(cfg.ffn_size, hidden, bias=True, **common)
        self.attention = te.DotProductAttention(
            cfg.num_heads,
            cfg.head_dim,
            attention_dropout=cfg.attention_dropout,
            qkv_format="thd",
            attn_mask_type="padding",
            softmax_scale=1.0,  # the query is scaled before the rotary embedding, as in ESM
        )
        self.register_state_dict_post_hook(_state_dict_post_hook)
        self.register_load_state_dict_pre_hook(_load_pre_hook)
        self.register_load_state_dict_post_hook(_load_post_hook)

    def forward(self, x: torch.Tensor, rope: RotaryTables, layout: TokenLayout) -> torch.Tensor:
        """``x``: ``[t, hidden]`` real tokens (an unbucketed layout) -> same."""
        tokens = x.shape[0]
        qkv = self.qkv(x).view(tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(1)
        q = apply_rotary(q, rope.cos_q, rope.sin_q)
        k = apply_rotary(k, rope.cos_k, rope.sin_k)
        cu_seqlens = layout.cu_seqlens.to(device=x.device, dtype=torch.int32)
        attn = self.attention(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            qkv_format="thd",
            attn_mask_type="padding",
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_kv=cu_seqlens,
            max_seqlen_q=layout.max_seqlen,
            max_seqlen_kv=layout.max_seqlen,
        ).reshape(tokens, -1)
        x = x + F.dropout(self.out_proj(attn), self.hidden_dropout, self.training)
        mlp = self.fc2(F.gelu(self.fc1(x)))
        return x + F.dropout(mlp, self.hidden_dropout, self.training)


def _state_dict_post_hook(module: nn.Module, state: dict, prefix: str, metadata: Any) -> None:
    rename_from_te(state, prefix)


def _load_pre_hook(module: nn.Module, state: dict, prefix: str, *args: Any) -> None:
    rename_to_te(state, prefix)


def _load_post_hook(module: nn.Module, incompatible: Any) -> None:
    missing = incompatible.missing_keys
    for key in [k for k in missing if k.endswith("_extra_state")]:
        missing.remove(key)


def fp8_padding(cfg: ModelConfig, num_tokens: int) -> int:
    """Dummy tokens to append so that FP8 GEMMs see a multiple of 16 tokens (0 without FP8)."""
    if cfg.backend != "te" or not cfg.te_fp8:
        return 0
    return -num_tokens % FP8_TOKEN_MULTIPLE


def fp8_autocast(cfg: ModelConfig) -> contextlib.AbstractContextManager:
    """TransformerEngine's FP8 autocast for ``cfg.te_fp8_recipe`` (HYBRID E4M3/E5M2)."""
    te = require_transformer_engine()
    from transformer_engine.common import recipe

    if cfg.te_fp8_recipe == "delayed":
        fp8_recipe = recipe.DelayedScaling(
            fp8_format=recipe.Format.HYBRID, amax_history_len=16, amax_compute_algo="max"
        )
    elif cfg.te_fp8_recipe == "current":
        fp8_recipe = recipe.Float8CurrentScaling(fp8_format=recipe.Format.HYBRID)
    else:
        fp8_recipe = recipe.MXFP8BlockScaling()
    if hasattr(te, "autocast"):  # TransformerEngine >= 2.8
        return te.autocast(enabled=True, recipe=fp8_recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=fp8_recipe)
