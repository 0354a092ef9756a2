# Quick start:  make demo   (built-in CPU job, no downloads)   |   make test   (the test suite)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# On a machine without CUDA the CPU torch pin keeps pip from pulling a multi-GB CUDA build.
CONSTRAINTS := $(shell $(PYTHON) -c "import shutil,subprocess,sys; sys.stdout.write('' if shutil.which('nvidia-smi') else '-c constraints-cpu.txt')")

.PHONY: install demo test bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt constraints-cpu.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CONSTRAINTS) -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash train_hh.sh

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) bench/train_step.py
	$(PY) bench/generate.py

clean:
	rm -rf demo_out .pytest_cache
