# Two commands on a fresh machine: `make train` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
# Without CUDA, pin the local CPU wheel of torch so no nvidia-* package is ever pulled.
CONSTRAINTS := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints-cpu.txt")

.PHONY: install train test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CONSTRAINTS) -e ".[dev]"
	touch $@

train: install
	$(OFFLINE) $(PY) -m diffuse.train $(ARGS)

# Two pytest workers (pytest-xdist): the tests run one torch thread each, so two cores run two at once.
test: install
	$(OFFLINE) $(PY) -m pytest -n 2 tests $(ARGS)

clean:
	rm -rf $(VENV) experiments/runs .pytest_cache
