# The two set-up commands (see README): `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
CONFIG ?= config/sample.yaml
CORES ?= 2

PYTEST_ARGS ?=

.PHONY: demo test test-fast lint bootstrap clean reference-manifest

bootstrap:
	@bash scripts/bootstrap.sh

demo: bootstrap
	$(VENV)/bin/snakemake --cores $(CORES) --configfile $(CONFIG) --rerun-incomplete all train

test: bootstrap
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# the quick loop: no MMseqs2 build, no training ranks (under 90 s)
test-fast: bootstrap
	$(VENV)/bin/python -m pytest -q -m "not heavy" $(PYTEST_ARGS)

# Refresh the committed reference manifest (data_manifests/sample.json) after a change that
# alters the sample build's bytes; the demo itself writes its manifest to builds/sample.json.
reference-manifest: bootstrap
	$(VENV)/bin/snakemake --cores $(CORES) --configfile config/sample.yaml --rerun-incomplete all
	cp builds/sample.json data_manifests/sample.json

lint: bootstrap
	$(VENV)/bin/ruff check .

clean:
	rm -rf builds .snakemake
