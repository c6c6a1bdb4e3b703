# Every target creates/refreshes .venv itself: on a fresh machine `make demo` and
# `make test` are the whole set-up.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv assets demo test test-arm64 lint typecheck bench deb clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

assets: $(STAMP)
	$(PY) -m tests.assets >/dev/null

demo: assets
	$(VENV)/bin/edgeward demo

test: assets
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -n 2 --dist loadfile

# The suite inside an emulated arm64 Debian root (root only: binfmt_misc, chroot, mounts).
# ARM64_MODE=full (default) runs every test; smoke runs the platform subset CI runs.
ARM64_MODE ?= full
test-arm64: assets
	HOST_PY=$(abspath $(PY)) bash .ci/arm64.sh $(ARM64_MODE)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

typecheck: $(STAMP)
	$(VENV)/bin/mypy

bench: assets
	$(PY) -m pip install -q 'torch==2.13.0'
	$(PY) -m bench.run

# Debian packages for both architectures, built on any host from wheels (systemd/deb/build.py,
# docs/INSTALL.md): dist/edgeward_<version>_{amd64,arm64}.deb
deb: $(STAMP)
	$(PY) systemd/deb/build.py --arch amd64 --wheelhouse .cache/wheels/amd64
	$(PY) systemd/deb/build.py --arch arm64 --wheelhouse .cache/wheels/arm64

clean:
	rm -rf dist $(VENV) .cache/assets/*.onnx .cache/assets/*.tflite bench/work
