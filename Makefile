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
# Optional: where torch comes from, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu for
# the CPU build on a machine whose pip has no local CPU wheel (PyPI's Linux torch is CUDA).
TORCH_INDEX ?=
TORCH_PIP_ARGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

.PHONY: setup run test lint bench package package-test clean

setup: $(STAMP)

# torch first, pinned, so that installing the package never pulls in another build.
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRA),dev,train]"
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

# One-folder desktop app in dist/fewshot-studio/ (PyInstaller; packaging/fewshot_studio.spec).
package: $(STAMP)
	$(PY) -c "import PyInstaller" 2>/dev/null || $(PY) -m pip install -q -e ".[$(EXTRA),package]"
	$(PY) -m PyInstaller --noconfirm --clean --distpath dist --workpath build/pyinstaller \
		packaging/fewshot_studio.spec
	@du -sh dist/fewshot-studio

# The built bundle's --version, checkpoints and --demo --screenshot, headless (a slow test).
package-test: package
	FEWSHOT_BUNDLE=dist/fewshot-studio QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q -m slow \
		tests/test_packaging.py

clean:
	rm -rf $(VENV) build dist *.egg-info
