# esm2-pretrain dataset build: one rule per stage, each calling one `esm2-data` subcommand.
#   snakemake --cores 2 --configfile config/sample.yaml
# The config is validated here (unknown keys and wrong types stop the run before any job), then
# written resolved to <out_dir>/build_config.yaml, which every rule reads: a config change makes
# the affected stages stale.
import sys
from pathlib import Path

import yaml

from pipeline.config import config_to_dict, parse_config

if not config:
    configfile: "config/sample.yaml"

CFG = parse_config(dict(config), source="snakemake config")
OUT = Path(CFG.out_dir)
RESOLVED = OUT / "build_config.yaml"
ESM2_DATA = f"{sys.executable} -m pipeline.cli"


def _write_resolved_config() -> None:
    text = yaml.safe_dump(config_to_dict(CFG), sort_keys=True)
    if not RESOLVED.exists() or RESOLVED.read_text() != text:
        RESOLVED.parent.mkdir(parents=True, exist_ok=True)
        tmp = RESOLVED.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(RESOLVED)


_write_resolved_config()


MANIFEST = Path(CFG.manifest_dir) / f"{CFG.build}.json"
TRAIN_CONFIG = Path(CFG.train.config)
RUN = Path(CFG.train.run_dir or f"runs/{CFG.build}-{TRAIN_CONFIG.stem}")
ESM2_TRAIN = f"{sys.executable} -m training.cli"


rule all:
    input:
        MANIFEST,


rule download:
    input:
        RESOLVED,
    output:
        OUT / "raw" / "download.json",
    log:
        OUT / "logs" / "download.log",
    shell:
        "{ESM2_DATA} download --config {input} 2>&1 | tee {log}"


rule ingest:
    input:
        config=RESOLVED,
        download=OUT / "raw" / "download.json",
    output:
        sequences=OUT / "sequences.parquet",
        records=OUT / "records.parquet",
        stats=OUT / "stats" / "ingest.json",
    log:
        OUT / "logs" / "ingest.log",
    shell:
        "{ESM2_DATA} ingest --config {input.config} 2>&1 | tee {log}"


rule cluster:
    input:
        config=RESOLVED,
        sequences=OUT / "sequences.parquet",
        records=OUT / "records.parquet",
    output:
        clusters=OUT / "clusters.parquet",
        stats=OUT / "stats" / "cluster.json",
    log:
        OUT / "logs" / "cluster.log",
    threads: CFG.threads
    shell:
        "{ESM2_DATA} cluster --config {input.config} --threads {threads} 2>&1 | tee {log}"


rule split:
    input:
        config=RESOLVED,
        clusters=OUT / "clusters.parquet",
    output:
        splits=OUT / "splits.parquet",
        stats=OUT / "stats" / "split.json",
    log:
        OUT / "logs" / "split.log",
    threads: CFG.threads
    shell:
        "{ESM2_DATA} split --config {input.config} --threads {threads} 2>&1 | tee {log}"


rule check_leakage:
    input:
        config=RESOLVED,
        splits=OUT / "splits.parquet",
    output:
        report=OUT / "stats" / "leakage.json",
    log:
        OUT / "logs" / "leakage.log",
    threads: CFG.threads
    shell:
        "{ESM2_DATA} check-leakage --config {input.config} --threads {threads} 2>&1 | tee {log}"


rule shards:
    input:
        config=RESOLVED,
        splits=OUT / "splits.parquet",
        leakage=OUT / "stats" / "leakage.json",
    output:
        shards=directory(OUT / "shards"),
        stats=OUT / "stats" / "shards.json",
    log:
        OUT / "logs" / "shards.log",
    shell:
        "{ESM2_DATA} shards --config {input.config} 2>&1 | tee {log}"


rule validation:
    input:
        config=RESOLVED,
        splits=OUT / "splits.parquet",
        leakage=OUT / "stats" / "leakage.json",
    output:
        validation=directory(OUT / "validation"),
        stats=OUT / "stats" / "validation.json",
    log:
        OUT / "logs" / "validation.log",
    shell:
        "{ESM2_DATA} validation --config {input.config} 2>&1 | tee {log}"


rule manifest:
    input:
        config=RESOLVED,
        shards=OUT / "stats" / "shards.json",
        validation=OUT / "stats" / "validation.json",
        leakage=OUT / "stats" / "leakage.json",
    output:
        MANIFEST,
    log:
        OUT / "logs" / "manifest.log",
    shell:
        "{ESM2_DATA} manifest --config {input.config} 2>&1 | tee {log}"


# ---- training: `snakemake ... train` (the README's demo runs `all train`) --------------------
rule train:
    input:
        RUN / "evaluation.json",
        RUN / "hf" / "config.json",


rule train_run:
    input:
        manifest=MANIFEST,
        config=TRAIN_CONFIG,
    output:
        final=RUN / "final" / "model.safetensors",
        metrics=RUN / "metrics.jsonl",
    log:
        RUN / "logs" / "train.log",
    threads: CFG.train.nproc
    shell:
        "DS_ACCELERATOR=${{DS_ACCELERATOR:-cpu}} OMP_NUM_THREADS=1 {ESM2_TRAIN} train "
        "--config {input.config} --data {OUT} --out {RUN} --resume-or-start "
        "--nproc-per-node {CFG.train.nproc} 2>&1 | tee {log}"


rule evaluate:
    input:
        final=RUN / "final" / "model.safetensors",
    output:
        RUN / "evaluation.json",
    log:
        RUN / "logs" / "evaluate.log",
    shell:
        "{ESM2_TRAIN} evaluate --checkpoint {RUN} --out {output} "
        "2>&1 | tee {log}"


rule export:
    input:
        final=RUN / "final" / "model.safetensors",
    output:
        RUN / "hf" / "config.json",
    log:
        RUN / "logs" / "export.log",
    shell:
        "{ESM2_TRAIN} export {RUN}/final {RUN}/hf --overwrite 2>&1 | tee {log}"
