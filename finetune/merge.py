"""Merge a finished run's adapter into a full-precision base (or, for QLoRA, the dequantized nf4 weights it was
trained against), check that the merged model computes what base + adapter computes, and save it with merge.json."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch

from finetune import model as model_lib
from finetune import parity, runs
from finetune.errors import FinetuneError, first_line
from finetune.inference import training_tokenizer
from finetune.recipe import Recipe

log = logging.getLogger(__name__)

# Merge and unmerged adapter differ only by rounding of W + BA in the dtype the model is held in.
# fp32 is measured (~1e-4 on SmolLM2-135M); the half-precision bounds are allowances, not measurements.
MERGE_THRESHOLDS = {torch.float32: 1e-3, torch.float16: 0.5, torch.bfloat16: 2.0}


def _check_output(output: Path, marker: str) -> None:
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not (output / marker).is_file())):
        raise FinetuneError(
            f"{output}: exists and is not an earlier output of this step (no {marker}); choose another output folder "
            "or remove it"
        )


def _full_precision_section(recipe: Recipe):
    return recipe.model.model_copy(update={"quantization": "none"})


def _load_adapter(base, adapter_dir: Path):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)
    except (ValueError, KeyError, RuntimeError) as e:
        raise FinetuneError(
            f"{adapter_dir}: the adapter does not fit the base model ({first_line(e)}); merge with the recipe.yaml "
            "the run "
            "was trained with"
        ) from None


def _dequantized_weights(nf4_model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights the nf4 model actually computes with: each Linear4bit dequantized, on the CPU."""
    import bitsandbytes as bnb

    weights = {}
    for name, module in nf4_model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            weights[f"{name}.weight"] = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype).cpu()
    if not weights:
        raise FinetuneError(
            "model.quantization: nf4: the loaded base has no 4-bit layers to dequantize; check the bitsandbytes install"
        )
    return weights


def _merged_model(recipe: Recipe, adapter_dir: Path, prompts, weights: dict[str, torch.Tensor] | None = None):
    """Full-precision base (optionally with `weights` swapped in) + adapter, merged; with the merge's own logit gap."""
    base, _ = model_lib.load(_full_precision_section(recipe), for_training=False)
    if weights is not None:
        params = dict(base.named_parameters())
        missing = [name for name in weights if name not in params]
        if missing:
            raise FinetuneError(
                f"model.base: {recipe.model.base}: the nf4 and full-precision models have different layers "
                f"({missing[0]}); the base checkpoint changed since training"
            )
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value.to(params[name].device))
    peft_model = _load_adapter(base, adapter_dir)
    unmerged = parity.logits(peft_model, prompts)
    merged = peft_model.merge_and_unload()
    merged_logits = parity.logits(merged, prompts)
    return merged, unmerged, merged_logits


def _qlora_targets(recipe: Recipe, adapter_dir: Path, prompts, target: str) -> tuple[object, list, list, dict, str]:
    """Both merge targets of a QLoRA run, measured against the nf4 model + adapter that was trained."""
    log.info("QLoRA run: measuring the nf4 base + adapter the model was trained as")
    nf4_base, _ = model_lib.load(recipe.model, for_training=False)
    # Before the adapter wraps the layers (and renames them to ...base_layer).
    weights = _dequantized_weights(nf4_base, model_lib.compute_dtype(recipe.model))
    trained_model = _load_adapter(nf4_base, adapter_dir)
    trained = parity.logits(trained_model, prompts)
    del trained_model, nf4_base

    figures, candidates = {}, {}
    for name, swap in (("base", None), ("dequantized", weights)):
        log.info(
            "QLoRA run: merging into the %s weights", "original full-precision" if swap is None else "dequantized nf4"
        )
        merged, unmerged, merged_logits = _merged_model(recipe, adapter_dir, prompts, swap)
        figures[name] = {
            "vs_trained": parity.compare(trained, merged_logits),
            "merge": parity.compare(unmerged, merged_logits),
        }
        log.info(
            "target %s: vs trained nf4+adapter max |Δlogit| %.3g, top-1 agreement %.3f",
            name,
            figures[name]["vs_trained"]["max_abs_logit_diff"],
            figures[name]["vs_trained"]["top1_agreement"],
        )
        if target in ("auto", name):  # an explicit target needs only the other one's figures, not its weights
            candidates[name] = (merged, unmerged, merged_logits)
        del merged
    if target == "auto":
        # The original weights are the usual choice; ship the dequantized ones only when they reproduce the trained
        # model better.
        better = (
            figures["dequantized"]["vs_trained"]["top1_agreement"] > figures["base"]["vs_trained"]["top1_agreement"]
        )
        chosen = "dequantized" if better else "base"
        log.info(
            "target auto: writing the %s target (higher top-1 agreement with the trained model, ties go to base)",
            chosen,
        )
    else:
        chosen = target
    merged, unmerged, merged_logits = candidates.pop(chosen)
    candidates.clear()
    return merged, unmerged, merged_logits, figures, chosen


