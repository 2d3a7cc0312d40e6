# The two set-up commands (see README): `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
CONFIG ?= config/sample.yaml
CORES ?= 2

.PHONY: demo test lint bootstrap clean

bootstrap:
	@bash scripts/bootstrap.sh

demo: bootstrap
	$(VENV)/bin/snakemake --cores $(CORES) --configfile $(CONFIG) --rerun-incomplete all train

test: bootstrap
	$(VENV)/bin/python -m pytest -q

lint: bootstrap
	$(VENV)/bin/ruff check .

clean:
	rm -rf builds .snakemake
