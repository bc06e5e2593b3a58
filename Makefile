# Set-up is automatic: the first `make demo` or `make test` creates .venv and installs into it with pip.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_AUTH_MODE := disabled
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S := 0.2

.PHONY: install demo test lint bench ui cluster-up cluster-down cluster-demo sweep sweep-smoke clean

install: $(STAMP)

# pip, not uv or poetry: pip takes torch from this machine's local wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.demo

# The MLflow UI on this machine only.
ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlruns.db --host 127.0.0.1 --port 5000

# A one-node Ray cluster on this machine (token auth off), and the demo's training submitted to it as a job.
cluster-up: $(STAMP)
	$(PY) -m experiments.cluster up

cluster-down: $(STAMP)
	$(PY) -m experiments.cluster down

cluster-demo: $(STAMP)
	$(VENV)/bin/ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
	  python -m experiments.train --config experiments/configs/demo.yaml \
	  --set data.root=$(CURDIR)/data/scenes --set data.latent_cache=$(CURDIR)/data/scenes_latents \
	  --set autoencoder.path=$(CURDIR)/data/autoencoder --set text.cache_dir=$(CURDIR)/data/text_cache \
	  --set train.storage_path=$(CURDIR)/outputs/runs --tracking-uri sqlite:///$(CURDIR)/mlruns.db

# The critical_details ablation sweep and its report (Ray Tune; run it again to continue an interrupted one).
sweep: $(STAMP)
	$(PY) -m ablations.sweep --preset critical_details

# A two-arm, one-seed sweep of a tiny model through Ray Tune, MLflow and the report (part of make test).
sweep-smoke: $(STAMP)
	$(PY) -m pytest -q tests/test_sweep.py

test: $(STAMP)
	$(PY) -m pytest -q

# ruff: lint (pyflakes, pycodestyle, import order) and the formatter's check; `ruff format .` applies it.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The performance benchmark at the demo config (its data, autoencoder and latent cache are made first if missing):
# outputs/bench.json and outputs/bench.md. `make bench BENCH_ARGS=--full` adds the compiled arm, the larger
# config and the scaling rows (docs/performance.md has the latest tables).
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -m experiments.prepare_data --config experiments/configs/demo.yaml
	$(PY) -m experiments.train_autoencoder --config experiments/configs/demo.yaml --reuse
	$(PY) -m experiments.cache_latents --config experiments/configs/demo.yaml --reuse
	$(PY) -m experiments.bench --config experiments/configs/demo.yaml --out outputs/bench.json $(BENCH_ARGS)

clean:
	rm -rf outputs .pytest_cache