def _generation_config(merged, tokenizer):
    config = merged.generation_config
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    eos = [e for e in eos if e is not None]
    if tokenizer.eos_token_id not in eos:
        eos.insert(0, tokenizer.eos_token_id)
    config.eos_token_id = eos[0] if len(eos) == 1 else eos
    config.pad_token_id = tokenizer.pad_token_id
    merged.config.pad_token_id = tokenizer.pad_token_id
    return config


def merge(run_dir: str | os.PathLike, output: str | os.PathLike | None = None, target: str = "auto") -> dict:
    """Merge the run's adapter into a full-precision base and save it (safetensors, tokenizer, chat template).

    target: for QLoRA runs, merge into the original full-precision weights ("base"), into the
    dequantized nf4 weights the adapter was trained against ("dequantized"), or pick by which
    reproduces the trained model's greedy tokens better ("auto"). Other runs have one target.
    Returns the figures written to OUTPUT/merge.json.
    """
    if target not in ("auto", "base", "dequantized"):
        raise FinetuneError(f"merge --target: expected auto, base or dequantized, got {target!r}")
    start = time.perf_counter()
    run_dir = Path(run_dir)
    recipe = runs.finished_recipe(run_dir)
    adapter_dir = runs.RunFolder(run_dir).adapter
    output = Path(output) if output is not None else runs.RunFolder(run_dir).merged
    _check_output(output, "merge.json")
    qlora = recipe.model.quantization == "nf4"
    if recipe.model.quantization == "int8":
        log.warning(
            "int8 run: merging into the full-precision base; the trained model computed with int8 weights, so expect "
            "a small gap"
        )
    if target == "dequantized" and not qlora:
        raise FinetuneError(
            f"merge --target dequantized: {run_dir} was not trained on an nf4 base "
            f"(model.quantization={recipe.model.quantization}); use --target auto or base"
        )

    tokenizer = training_tokenizer(adapter_dir)
    prompts = parity.prompt_ids(tokenizer)
    dtype = model_lib.compute_dtype(_full_precision_section(recipe))
    figures, chosen = None, None
    if qlora:
        merged, unmerged, merged_logits, figures, chosen = _qlora_targets(recipe, adapter_dir, prompts, target)
    else:
        log.info(
            "merging %s adapter into %s (%s)", recipe.adapter.type, recipe.model.base, str(dtype).removeprefix("torch.")
        )
        merged, unmerged, merged_logits = _merged_model(recipe, adapter_dir, prompts)
    check = parity.compare(unmerged, merged_logits)
    threshold = MERGE_THRESHOLDS.get(dtype, MERGE_THRESHOLDS[torch.bfloat16])
    log.info(
        "merge check: max |Δlogit| base+adapter vs merged = %.3g (threshold %.3g), top-1 agreement %.3f",
        check["max_abs_logit_diff"],
        threshold,
        check["top1_agreement"],
    )
    if not check["max_abs_logit_diff"] <= threshold:  # also catches NaN
        raise FinetuneError(
            f"{run_dir}: merged model differs from base+adapter by max |Δlogit| {check['max_abs_logit_diff']:.3g} "
            f"(threshold {threshold:g} for {dtype}); nothing was written; use the adapter unmerged and report this"
        )
    report = {
        "run_dir": str(run_dir),
        "output": str(output),
        "base": recipe.model.base,
        "adapter_type": recipe.adapter.type,
        "quantization": recipe.model.quantization,
        "dtype": str(dtype).removeprefix("torch."),
        "device": model_lib.device(),
        "prompts": len(parity.PROMPTS),
        "max_abs_logit_diff": check["max_abs_logit_diff"],
        "top1_agreement": check["top1_agreement"],
        "threshold": threshold,
        "target": chosen or "base",
        "targets": figures,
        "seconds": None,
    }
    _save_merged(merged, tokenizer, output, report, start, model_lib.sentencepiece_file(recipe.model))
    return report


def _save_merged(merged, tokenizer, output: Path, report: dict, start: float, sentencepiece: Path | None) -> None:
    runs.remove_partials(output)
    with runs.staged(output, folder=True) as tmp:
        merged.config.dtype = next(merged.parameters()).dtype
        if hasattr(merged.config, "quantization_config"):
            del merged.config.quantization_config
        merged.generation_config = _generation_config(merged, tokenizer)
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if sentencepiece is not None:
            shutil.copy(sentencepiece, tmp / "tokenizer.model")
        (tmp / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
        report["seconds"] = round(time.perf_counter() - start, 1)
        runs.write_json(tmp / "merge.json", report)
    log.info("merged model written to %s (%.1f s)", output, report["seconds"])


def describe(report: dict) -> str:
    """The merge's figures in a few lines, as `finetune merge` prints them."""
    lines = [
        f"merged into {report['output']} (target: {report['target']}): max |Δlogit| vs base+adapter "
        f"{report['max_abs_logit_diff']:.3g}, top-1 agreement {report['top1_agreement']:.3f}"
    ]
    for name, figures in (report.get("targets") or {}).items():
        trained = figures["vs_trained"]
        lines.append(
            f"  {name:<12} vs the trained nf4 model: max |Δlogit| {trained['max_abs_logit_diff']:.3g}, "
            f"top-1 agreement {trained['top1_agreement']:.3f}"
        )
    return "\n".join(lines)
