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


def chat_prompt(tokenizer, messages: list[dict], device) -> torch.Tensor:
    """The conversation rendered with the training chat template, ready for the assistant's turn (batch of one)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return torch.tensor([ids["input_ids"]], device=device)


@torch.inference_mode()
def continue_ids(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    streamer=None,
) -> torch.Tensor:
    """The new token ids after the prompt's: greedy at temperature 0, sampled otherwise; stops at EOS."""
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    )
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
        **sampling,
    )
    return output[0, input_ids.shape[1] :]


def generate(model, tokenizer, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0) -> str:
    """The model's reply to a conversation: greedy by default, sampled when temperature > 0."""
    ids = continue_ids(model, tokenizer, chat_prompt(tokenizer, messages, model.device), max_new_tokens, temperature)
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
