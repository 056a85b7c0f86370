"""Shared fixtures: the embedded model's folder and tokenizer, and a tiny random Llama saved with that tokenizer."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests own their state: converted models, token and eval caches go to a folder of this session, never the user's
# ~/.cache/finetune (subprocesses, notebooks and the CLI inherit it through the environment).
SESSION_CACHE = tempfile.mkdtemp(prefix="finetune-test-cache-")
os.umask(0o022)  # the file-mode tests assert what a plain write gives under the usual umask
os.environ["FINETUNE_CACHE"] = SESSION_CACHE


def pytest_unconfigure(config):
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)


PROJECT = Path(__file__).resolve().parent.parent
SHARED_DATA = PROJECT.parent / "shared" / "data"


def shared_data(relative: str) -> Path:
    """A file under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"../shared/data/{relative} is absent (tests on real data need ../shared beside the project)")
    return path


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from finetune.model import convert_gguf, embedded_gguf

    return convert_gguf(embedded_gguf())


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from finetune.model import load_tokenizer
    from finetune.recipe import ModelSection

    return load_tokenizer(str(embedded_dir), ModelSection())


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, embedded_dir) -> Path:
    """A 2-layer, hidden-64 random Llama with the embedded model's real tokenizer, saved as a local HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        # The default init (std 0.02) gives near-uniform logits that a LoRA cannot sharpen in a few steps;
        # a wider init makes "the loss goes down" a real signal (11.5 -> ~4 in 24 steps at lr 5e-3).
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
