"""Real DeepSpeed ZeRO-3 on 2 CPU ranks (gloo) on the sample build: partitions, loss, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, run_notebook
from training.config import load_train_config
from training.trainer.train import SHM_DIR

CONFIG = {
    "model": {"preset": "tiny"},
    "data": {"seed": 0, "tokens_per_batch": 2048, "packed": True},
    "optim": {"lr": 0.002, "warmup_steps": 5, "decay_steps": 100},
    "run": {"steps": 20, "tokens_per_step": 4096, "eval_every": 10, "checkpoint_every": 10,
            "keep_last": 2, "eval_max_sequences": 50},
    "deepspeed": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
}
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(29500 + (os.getpid() + nproc) % 1000), *args]


def torchrun(config: Path, data: Path | str, out: Path, steps: int, resume: bool = False,
             nproc: int = 2) -> list[dict]:
    """Train under torchrun (dist_train.py); returns each rank's report."""
    cmd = torchrun_cmd(nproc, str(REPO / "tests" / "dist_train.py"), str(config), str(data),
                       str(out), str(steps), "resume" if resume else "fresh")
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return [json.loads((out / f"report-rank{r}.json").read_text()) for r in range(nproc)]


def write_config(path: Path, **run: object) -> Path:
    cfg = json.loads(json.dumps(CONFIG))
    cfg["run"].update(run)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def straight(sample_build, tmp_path_factory):
    """20 steps in one go (checkpoints at 10 and 20)."""
    root = tmp_path_factory.mktemp("train")
    config = write_config(root / "tiny.yaml")
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

    from training.model.checkpoint import load_checkpoint
    from training.model.convert import export_hf

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


