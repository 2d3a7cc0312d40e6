"""Real DeepSpeed ZeRO-3 on 2 CPU ranks (gloo) on the sample build: partitions, loss, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, run_notebook
from training.config import load_train_config

CONFIG = {
    "model": {"preset": "tiny"},
    "data": {"seed": 0, "tokens_per_batch": 2048, "packed": True},
    "optim": {"lr": 0.002, "warmup_steps": 5, "decay_steps": 100},
    "run": {"steps": 20, "eval_every": 10, "checkpoint_every": 10, "keep_last": 2,
            "eval_max_sequences": 50},
    "deepspeed": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
}


def torchrun(config: Path, data: Path, out: Path, steps: int, resume: bool = False) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(29500 + os.getpid() % 1000), str(REPO / "tests" / "dist_train.py"),
           str(config), str(data), str(out), str(steps), "resume" if resume else "fresh"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return [json.loads((out / f"report-rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def straight(sample_build, tmp_path_factory):
    """20 steps in one go (checkpoints at 10 and 20)."""
    root = tmp_path_factory.mktemp("train")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    reports = torchrun(config, sample_build.out, root / "straight", 20)
    return config, root, sample_build.out, reports


def test_zero3_partitions_every_parameter_in_half(straight) -> None:
    reports = straight[3]
    assert reports[0]["world"] == 2
    for name, (full, local) in reports[0]["partitions"].items():
        if full >= 1000:
            assert local == -(-full // 2), name  # each rank holds ceil(n/2) elements
            assert reports[1]["partitions"][name] == [full, local]
    assert len(reports[0]["partitions"]) >= 10


def test_loss_falls_and_ranks_agree(straight) -> None:
    _, root, _, reports = straight
    history = reports[0]["history"]
    assert [r["step"] for r in history] == list(range(1, 21))
    assert reports[1]["history"][-1]["loss"] == history[-1]["loss"]  # all-reduced mean
    first = sum(r["loss"] for r in history[:5]) / 5
    last = sum(r["loss"] for r in history[-5:]) / 5
    assert last < first - 0.2, (first, last)
    assert history[9]["val_perplexity"] > history[19]["val_perplexity"]
    metrics = [json.loads(line) for line in (root / "straight" / "metrics.jsonl").open()]
    assert [m["loss"] for m in metrics] == [r["loss"] for r in history]
    assert {"lr", "grad_norm", "tokens_per_s", "perplexity"} <= set(metrics[0])


def test_kill_and_resume_gives_identical_losses(straight) -> None:
    """10 steps, then a new process resumes from the checkpoint and runs 10 more."""
    config, root, data, reports = straight
    out = root / "resumed"
    torchrun(config, data, out, 10)
    resumed = torchrun(config, data, out, 20, resume=True)
    expected = [r["loss"] for r in reports[0]["history"][10:]]
    assert [r["loss"] for r in resumed[0]["history"]] == expected
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [m["loss"] for m in metrics] == [r["loss"] for r in reports[0]["history"]]


def test_checkpoints_pruned_and_export_matches_transformers(straight, tmp_path) -> None:
    import torch
    from transformers import EsmForMaskedLM

    from training.checkpoint import load_checkpoint
    from training.convert import export_hf

    _, root, _, _ = straight
    ckpt = root / "straight" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step00000020"
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000010", "step00000020"]
    ours = load_checkpoint(root / "straight" / "final").eval()
    export_hf(root / "straight" / "final", tmp_path / "hf")
    hf = EsmForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[0, 5, 6, 7, 8, 9, 10, 11, 2, 1, 1], [0, 12, 13, 14, 15, 2, 1, 1, 1, 1, 1]])
    mask = ids != 1
    with torch.no_grad():
        a = ours(ids, attention_mask=mask)["logits"]
        b = hf(input_ids=ids, attention_mask=mask.long()).logits
    assert (a - b)[mask].abs().max().item() <= 1e-5


def test_evaluate_matches_the_trainers_validation(straight) -> None:
    from training.checkpoint import load_checkpoint
    from training.evaluate import evaluate_model

    _, root, data, reports = straight
    model = load_checkpoint(root / "straight" / "final")
    result = evaluate_model(model, [data / "validation" / "validation-000000.tar"], limit=50)
    assert abs(result["perplexity"] - reports[0]["history"][-1]["val_perplexity"]) < 1e-4


def test_training_report_notebook_runs(straight, monkeypatch) -> None:
    monkeypatch.setenv("ESM2_RUN_DIR", str(straight[1] / "straight"))
    assert run_notebook("training_report.ipynb") == 3


def test_export_gathers_a_zero3_checkpoint(straight, tmp_path) -> None:
    """`esm2-train export` of checkpoints/step20 (ZeRO partitions) = export of final/."""
    from safetensors.torch import load_file

    from training.cli import main

    _, root, _, _ = straight
    run = root / "straight"
    assert main(["export", str(run / "checkpoints" / "step00000020"), str(tmp_path / "a")]) == 0
    assert main(["export", str(run / "final"), str(tmp_path / "b")]) == 0
    a, b = (load_file(tmp_path / x / "model.safetensors") for x in ("a", "b"))
    assert sorted(a) == sorted(b) and all(a[k].equal(b[k]) for k in a)
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "c")]) == 1


@pytest.mark.parametrize("path", sorted((REPO / "config" / "train").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_training_configs_are_valid(path: Path) -> None:
    cfg = load_train_config(path)
    model = cfg.model.build()
    assert model.preset == cfg.model.preset and cfg.run.steps > 0
