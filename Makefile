# Every target creates .venv and installs what it needs: a fresh clone needs nothing installed by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= benchmarks/results
# torch/torchvision pinned to the wheels this project is tested with (local on the project's machines)
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: help venv demo test test-slow lint format bench cards gpu-check clean

help:
	@echo "make demo       train + validate a BiFormer on embedded Fashion-MNIST (else digits), CPU"
	@echo "make test       lint + the test suite (what CI runs)"
	@echo "make test-slow  the large variants and slow tests"
	@echo "make bench      CPU benchmarks, CSVs under $(OUT)"
	@echo "make cards      regenerate model_cards/"
	@echo "make gpu-check  GPU tests + benchmarks on a CUDA machine, CSVs under OUT=$(OUT)"

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist when we may install it; otherwise the demo uses digits
demo: $(STAMP)
	@if [ "$$(id -u)" = 0 ] && [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist || echo "dataset-fashion-mnist unavailable: the demo uses digits"; fi
	$(VENV)/bin/zoo demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(VENV)/bin/pytest -q --durations=20

test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -m slow --durations=20

bench: $(STAMP)
	bash benchmarks/run_all.sh $(OUT)

cards: $(STAMP)
	$(VENV)/bin/zoo card --all --readme README.md

gpu-check: $(STAMP)
	OUT=$(OUT) bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