def test_evaluate_matches_the_trainers_validation(straight, tmp_path) -> None:
    from training.cli import main
    from training.evaluate import evaluate_model
    from training.model.checkpoint import load_checkpoint

    _, root, data, reports = straight
    logged = reports[0]["history"][-1]["val_perplexity"]
    model = load_checkpoint(root / "straight" / "final")
    result = evaluate_model(model, [data / "validation" / "validation-000000.tar"], limit=50)
    assert abs(result["perplexity"] - logged) < 1e-4
    # a run directory: its latest checkpoint, its build, its crop/budget/packing and eval seed
    assert main(["evaluate", "--checkpoint", str(root / "straight"),
                 "--out", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["step"] == 20 and result["data"] == str(data)
    assert abs(result["perplexity"] - logged) < 1e-6
    ten = reports[0]["history"][9]["val_perplexity"]
    assert main(["evaluate", "--checkpoint", str(root / "straight" / "checkpoints" /
                 "step00000010"), "--out", str(tmp_path / "e10.json")]) == 0
    assert abs(json.loads((tmp_path / "e10.json").read_text())["perplexity"] - ten) < 1e-6


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


def test_elastic_resume_after_a_kill(straight, tmp_path) -> None:
    """2 ranks killed after the step-5 checkpoint; resumed on 1 and on 4 ranks to step 20: the
    same clusters every step as the uninterrupted 2-rank run, losses within fp32 reduction."""
    _, _, data, reports = straight
    config = write_config(tmp_path / "every5.yaml", checkpoint_every=5)
    out = tmp_path / "killed"
    cmd = torchrun_cmd(2, str(REPO / "tests" / "dist_train.py"), str(config), str(data),
                       str(out), "20", "fresh")
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    meta = out / "checkpoints" / "step00000005" / "meta.json"
    deadline = time.monotonic() + 300
    while not meta.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    kill_run(proc, out)
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest in {"step00000005", "step00000010", "step00000015"}, latest
    done = int(latest.removeprefix("step"))
    expected = reports[0]["history"][done:]
    for nproc in (1, 4):
        run = tmp_path / f"resumed-on-{nproc}"
        shutil.copytree(out, run)
        resumed = torchrun(config, data, run, 20, resume=True, nproc=nproc)[0]["history"]
        assert [r["step"] for r in resumed] == list(range(done + 1, 21))
        assert [r["cluster_ids"] for r in resumed] == [r["cluster_ids"] for r in expected]
        for got, want in zip(resumed, expected, strict=True):
            assert abs(got["loss"] - want["loss"]) < 1e-5 * want["loss"], (nproc, got, want)
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").open()]
        assert [m["step"] for m in metrics] == list(range(1, 21))


def rank_pids(out: Path) -> list[int]:
    """The training processes (ranks, not the launcher) writing to run directory ``out``."""
    found = subprocess.run(["pgrep", "-f", f"{out} "], capture_output=True, text=True).stdout
    return [int(pid) for pid in found.split() if "torch.distributed.run" not in
            Path(f"/proc/{pid}/cmdline").read_text(errors="replace")]


def kill_run(proc: subprocess.Popen, out: Path) -> None:
    """SIGKILL a torchrun launcher and its ranks (torchrun starts each rank in its own session)."""
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in rank_pids(out):
        os.kill(pid, signal.SIGKILL)
    proc.wait()


def test_reused_run_dir_is_refused_and_left_unchanged(straight, tmp_path) -> None:
    config, root, data, _ = straight
    run = tmp_path / "run"
    shutil.copytree(root / "straight", run)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    result = train_cli(config, data, run, "--steps", "3")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "esm2-train: error" in line]
    assert len(errors) == 1 and "already holds a training run" in errors[0], result.stderr[-2000:]
    assert "--overwrite" in errors[0] and "Traceback" not in result.stderr
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    fresh = tmp_path / "fresh"
    result = train_cli(config, data, fresh, "--steps", "3", "--resume")
    assert result.returncode != 0 and "no complete checkpoint to resume from" in result.stderr
    assert not fresh.exists() or not any(fresh.iterdir())
    result = train_cli(config, data, run, "--steps", "3", "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000003"
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step00000003"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


def train_cli(config: Path, data: Path | str, out: Path, *extra: str, nproc: int = 2,
              timeout: float = 600, torchrun: bool = False) -> subprocess.CompletedProcess:
    """``esm2-train train --nproc-per-node N …`` (or ``torchrun … -m training.cli train``) as
    the README gives them."""
    args = ["train", "--config", str(config), "--data", str(data), "--out", str(out),
            "--no-progress", *extra]
    cmd = (torchrun_cmd(nproc, "-m", "training.cli", *args) if torchrun else
           [sys.executable, "-m", "training.cli", *args, "--nproc-per-node", str(nproc)])
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


def one_shard_build(src: Path, dest: Path, clusters: int | None = None) -> Path:
    """A copy of a build whose train split is one shard (of its first ``clusters`` clusters)."""
    import itertools

    from pipeline.shard_reader import iter_clusters
    from pipeline.shards import ShardWriter, shard_paths

    shutil.copytree(src / "validation", dest / "validation")
    writer = ShardWriter(dest / "shards" / "train", "train", max_bytes=1 << 40)
    for sample in itertools.islice(iter_clusters(shard_paths(src / "shards" / "train")), clusters):
        writer.write(sample)
    assert writer.finish()["totals"]["shards"] == 1
    return dest


def test_two_ranks_train_on_a_single_shard_and_a_tiny_split_fails_fast(straight, tmp_path):
    config, _, data, _ = straight
    build = one_shard_build(data, tmp_path / "one-shard")
    result = train_cli(config, build, tmp_path / "run", "--steps", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 3: loss" in result.stdout
    tiny = one_shard_build(data, tmp_path / "one-cluster", clusters=1)
    start = time.monotonic()
    result = train_cli(config, tiny, tmp_path / "run2", "--steps", "3")
    assert result.returncode != 0 and time.monotonic() - start < 120
    errors = [line for line in result.stderr.splitlines() if "esm2-train: error" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "train split has 1 UniRef50 clusters, fewer than the 2 ranks" in errors[0]


@pytest.mark.parametrize("damage", ["byte", "truncated"])
def test_a_damaged_shard_stops_every_rank_with_one_line(straight, tmp_path, damage: str):
    config, _, data, _ = straight
    build = tmp_path / "build"
    shutil.copytree(data, build, ignore=shutil.ignore_patterns("*.parquet", "raw", "logs"))
    shard = build / "shards" / "train" / "train-000002.tar"
    if damage == "byte":
        raw = bytearray(shard.read_bytes())
        at = raw.index(b'"sequences":["') + 20
        raw[at] = 0xFF  # not UTF-8
        shard.write_bytes(bytes(raw))
    else:  # cut short (a partial copy): not a readable tar
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])
    config = write_config(tmp_path / "c.yaml", dist_timeout_s=60)
    start = time.monotonic()
    result = train_cli(config, build, tmp_path / "run", "--steps", "200", timeout=300)
    assert result.returncode != 0 and time.monotonic() - start < 200
    errors = [line for line in result.stderr.splitlines() if "esm2-train: error" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert str(shard) in errors[0]
    if damage == "byte":
        assert "sample UniRef50_" in errors[0] and "UnicodeDecodeError" in errors[0]
    assert "Traceback (most recent call last)" not in result.stderr.split("esm2-train: error")[0]


def test_a_rank_killed_mid_run_stops_the_others(straight, tmp_path) -> None:
    config, _, data, _ = straight
    config = write_config(tmp_path / "c.yaml", dist_timeout_s=30)
    out = tmp_path / "run"
    cmd = torchrun_cmd(2, "-m", "training.cli", "train", "--config", str(config), "--data",
                       str(data), "--out", str(out), "--no-progress", "--steps", "100000")
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = rank_pids(out)
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGKILL)
    start = time.monotonic()
    try:
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_run(proc, out)
    assert proc.returncode != 0 and time.monotonic() - start < 120
    time.sleep(1)
    assert rank_pids(out) == []  # no rank left behind


def test_training_from_http_gives_the_same_losses(straight, tmp_path) -> None:
    from tests.http_server import Behaviour, FileServer

    config, _, data, reports = straight
    files = {f"/build/{p.relative_to(data).as_posix()}": p.read_bytes()
             for p in [*(data / "shards" / "train").iterdir(), *(data / "validation").iterdir()]}
    behaviour = Behaviour(files=files)
    with FileServer(behaviour) as server:
        env = {**ENV, "ESM2_CACHE": str(tmp_path / "cache")}
        cmd = torchrun_cmd(2, str(REPO / "tests" / "dist_train.py"), str(config),
                           f"{server.base}/build", str(tmp_path / "run"), "12", "fresh")
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    history = json.loads((tmp_path / "run" / "report-rank0.json").read_text())["history"]
    assert [r["loss"] for r in history] == [r["loss"] for r in reports[0]["history"][:12]]
    fetched = [path for path, _ in behaviour.requests]
    shards = [p for p in fetched if p.endswith(".tar")]
    assert len(shards) == len(set(shards))  # each shard fetched once for both ranks
    assert any(p.endswith("member_lengths.npy") for p in fetched)


def test_one_process_without_a_launcher_and_the_deepspeed_launcher(straight, tmp_path):
    config, _, data, _ = straight
    base = ["train", "--config", str(config), "--data", str(data), "--no-progress",
            "--steps", "2"]
    plain = subprocess.run([sys.executable, "-m", "training.cli", *base, "--out",
                            str(tmp_path / "plain")], capture_output=True, text=True, env=ENV,
                           timeout=600)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "step 2: loss" in plain.stdout
    port = 29700 + os.getpid() % 200
    launcher = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus",
                               "2", "--master_port", str(port), "--module",
                               "training.cli", *base, "--out", str(tmp_path / "ds")],
                              capture_output=True, text=True, env=ENV, timeout=600)
    assert launcher.returncode == 0, launcher.stdout[-3000:] + launcher.stderr[-3000:]
    # DeepSpeed's CPU all-reduce buffers (69 MB a rank in /dev/shm) are not left behind
    assert not list(SHM_DIR.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    assert json.loads((tmp_path / "ds" / "checkpoints" / "step00000002" / "meta.json")
                      .read_text())["world_size"] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {steps: 2, no_such_key: 1}\n")
    for torchrun in (False, True):
        result = train_cli(bad, data, tmp_path / "bad-run", torchrun=torchrun)
        lines = [line for line in result.stderr.splitlines() if "esm2-train: error" in line]
        assert result.returncode != 0 and len(lines) == 1, result.stderr[-3000:]
        assert "run.no_such_key: unknown key" in lines[0]
        # no rank's traceback; torchrun adds its own one summary of the failed ranks
        assert result.stderr.count("Traceback") == (1 if torchrun else 0), result.stderr[-3000:]
    assert not (tmp_path / "bad-run").exists()


@pytest.mark.parametrize("path", sorted((REPO / "config" / "train").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_training_configs_are_valid(path: Path) -> None:
    cfg = load_train_config(path)
    model = cfg.model.build()
    assert model.preset == cfg.model.preset and cfg.run.steps > 0
