"""Model resolution, the tokenizer's pad token and training template, and assistant-only label masking."""

from __future__ import annotations

import pytest

from finetune import model as model_lib
from finetune.data.build import IGNORE, tokenize
from finetune.errors import FinetuneError
from finetune.recipe import ModelSection

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Is the sky blue?"},
    {"role": "assistant", "content": "Yes."},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Green."},
]


def test_pad_is_not_eos_and_template_has_generation_markers(tokenizer):
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.eos_token == "<|im_end|>"
    assert "{%- generation -%}" in tokenizer.chat_template


def test_training_template_renders_like_the_models_own(embedded_dir, tokenizer):
    from transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(embedded_dir)
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == own.apply_chat_template(
        CONVERSATION, tokenize=False
    )


def test_labels_mask_exactly_the_non_assistant_tokens(tokenizer):
    tokens = tokenize(tokenizer, CONVERSATION)
    ids, labels = tokens["input_ids"], tokens["labels"]
    trained = [tokenizer.decode([t]) for t, label in zip(ids, labels) if label != IGNORE]
    # Both assistant contents and each one's end-of-turn token (EOS) are trained; nothing else.
    assert trained == ["Yes", ".", "<|im_end|>", "Green", ".", "<|im_end|>"]
    assert all(label == token for token, label in zip(ids, labels) if label != IGNORE)
    masked_text = tokenizer.decode([t for t, label in zip(ids, labels) if label == IGNORE])
    assert masked_text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nIs the sky blue?<|im_end|>\n"
        "<|im_start|>assistant\n\n<|im_start|>user\nAnd grass?<|im_end|>\n<|im_start|>assistant\n\n"
    )


def test_embedded_model_is_converted_once_and_reused(embedded_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    assert (embedded_dir / "model.safetensors").is_file()

    def converted_again(*args, **kwargs):
        raise AssertionError("a cached conversion must not load the GGUF again")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", converted_again)
    assert model_lib.convert_gguf(model_lib.embedded_gguf()) == embedded_dir


def test_local_folder_loads_through_the_same_function(tiny_llama_dir):
    model, tokenizer = model_lib.load(ModelSection(base=str(tiny_llama_dir)))
    assert model.config.num_hidden_layers == 2
    assert model.dtype.is_floating_point and str(model.dtype) == "torch.float32"
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_loading_on_cpu(tiny_llama_dir, quantization):
    model, _ = model_lib.load(ModelSection(base=str(tiny_llama_dir), quantization=quantization))
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == ("Linear4bit" if quantization == "nf4" else "Linear8bitLt")


@pytest.mark.parametrize(
    ("base", "message"),
    [
        ("/no/such/folder", "model.base: /no/such/folder: no such file or folder"),
        ("missing.gguf", "model.base: missing.gguf: GGUF file not found"),
        (
            "nobody/no-such-model",
            "model.base: nobody/no-such-model: not in the local Hugging Face cache and the Hub cannot be reached",
        ),
    ],
)
def test_missing_models_are_one_line_errors(base, message):
    with pytest.raises(FinetuneError) as error:
        model_lib.load(ModelSection(base=base))
    assert str(error.value).startswith(message)


def test_compute_dtype_is_float32_on_cpu():
    assert str(model_lib.compute_dtype(ModelSection())) == "torch.float32"
    assert str(model_lib.compute_dtype(ModelSection(compute_dtype="bfloat16"))) == "torch.bfloat16"
