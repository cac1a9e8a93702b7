# Every target creates .venv and installs what it needs: a fresh clone needs nothing installed by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= benchmarks/results
# torch/torchvision pinned to the wheels this project is tested with (local on the project's machines)
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: help venv demo test test-slow lint format bench cards gpu-check mmcv clean

help:
	@echo "make demo       train + validate a BiFormer on embedded Fashion-MNIST (else digits), CPU"
	@echo "make test       lint + the test suite (what CI runs)"
	@echo "make test-slow  the large variants and slow tests"
	@echo "make bench      CPU benchmarks, CSVs under $(OUT)"
	@echo "make cards      regenerate model_cards/"
	@echo "make gpu-check  GPU tests + benchmarks on a CUDA machine, CSVs under OUT=$(OUT)"
	@echo "make mmcv       build mmcv 2.1.0 with its compiled CPU ops (15-30 min) for mmdet/mmseg"

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

# mmcv 2.1.0 (the newest mmdet 3.3 / mmseg 1.2 accept) from its PyPI source, with the two fixes torch 2.14
# needs: C++20 instead of the hard-coded C++17, and setuptools < 81 without build isolation (setup.py imports
# pkg_resources and torch). CPU ops only (FORCE_CUDA=0); replaces mmcv-lite.
MMCV_BUILD := build/mmcv
mmcv: $(STAMP)
	$(PY) -m pip install --quiet -U pip wheel "setuptools<81" "mmengine>=0.10.7,<1"
	mkdir -p $(MMCV_BUILD)
	cd $(MMCV_BUILD) && $(CURDIR)/$(PY) -m pip download --no-deps --no-binary :all: --no-build-isolation mmcv==2.1.0
	cd $(MMCV_BUILD) && rm -rf mmcv-2.1.0 && tar xzf mmcv-2.1.0.tar.gz
	sed -i "s/'-std=c++17'/'-std=c++20'/g; s/'-std=c++14'/'-std=c++20'/g" $(MMCV_BUILD)/mmcv-2.1.0/setup.py
	cd $(MMCV_BUILD)/mmcv-2.1.0 && MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=2 \
		$(CURDIR)/$(PY) -m pip wheel -v --no-deps --no-build-isolation -w ../wheelhouse .
	$(PY) -m pip uninstall -y mmcv-lite || true
	$(PY) -m pip install $(MMCV_BUILD)/wheelhouse/mmcv-2.1.0-*.whl

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
