"""Load a finished run (base + adapter) or a merged model, each with its training chat template, and generate."""

from __future__ import annotations

from pathlib import Path

import torch

from finetune import model as model_lib
from finetune import runs
from finetune.errors import FinetuneError


def training_tokenizer(folder: Path):
    """The tokenizer saved beside an adapter or merged model, with the chat template training used."""
    from transformers import AutoTokenizer

    template = Path(folder) / "chat_template.jinja"
    if not template.is_file():
        raise FinetuneError(
            f"{folder}: no chat_template.jinja (the training chat template); the run folder is damaged, train again"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = template.read_text(encoding="utf-8")
    model_lib.ensure_pad_token(tokenizer)
    return tokenizer


def load_run(run_dir: Path):
    """(model, tokenizer) of a finished run: the base loaded as in training plus the adapter, in eval mode."""
    from peft import PeftModel

    recipe = runs.finished_recipe(run_dir)
    adapter = runs.RunFolder(Path(run_dir)).adapter
    base, _ = model_lib.load(recipe.model, for_training=False)
    tokenizer = training_tokenizer(adapter)
    model = PeftModel.from_pretrained(base, adapter)
    model.eval()
    return model, tokenizer


def load_merged(folder: Path, dtype: torch.dtype):
    """(model, tokenizer) of a merged model folder, in eval mode on the toolkit's device."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    model.to(model_lib.device())
    model.eval()
    return model, training_tokenizer(folder)


@torch.inference_mode()
def generate(model, tokenizer, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0) -> str:
    """The model's reply to a conversation: greedy by default, sampled when temperature > 0."""
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
