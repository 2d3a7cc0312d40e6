"""``ModelConfig``: the shape and switches of an ESM-2 model, with the published presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import ConfigError  # a model config that cannot be built: one error type
from training.alphabet import VOCAB_SIZE

__all__ = ["MAX_POSITIONS", "MAX_RESIDUES", "PRESETS", "ConfigError", "ModelConfig"]

MAX_RESIDUES = 1022  # ESM-2's crop: residues of one sequence, without <cls> and <eos>
MAX_POSITIONS = MAX_RESIDUES + 2 + 2  # + <cls>/<eos>, + ESM's padding offset: HF's 1026

#: name -> (layers, hidden size, attention heads); the MLP is 4 x hidden.
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 64, 4),
    "8M": (6, 320, 20),
    "35M": (12, 480, 20),
    "150M": (30, 640, 20),
    "650M": (33, 1280, 20),
    "3B": (36, 2560, 40),
    "15B": (48, 5120, 40),
}

BACKENDS = ("torch", "te")
FP8_RECIPES = ("delayed", "current", "mxfp8")


@dataclass
class ModelConfig:
    """ESM-2 hyper-parameters (defaults: the 8M model) and runtime switches.

    ``backend`` picks the block implementation (``"torch"``: ``scaled_dot_product_attention``;
    ``"te"``: TransformerEngine on an NVIDIA GPU); both use the same parameter names, so one
    checkpoint loads in either. ``activation_checkpointing`` recomputes each block in backward.
    """

    num_layers: int = 6
    hidden_size: int = 320
    num_heads: int = 20
    ffn_size: int = 0  # 0: 4 x hidden_size
    vocab_size: int = VOCAB_SIZE
    max_position_embeddings: int = MAX_POSITIONS  # recorded for HF export (rotary: no table)
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    token_dropout: bool = True
    emb_layer_norm_before: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    activation_checkpointing: bool = False
    backend: str = "torch"
    te_fp8: bool = False
    te_fp8_recipe: str = "delayed"
    preset: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.ffn_size:
            self.ffn_size = 4 * self.hidden_size
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first inconsistent field."""
        for name in ("num_layers", "hidden_size", "num_heads", "ffn_size", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) is not a multiple of "
                f"model.num_heads ({self.num_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"rotary embeddings need an even head size, got {self.head_dim}")
        if self.vocab_size != VOCAB_SIZE:
            raise ConfigError(f"model.vocab_size must be {VOCAB_SIZE} (the ESM alphabet)")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {value!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"model.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.te_fp8_recipe not in FP8_RECIPES:
            raise ConfigError(
                f"model.te_fp8_recipe must be one of {FP8_RECIPES}, got {self.te_fp8_recipe!r}"
            )
        if self.te_fp8 and self.backend != "te":
            raise ConfigError("model.te_fp8 needs model.backend: te")
        if self.layer_norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("model.layer_norm_eps and model.rope_theta must be positive")

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.hidden_size // self.num_heads

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A preset (``tiny 8M 35M 150M 650M 3B 15B``) with fields replaced by ``overrides``."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {list(PRESETS)}")
        layers, hidden, heads = PRESETS[name]
        base = {"num_layers": layers, "hidden_size": hidden, "num_heads": heads, "preset": name}
        _check_keys(overrides)
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of ``to_dict``; a ``preset`` key alone (plus overrides) selects a preset."""
        if not isinstance(data, dict):
            raise ConfigError(f"model config must be a mapping, got {type(data).__name__}")
        _check_keys(data)
        shape_keys = {"num_layers", "hidden_size", "num_heads"}
        if data.get("preset") and not shape_keys & data.keys():
            rest = {k: v for k, v in data.items() if k != "preset"}
            return cls.from_preset(data["preset"], **rest)
        try:
            return cls(**data)
        except TypeError as exc:  # e.g. a string where a number belongs
            raise ConfigError(f"bad model config: {exc}") from exc

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated)."""
        _check_keys(changes)
        return dataclasses.replace(self, **changes)


def _check_keys(data: dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown model config field(s) {unknown}; known: {sorted(known)}")
