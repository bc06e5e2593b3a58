# Set-up is automatic: the first `make demo` or `make test` creates .venv and installs into it with pip.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_AUTH_MODE := disabled
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S := 0.2

.PHONY: install demo test clean

install: $(STAMP)

# pip, not uv or poetry: pip takes torch from this machine's local wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.quickstart --out outputs/quickstart

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf outputs .pytest_cache
