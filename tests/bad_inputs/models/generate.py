"""Regenerate the small model fixtures in this folder: `python tests/bad_inputs/models/generate.py`.

They are committed (a few KB each) so the catalog is plain files; this script documents how each
one was made. Every folder shares a 16-token word-level tokenizer, so loading the tokenizer works
and the case fails exactly where it is meant to: at the weights or the architecture.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
WORDS = [
    "<unk>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "user",
    "assistant",
    "system",
    "yes",
    "no",
    "maybe",
    "the",
    "a",
    "is",
    "?",
    ".",
    "hello",
]


def tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        eos_token_id=3,
    )
    return LlamaForCausalLM(config)


def fresh(name: str) -> Path:
    folder = HERE / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    tokenizer().save_pretrained(folder)
    return folder


def main() -> None:
    # The one good model: data and recipe cases load it in milliseconds and fail where they mean to.
    folder = fresh("tiny-llama")
    tiny_llama().save_pretrained(folder, safe_serialization=True)

    # A download cut short: the safetensors header promises more bytes than the file holds.
    folder = fresh("corrupt-safetensors")
    tiny_llama().save_pretrained(folder, safe_serialization=True)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])

    # Loadable pickled weights: refused by policy, not because they are broken.
    folder = fresh("pickle-only")
    model = tiny_llama()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")

    # config.json and tokenizer, no weights at all.
    folder = fresh("no-weights")
    tiny_llama().config.save_pretrained(folder)

    # Tokenizer files but no config.json: not a Hugging Face model folder.
    fresh("no-config")

    # An architecture only its author's Python code defines: needs trust_remote_code.
    folder = fresh("remote-code")
    model = tiny_llama()
    model.save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="acme_llm",
        architectures=["AcmeForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_acme.AcmeConfig",
            "AutoModelForCausalLM": "modeling_acme.AcmeForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    # Named .gguf, but text: no GGUF magic bytes.
    (HERE / "not-a-model.gguf").write_text("this is a text file, not GGUF\n")

    # A valid GGUF of a non-Llama architecture (GPT-2), a few KB.
    import gguf

    writer = gguf.GGUFWriter(HERE / "gpt2-tiny.gguf", "gpt2")
    writer.add_name("gpt2-tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_head_count(2)
    writer.add_layer_norm_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(WORDS)
    writer.add_token_types([gguf.TokenType.NORMAL] * len(WORDS))
    writer.add_token_merges([])
    writer.add_tensor("token_embd.weight", np.zeros((len(WORDS), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    for path in HERE.rglob("*"):
        if path.is_file():
            path.chmod(0o644)  # save_pretrained writes owner-only files


if __name__ == "__main__":
    main()
