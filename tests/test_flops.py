"""Training FLOPs per token: equals 6 x the matmul weights plus the attention term."""

from __future__ import annotations

import pytest
import torch

from training.model.config import ModelConfig
from training.model.esm2 import build_model
from training.model.flops import attention_length, mfu, training_flops_per_token


@pytest.mark.parametrize("preset", ["tiny", "8M"])
def test_flops_are_six_times_the_matmul_weights(preset: str) -> None:
    cfg = ModelConfig.from_preset(preset)
    model = build_model(cfg)
    matmul_weights = sum(
        m.weight.numel() for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "contact" not in name
    )
    assert training_flops_per_token(cfg, 0) == 6 * matmul_weights
    extra = training_flops_per_token(cfg, 100) - training_flops_per_token(cfg, 0)
    assert extra == 3 * 4 * 100 * cfg.hidden_size * cfg.num_layers


def test_650m_figure_matches_the_published_size() -> None:
    cfg = ModelConfig.from_preset("650M")
    per_token = training_flops_per_token(cfg, 0)
    assert per_token / 6 == pytest.approx(650e6, rel=0.05)  # ~6 N for a 650M model


def test_attention_length_and_mfu() -> None:
    assert attention_length([10, 10]) == 10
    assert attention_length([30, 10]) == pytest.approx(25.0)
    with pytest.raises(ValueError, match="non-empty"):
        attention_length([0])
    assert mfu(1000.0, 1e9, 2e12) == pytest.approx(0.5)
