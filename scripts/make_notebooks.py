"""Write the notebooks in notebooks/ (kept as a script, so their source is reviewable)."""

from __future__ import annotations

from pathlib import Path

import nbformat as nbf

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

DATASET_REPORT = [
    ("md", """# Dataset report

Plots a build from its manifest and Parquet files: sequence lengths, UniRef50 cluster sizes
(log-log), UniRef90 clusters per UniRef50 cluster, and split sizes. Set `ESM2_MANIFEST` (and
optionally `ESM2_BUILD_DIR`) in the environment, or edit the next cell."""),
    ("code", """%matplotlib inline
import json
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import polars as pl

MANIFEST = Path(os.environ.get("ESM2_MANIFEST", "../data_manifests/sample.json"))
manifest = json.loads(MANIFEST.read_text())
BUILD = Path(os.environ.get("ESM2_BUILD_DIR", manifest["config"]["out_dir"]))
print(f"build {manifest['build']} from {BUILD}")"""),
    ("code", """counts = manifest["counts"]
summary = pl.DataFrame([
    {"split": name, **row} for name, row in counts["split"]["splits"].items()
])
summary"""),
    ("code", """lengths = pl.read_parquet(BUILD / "sequences.parquet", columns=["length"])["length"]
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.hist(lengths.to_numpy(), bins=np.logspace(0, np.log10(max(lengths.max(), 10)), 60))
ax.set_xscale("log")
ax.axvline(1022, color="k", ls="--", lw=1, label="ESM-2 crop (1022)")
ax.set_xlabel("sequence length (residues)")
ax.set_ylabel("distinct sequences")
ax.legend()
ax.set_title("Length distribution")
plt.show()"""),
    ("code", """clusters = pl.read_parquet(BUILD / "clusters.parquet")
sizes = clusters.group_by("rep50").len()["len"].to_numpy()
values, freq = np.unique(sizes, return_counts=True)
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.loglog(values, freq, "o", ms=3)
ax.set_xlabel("UniRef50 cluster size (UniProt entries)")
ax.set_ylabel("clusters")
ax.set_title("UniRef50 cluster sizes (log-log)")
plt.show()"""),
    ("code", """pairs = clusters.select("rep50", "rep90").unique()
per50 = pairs.group_by("rep50").len()["len"].to_numpy()
values, freq = np.unique(per50, return_counts=True)
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.loglog(values, freq, "s", ms=3, color="C1")
ax.set_xlabel("UniRef90 clusters per UniRef50 cluster")
ax.set_ylabel("UniRef50 clusters")
ax.set_title("UniRef90 per UniRef50")
plt.show()"""),
    ("code", """fig, axes = plt.subplots(1, 3, figsize=(10, 3))
for ax, column in zip(axes, ["uniref50_clusters", "sequences", "residues"]):
    ax.bar(summary["split"].to_list(), summary[column].to_list(), color=["C0", "C1", "C2"])
    ax.set_yscale("log")
    ax.set_title(column.replace("_", " "))
fig.suptitle("Split sizes")
fig.tight_layout()
plt.show()"""),
    ("code", """leak = counts["leakage"]
print(f"leakage: {leak['fraction_at_or_above_threshold']:.2%} of {leak['queries']} held-out "
      f"sequences have a train hit >= {leak['identity_threshold']:.0%} identity")
pl.DataFrame({"best-hit identity": list(leak["best_hit_identity_histogram"]),
              "queries": list(leak["best_hit_identity_histogram"].values())})"""),
]

TRAINING_REPORT = [
    ("md", """# Training report

Loss, perplexity, learning rate and throughput of a training run, from its `metrics.jsonl`. Set
`ESM2_RUN_DIR` in the environment (or edit the next cell)."""),
    ("code", """%matplotlib inline
import json
import os
from pathlib import Path

import matplotlib.pyplot as plt
import polars as pl

RUN = Path(os.environ.get("ESM2_RUN_DIR", "../runs/sample-tiny"))
rows = [json.loads(line) for line in (RUN / "metrics.jsonl").read_text().splitlines() if line]
metrics = pl.DataFrame(rows)
print(f"{RUN}: {metrics.height} steps")
metrics.tail(5)"""),
    ("code", """fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(metrics["step"], metrics["loss"], label="train (masked tokens)")
if "val_loss" in metrics.columns:
    val = metrics.filter(pl.col("val_loss").is_not_null())
    ax.plot(val["step"], val["val_loss"], "o-", label="validation")
ax.set_xlabel("step")
ax.set_ylabel("cross-entropy")
ax.legend()
ax.set_title("Loss")
plt.show()"""),
    ("code", """fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(metrics["step"], metrics["perplexity"], label="train")
if "val_perplexity" in metrics.columns:
    val = metrics.filter(pl.col("val_perplexity").is_not_null())
    ax.plot(val["step"], val["val_perplexity"], "o-", label="validation")
ax.set_yscale("log")
ax.set_xlabel("step")
ax.set_ylabel("perplexity")
ax.legend()
ax.set_title("Perplexity")
plt.show()"""),
    ("code", """fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
left.plot(metrics["step"], metrics["lr"])
left.set_xlabel("step")
left.set_title("learning rate")
right.plot(metrics["step"], metrics["tokens_per_s"])
right.set_xlabel("step")
right.set_title("tokens / s (all ranks)")
fig.tight_layout()
plt.show()"""),
]


def write_notebook(cells: list[tuple[str, str]], name: str) -> Path:
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src)
                for kind, src in cells]
    path = NOTEBOOKS / name
    nbf.write(nb, path)
    return path


def main() -> None:
    print(write_notebook(DATASET_REPORT, "dataset_report.ipynb"))
    print(write_notebook(TRAINING_REPORT, "training_report.ipynb"))


if __name__ == "__main__":
    main()
