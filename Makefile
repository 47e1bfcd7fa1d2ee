PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL := models/demo-base

.PHONY: install tools serve test unit e2e demo-model demo bench-train bench bench-quick bench-compose soak clean docker-engine \
	base-image image image-gpu test-container

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

bench-quick: $(STAMP) $(MODEL)/config.json
	$(PY) -m loadtest.bench --quick
	$(PY) -m loadtest.capture_bench

# Compositions named per request: the first request of a new recipe, and later ones against a plain adapter.
bench-compose: $(STAMP) $(MODEL)/config.json
	$(PY) -m loadtest.compose_bench

# About 10 minutes of load, adapter churn and faults on a gateway and engine of its own; writes soak.json.
soak: $(STAMP) $(MODEL)/config.json
	$(PY) -m loadtest.soak --duration 600 --out soak.json

e2e: $(STAMP) tools
	$(PY) -m pytest tests/e2e -q

test: $(STAMP) tools
	$(PY) -m pytest -q

# Containers: a Docker engine (installed and started if absent), a Debian base image made by debootstrap (no
# registry pull), then the top-level Dockerfile built on it with this host's CA bundle and local wheels.
BASE_IMAGE ?= loraplex-base:bookworm
DOCKER_BUILD := docker build --network host --label io.loraplex.build=image --build-arg BASE_IMAGE=$(BASE_IMAGE)
# Untagged images of ours left by a build: the builder stage and the image a new build replaced.
PRUNE_BUILDS := docker image prune -f --filter label=io.loraplex.build >/dev/null

docker-engine:
	bash deploy/container/engine.sh

base-image: docker-engine
	bash deploy/container/base-image.sh $(BASE_IMAGE)

image: base-image | $(PY)
	PIP="$(PY) -m pip" bash deploy/container/build-extra.sh >/dev/null
	$(DOCKER_BUILD) -t loraplex:latest .
	$(PRUNE_BUILDS)

image-gpu: base-image | $(PY)
	PIP="$(PY) -m pip" bash deploy/container/build-extra.sh >/dev/null
	$(DOCKER_BUILD) --build-arg ACCELERATOR=gpu -t loraplex:gpu .
	$(PRUNE_BUILDS)

# Runs the image and compose (gateway and Prometheus) on the host's network; prints image size and time to ready.
test-container: image $(STAMP)
	LORAPLEX_BASE_IMAGE=$(BASE_IMAGE) $(PY) -m pytest tests/container -q -s

clean:
	rm -rf $(VENV) models build *.egg-info
