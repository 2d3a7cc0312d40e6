# esm2-pretrain dataset build: one rule per stage, each calling one `esm2-data` subcommand.
#   snakemake --cores 2 --configfile config/sample.yaml
# The config is validated here (unknown keys and wrong types stop the run before any job), then
# written resolved to <out_dir>/build_config.yaml, which every stage is run with, and, per stage,
# the part its outputs depend on to <out_dir>/config/<stage>.yaml (pipeline.config.STAGE_SECTIONS),
# each rewritten only when it changes: a rule depends on its own part, so an edit reruns the
# stages it affects and what follows them, never a stage upstream.
import sys
from pathlib import Path

import yaml

from pipeline.config import STAGE_SECTIONS, config_to_dict, parse_config, stage_config
from pipeline.download import local_source

if not config:
    configfile: "config/sample.yaml"

CFG = parse_config(dict(config), source="snakemake config")
B = CFG.out  # pipeline.build_dir.BuildDir: every path of the build
OUT = B.root
RESOLVED = B.resolved_config
ESM2_DATA = f"{sys.executable} -m pipeline.cli"


def stage(command: str) -> str:
    """A rule's shell command: its output goes to the terminal and the rule's log, whose last
    line on failure is the one-line `esm2-data: error:` (or `esm2-train: error:`), repeated in
    Snakemake's report of the failed job."""
    return (f"{command} 2>&1 | tee {{log}} || "
            "(echo \"{rule} failed: $(tail -n 1 {log})\" >&2; exit 1)")


STAGE_CONFIG = {stage: B.stage_config(stage) for stage in STAGE_SECTIONS}


def _write_if_changed(path: Path, data: dict) -> None:
    text = yaml.safe_dump(data, sort_keys=True)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)


_write_if_changed(RESOLVED, config_to_dict(CFG))
for _stage, _path in STAGE_CONFIG.items():
    _write_if_changed(_path, stage_config(CFG, _stage))


MANIFEST = Path(CFG.manifest_dir) / f"{CFG.build}.json"


def _stale_manifest_if_incomplete() -> None:
    """Snakemake (>= 7.7) ignores a deleted intermediate while the final outputs exist. The
    manifest describes every output, so with one missing it no longer describes the build: it
    is moved aside (<build>.json.stale), and the stage that makes the missing file reruns, with
    everything that follows it."""
    missing = [path.relative_to(OUT).as_posix() for path in B.outputs(bool(CFG.decontaminate))
               if not path.exists()]
    if MANIFEST.exists() and missing:
        MANIFEST.replace(MANIFEST.with_name(MANIFEST.name + ".stale"))
        print(f"{OUT}: {', '.join(missing)} missing: {MANIFEST} moved aside (.stale); the "
              "stages that make them rerun", file=sys.stderr)


_stale_manifest_if_incomplete()
TRAIN_CONFIG = Path(CFG.train.config)
RUN = Path(CFG.train.run_dir or f"runs/{CFG.build}-{TRAIN_CONFIG.stem}")
ESM2_TRAIN = f"{sys.executable} -m training.cli"


rule all:
    input:
        MANIFEST,


rule download:
    input:
        config=STAGE_CONFIG["download"],
    output:
        B.download_record,
    log:
        B.log("download"),
    shell:
        stage("{ESM2_DATA} download --config {RESOLVED}")


# Each input file (Swiss-Prot, TrEMBL, ...) is parsed by its own job, side by side; the merge
# collapses duplicates across all of them: the same bytes as one job over the concatenated files.
rule ingest_part:
    input:
        config=STAGE_CONFIG["ingest"],
        download=B.download_record,
    output:
        temp(directory(B.ingest_part("{part}"))),
    wildcard_constraints:
        part=r"\d+",
    log:
        B.log("ingest-{part}"),
    threads: CFG.threads
    shell:
        stage("{ESM2_DATA} ingest --config {RESOLVED} --part {wildcards.part} --threads {threads}")


rule ingest:
    input:
        config=STAGE_CONFIG["ingest"],
        download=B.download_record,
        parts=[B.ingest_part(i) for i in range(len(CFG.fasta_inputs))],
    output:
        sequences=B.sequences,
        records=B.records,
        stats=B.stats("ingest"),
    log:
        B.log("ingest"),
    shell:
        stage("{ESM2_DATA} ingest --config {RESOLVED} --merge")


