PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL := models/demo-base

.PHONY: install tools serve test unit e2e demo-model demo bench-train bench bench-quick soak clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers` beside CPU torch.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[cpu,train,test,bench]'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

install: $(STAMP)

# The monitoring tests run Debian's Prometheus and promtool.
tools:
	@command -v prometheus >/dev/null || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null)

$(MODEL)/config.json: | $(STAMP)
	$(VENV)/bin/loraplex demo-model --out $(MODEL)

demo-model: $(MODEL)/config.json

serve: $(STAMP) $(MODEL)/config.json
	$(VENV)/bin/loraplex serve

demo: $(STAMP) $(MODEL)/config.json
	$(VENV)/bin/loraplex train examples/demo-support/job.yaml

unit: $(STAMP)
	$(PY) -m pytest tests/unit -q

bench-train: $(STAMP) $(MODEL)/config.json
	$(PY) loadtest/train_bench.py

# Serving benchmarks (about 27 minutes; bench-quick a few): tables into BENCHMARKS.md, plots in loadtest/results.
bench: $(STAMP)
	$(PY) -m loadtest.bench

bench-quick: $(STAMP)
	$(PY) -m loadtest.bench --quick

# About 10 minutes of load, adapter churn and faults on a gateway and engine of its own; writes soak.json.
soak: $(STAMP) $(MODEL)/config.json
	$(PY) -m loadtest.soak --duration 600 --out soak.json

e2e: $(STAMP) tools
	$(PY) -m pytest tests/e2e -q

test: $(STAMP) tools
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) models build *.egg-info
