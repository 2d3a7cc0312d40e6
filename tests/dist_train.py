"""Run by tests under torchrun: trains, then writes each rank's history and partition sizes.

Usage: dist_train.py CONFIG DATA OUT STEPS {fresh|resume|overwrite}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from training.config import load_train_config
from training.trainer.train import run_training


def main() -> None:
    config, data, out, steps, mode = sys.argv[1:6]
    cfg = load_train_config(config)
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"steps": int(steps)})})
    trainer, history = run_training(cfg, data, Path(out), "yes" if mode == "resume" else "no",
                                    overwrite=mode == "overwrite", progress=False,
                                    trace_clusters=True)
    partitions = {
        name: [int(p.ds_numel), int(p.ds_tensor.numel())]
        for name, p in trainer.engine.module.named_parameters() if hasattr(p, "ds_numel")
    }
    report = {"history": history, "partitions": partitions, "world": trainer.world}
    Path(out, f"report-rank{trainer.rank}.json").write_text(json.dumps(report))
    dist.barrier()


if __name__ == "__main__":
    main()
