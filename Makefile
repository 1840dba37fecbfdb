# FewShot Studio: `make run` and `make test` do all the set-up on a fresh machine, from the lock
# file of this machine's flavour (requirements/*.lock); `make lock` refreshes the locks.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
# NVIDIA machine: CUDA build of torch + onnxruntime-gpu; else the CPU build + onnxruntime.
HAS_NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_NVIDIA),1)
FLAVOUR := cuda
else
FLAVOUR := cpu
endif
LOCK := requirements/$(FLAVOUR).lock
# The optional cluster extra (`label --ray`: Ray Data, pyarrow) over the flavour's lock: the same
# pins plus Ray's (`make test-cluster` installs it).
CLUSTER_LOCK := requirements/$(FLAVOUR)-cluster.lock
CLUSTER_STAMP := $(VENV)/.cluster-done
# Optional: where the CPU build of torch (torch==2.13.0+cpu, in cpu.lock) comes from on a
# machine whose pip has no local CPU wheel, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (PyPI has no +cpu build: its Linux torch is the CUDA one).
TORCH_INDEX ?=
TORCH_PIP_ARGS := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)

.PHONY: setup lock run test test-cluster lint bench package package-test clean

setup: $(STAMP)

# Exactly the locked versions (pip, torch and all), then the package itself without resolving
# anything (--no-deps; built with the locked setuptools). A changed lock reinstalls.
$(STAMP): $(LOCK) pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Re-resolve both locks (uv, in a throw-away venv under build/) from pyproject.toml and
# requirements/*.in, for CPython 3.11 on Linux x86_64 (glibc >= 2.34) whatever machine runs
# it: an upgrade is a reviewed commit of the lock files. The CUDA locks also hold the timm
# extra (import-backbone --timm), which needs the gpu extra's torchvision. The CUDA lock comes from PyPI alone,
# with hashes; the CPU lock has none, as its torch wheel comes from the local wheel folder in
# pip's find-links (or TORCH_INDEX), whose files differ from machine to machine.
UV_VERSION := 0.13.9
LOCK_TARGET := --python-version 3.11 --python-platform x86_64-manylinux_2_34
LOCK_EXTRAS := --extra dev --extra train --extra package
TORCH_FIND_LINKS ?= $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
LOCK_TORCH := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX) --index-strategy \
	unsafe-best-match,$(foreach d,$(TORCH_FIND_LINKS),--find-links $(d)))
lock:
	test -x build/lock-venv/bin/uv || { $(PYTHON) -m venv build/lock-venv && \
		build/lock-venv/bin/pip install -q "uv==$(UV_VERSION)"; }
	build/lock-venv/bin/uv pip compile --no-config --upgrade --quiet $(LOCK_TARGET) \
		--custom-compile-command "make lock" pyproject.toml requirements/cpu.in \
		--extra cpu $(LOCK_EXTRAS) $(LOCK_TORCH) -o requirements/cpu.lock
	build/lock-venv/bin/uv pip compile --no-config --upgrade --quiet $(LOCK_TARGET) \
		--custom-compile-command "make lock" pyproject.toml requirements/cuda.in \
		--extra gpu $(LOCK_EXTRAS) --extra timm --generate-hashes -o requirements/cuda.lock
	build/lock-venv/bin/uv pip compile --no-config --upgrade --quiet $(LOCK_TARGET) \
		--custom-compile-command "make lock" pyproject.toml requirements/cpu.in \
		--extra cpu $(LOCK_EXTRAS) --extra cluster -c requirements/cpu.lock $(LOCK_TORCH) \
		-o requirements/cpu-cluster.lock
	build/lock-venv/bin/uv pip compile --no-config --upgrade --quiet $(LOCK_TARGET) \
		--custom-compile-command "make lock" pyproject.toml requirements/cuda.in \
		--extra gpu $(LOCK_EXTRAS) --extra timm --extra cluster -c requirements/cuda.lock \
		--generate-hashes \
		-o requirements/cuda-cluster.lock
	@! grep -q "^onnxruntime==" requirements/cuda.lock requirements/cuda-cluster.lock || \
		{ echo "a cuda lock holds onnxruntime beside onnxruntime-gpu"; exit 1; }
	@! grep -q -E "^(nvidia-|onnxruntime-gpu)" requirements/cpu.lock \
		requirements/cpu-cluster.lock || { echo "a cpu lock holds CUDA packages"; exit 1; }

run: $(STAMP)
	$(PY) -m fewshot_studio --demo

test: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q
	$(PY) -m ruff check fewshot_studio tests benchmarks

# The Ray tests (tests/test_cluster.py, slow ones included: a real local Ray with 2 CPUs, about a
# minute), after installing the cluster extra from its lock; skipped with a message when Ray
# cannot be installed (no wheel for this platform, no registry).
$(CLUSTER_STAMP): $(CLUSTER_LOCK) $(STAMP)
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) -r $(CLUSTER_LOCK)
	touch $(CLUSTER_STAMP)

test-cluster: $(STAMP)
	@if $(MAKE) --no-print-directory $(CLUSTER_STAMP); then \
		QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q -m "slow or not slow" tests/test_cluster.py; \
	else \
		echo "test-cluster: skipped: could not install the cluster extra ($(CLUSTER_LOCK))"; \
	fi

lint: $(STAMP)
	$(PY) -m ruff check fewshot_studio tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/train_speed.py
	$(PY) benchmarks/label_speed.py

# One-folder desktop app in dist/fewshot-studio/ (PyInstaller; packaging/fewshot_studio.spec).
# PyInstaller is in the lock (the package extra).
package: $(STAMP)
	$(PY) -m PyInstaller --noconfirm --clean --distpath dist --workpath build/pyinstaller \
		packaging/fewshot_studio.spec
	@du -sh dist/fewshot-studio

# The built bundle's --version, checkpoints and --demo --screenshot, headless (a slow test).
package-test: package
	FEWSHOT_BUNDLE=dist/fewshot-studio QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q -m slow \
		tests/test_packaging.py

clean:
	rm -rf $(VENV) build dist *.egg-info
