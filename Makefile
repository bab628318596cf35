# gristmill: `make demo` runs the embedded workflow end to end, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch; a machine with GPUs installs its CUDA build first (any torch>=2.4,<3 works).
TORCH ?= torch==2.13.0

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: install
	$(BIN)/gristmill run workflows/quickstart.yaml
	$(BIN)/gristmill status runs/quickstart
	$(BIN)/gristmill sample runs/quickstart/train --prompt "The database" --max-new-tokens 40

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .

bench: install
	for name in crawl extract filters dedup pii tokenizer_pack train classify finetune scale; do $(BIN)/python -m benchmarks.$$name --quick | tail -n 1; done

clean:
	rm -rf runs .pytest_cache
