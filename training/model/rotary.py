"""Rotary position embeddings as ESM-2 and HF ``EsmRotaryEmbedding`` compute them: the tables
(float32, with ESM's query scaling folded into the query's) and their application, shared by
the PyTorch blocks (:mod:`training.model.esm2`) and the TransformerEngine blocks
(:mod:`training.model.te_backend`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (ESM-2 / HF ``EsmRotaryEmbedding``); ``inv_freq`` stays fp32."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("inv_freq", self._default_inv_freq(), persistent=True)

    def _default_inv_freq(self, device: torch.device | str | None = None) -> torch.Tensor:
        steps = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device)
        return 1.0 / (self.theta ** (steps / self.head_dim))

    def reset_parameters(self) -> None:
        """Recompute ``inv_freq`` (e.g. after meta-device construction)."""
        self.inv_freq = self._default_inv_freq(self.inv_freq.device)

    def _apply(self, fn: Any, recurse: bool = True) -> RotaryEmbedding:
        # Keep the frequencies in float32 when the model is cast (model.half(), .to(bf16)).
        inv = self.inv_freq
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = inv.to(device=self.inv_freq.device, dtype=torch.float32)
        return self

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[t, head_dim]`` float32, for token positions ``[t]``."""
        freqs = positions[:, None].float() * self.inv_freq[None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def tables(self, positions: torch.Tensor, query_scale: float) -> RotaryTables:
        """Rotary tables for token positions ``[t]``, in the form ``apply_rotary`` takes; the
        query tables carry ESM's ``head_dim**-0.5`` query scaling."""
        cos, sin = self(positions)
        half = self.head_dim // 2
        signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        cos, signed_sin = cos[:, None, :], signed_sin[:, None, :]
        return RotaryTables(cos * query_scale, signed_sin * query_scale, cos, signed_sin)


@dataclass
class RotaryTables:
    """``cos`` and sign-folded ``sin`` (``[t, 1, head_dim]`` float32) for queries and keys."""

    cos_q: torch.Tensor
    sin_q: torch.Tensor
    cos_k: torch.Tensor
    sin_k: torch.Tensor


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``x*cos + rotate_half(x)*sin`` for ``x`` ``[t, heads, head_dim]``, computed in float32 (as
    HF does). ``rotate_half(x) = cat(-x2, x1)``; the minus sign is folded into ``signed_sin``."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((x2, x1), dim=-1) * signed_sin).to(x.dtype)