rule cluster:
    input:
        config=STAGE_CONFIG["cluster"],
        sequences=B.sequences,
        records=B.records,
        # cluster.source uniref reads UniProt's UniRef50 XML, fetched by the download stage
        download=[B.download_record] if CFG.uniref_xml else [],
    output:
        clusters=B.clusters,
        links=B.cluster_links,
        stats=B.stats("cluster"),
    log:
        B.log("cluster"),
    threads: CFG.threads
    shell:
        stage("{ESM2_DATA} cluster --config {RESOLVED} --threads {threads}")


rule split:
    input:
        config=STAGE_CONFIG["split"],
        clusters=B.clusters,
        links=B.cluster_links,
        sequences=B.sequences,
        records=B.records,
    output:
        splits=B.splits,
        stats=B.stats("split"),
    log:
        B.log("split"),
    threads: CFG.threads
    shell:
        stage("{ESM2_DATA} split --config {RESOLVED} --threads {threads}")


rule check_leakage:
    input:
        config=STAGE_CONFIG["check_leakage"],
        splits=B.splits,
        clusters=B.clusters,
        sequences=B.sequences,
    output:
        report=B.stats("leakage"),
    log:
        B.log("leakage"),
    threads: CFG.threads
    shell:
        stage("{ESM2_DATA} check-leakage --config {RESOLVED} --threads {threads}")


# Only with `decontaminate:` sets: each set is searched against train, and every train split
# group it hits leaves train (decontamination.parquet). Editing a set reruns this and what reads
# it (shards, manifest), never the split.
DECONTAMINATION = [B.decontamination] if CFG.decontaminate else []
# a set that is a local file is an input too: editing it in place reruns the stage (a missing
# one is left to the stage, whose error names the set)
EVALUATION_FILES = [path for path in (local_source(s.url) for s in CFG.decontaminate)
                    if path is not None and path.is_file()]

if CFG.decontaminate:

    rule decontaminate:
        input:
            config=STAGE_CONFIG["decontaminate"],
            sets=EVALUATION_FILES,
            splits=B.splits,
            clusters=B.clusters,
            sequences=B.sequences,
            records=B.records,
        output:
            table=B.decontamination,
            stats=B.stats("decontamination"),
        log:
            B.log("decontaminate"),
        threads: CFG.threads
        shell:
            stage("{ESM2_DATA} decontaminate --config {RESOLVED} --threads {threads}")


rule shards:
    input:
        config=STAGE_CONFIG["shards"],
        splits=B.splits,
        decontamination=DECONTAMINATION,
        clusters=B.clusters,
        sequences=B.sequences,
        # the leakage check is a gate (it must pass first), not data: a re-check with another
        # bound does not make the shards stale
        leakage=ancient(B.stats("leakage")),
    output:
        shards=directory(B.shards),
        stats=B.stats("shards"),
    log:
        B.log("shards"),
    shell:
        stage("{ESM2_DATA} shards --config {RESOLVED}")


rule validation:
    input:
        config=STAGE_CONFIG["validation"],
        splits=B.splits,
        clusters=B.clusters,
        sequences=B.sequences,
        leakage=ancient(B.stats("leakage")),
    output:
        validation=directory(B.validation),
        stats=B.stats("validation"),
    log:
        B.log("validation"),
    shell:
        stage("{ESM2_DATA} validation --config {RESOLVED}")


rule manifest:
    input:  # it hashes every output of the build, so it reads all of them
        config=RESOLVED,
        download=B.download_record,
        sequences=B.sequences,
        records=B.records,
        clusters=B.clusters,
        links=B.cluster_links,
        splits=B.splits,
        decontamination=DECONTAMINATION,
        shards=B.shards,
        shard_stats=B.stats("shards"),
        validation=B.validation,
        validation_stats=B.stats("validation"),
        leakage=B.stats("leakage"),
    output:
        MANIFEST,
    log:
        B.log("manifest"),
    shell:
        stage("{ESM2_DATA} manifest --config {RESOLVED}")


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
        stage("DS_ACCELERATOR=${{DS_ACCELERATOR:-cpu}} OMP_NUM_THREADS=1 {ESM2_TRAIN} train "
              "--config {input.config} --data {OUT} --out {RUN} --resume-or-start "
              "--nproc-per-node {CFG.train.nproc}")


rule evaluate:
    input:
        final=RUN / "final" / "model.safetensors",
    output:
        RUN / "evaluation.json",
    log:
        RUN / "logs" / "evaluate.log",
    shell:
        stage("{ESM2_TRAIN} evaluate --checkpoint {RUN} --out {output}")


rule export:
    input:
        final=RUN / "final" / "model.safetensors",
    output:
        RUN / "hf" / "config.json",
    log:
        RUN / "logs" / "export.log",
    shell:
        stage("{ESM2_TRAIN} export {RUN}/final {RUN}/hf --overwrite")
