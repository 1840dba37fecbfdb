# FewShot Studio: `make run` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
# NVIDIA machine: CUDA build of torch + onnxruntime-gpu; else the CPU build + onnxruntime.
HAS_NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_NVIDIA),1)
TORCH_SPEC := torch
EXTRA := gpu
else
TORCH_SPEC := torch==2.13.0
EXTRA := cpu
endif

.PHONY: setup run test lint bench package clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRA),dev]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m fewshot_studio --demo

test: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q
	$(PY) -m ruff check fewshot_studio tests benchmarks

lint: $(STAMP)
	$(PY) -m ruff check fewshot_studio tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/train_speed.py
	$(PY) benchmarks/label_speed.py

clean:
	rm -rf $(VENV) build dist *.egg-info
