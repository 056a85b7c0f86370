"""Load a finished run (base + adapter, with the training chat template) and generate from it."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from finetune import model as model_lib
from finetune.errors import FinetuneError
from finetune.recipe import Recipe, validate


def run_recipe(run_dir: Path) -> Recipe:
    """The resolved recipe of a finished run folder; refuses folders that are not finished runs."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FinetuneError(f"{run_dir}: no such run folder; give the output folder of `finetune run` (train.output_dir)")
    recipe_file = run_dir / "recipe.yaml"
    if not recipe_file.is_file():
        raise FinetuneError(f"{run_dir}: not a run folder (no recipe.yaml); give the output folder of `finetune run`")
    if not (run_dir / "run.json").is_file():
        raise FinetuneError(f"{run_dir}: the run is incomplete (no run.json); finish or resume it with `finetune run`")
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        raise FinetuneError(f"{run_dir}/adapter: no adapter_config.json; the run folder is damaged, train again")
    try:
        data = yaml.safe_load(recipe_file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise FinetuneError(f"{recipe_file}: invalid YAML ({str(e).splitlines()[0]}); the run folder is damaged, train again") from None
    return validate(data, str(recipe_file))


def load_run(run_dir: Path):
    """(model, tokenizer) of a finished run: the base loaded as in training plus the adapter, in eval mode."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    recipe = run_recipe(run_dir)
    adapter = run_dir / "adapter"
    base, _ = model_lib.load(recipe.model, for_training=False)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(base, adapter)
    model.eval()
    return model, tokenizer


@torch.inference_mode()
def generate(model, tokenizer, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0) -> str:
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True).to(model.device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
