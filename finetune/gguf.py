"""Write a merged Llama model as a GGUF file for llama.cpp / Ollama (with its Modelfile), and verify it."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from finetune import gguf_check, gguf_vocab, parity, runs
from finetune.errors import FinetuneError
from finetune.gguf_vocab import package as _gguf
from finetune.inference import training_tokenizer
from finetune.merge import merge
from finetune.modelfile import write_modelfile
from finetune.recipe import Recipe

log = logging.getLogger(__name__)

GGUF_OUTTYPES = ("f32", "f16", "q8_0", "q4_k_m", "q5_k_m", "q6_k")


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
        raise FinetuneError(
            f"{merged_dir}: no .safetensors weights; give a merged model folder (finetune merge) or a run folder"
        )
    entries = []
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and config.tie_word_embeddings):
                    continue
                new = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
                if new is None:
                    raise FinetuneError(
                        f"{file}: tensor {key} has no llama.cpp name; only plain Llama checkpoints can be exported to "
                        "GGUF"
                    )
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
        raise FinetuneError(
            f"{merged_dir}/config.json: rope type {rope.get('rope_type')!r} is not supported by GGUF export; export "
            "safetensors instead"
        )
    writer.add_vocab_size(config.vocab_size)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[outtype]
    writer.add_file_type(file_type)
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    gguf_vocab.write(writer, tokenizer, merged_dir, config.vocab_size)


def _resolve_export_source(path: Path) -> tuple[Path, Path | None, Recipe | None]:
    """(merged folder, run folder or None, recipe or None) for a run folder or a merged folder."""
    if runs.RunFolder(path).summary.is_file() or runs.RunFolder(path).recipe.is_file():
        run_dir, recipe = path, runs.finished_recipe(path)
        merged_dir = runs.RunFolder(run_dir).merged
        if not (merged_dir / "merge.json").is_file():
            log.info("%s has no merged model yet: merging first", run_dir)
            merge(run_dir)
        return merged_dir, run_dir, recipe
    if not (path / "config.json").is_file():
        raise FinetuneError(
            f"{path}: neither a run folder (run.json) nor a merged model folder (config.json); give one of them"
        )
    parent = path.parent
    if runs.RunFolder(parent).finished:
        return path, parent, runs.finished_recipe(parent)
    return path, None, None


def export(
    path: str | os.PathLike, outtype: str = "f16", output: str | os.PathLike | None = None, verify: bool = True
) -> Path:
    """Write NAME-OUTTYPE.gguf and an Ollama Modelfile for a run folder (merging first if needed) or a merged folder.

    Output goes to RUN_DIR/gguf (or OUTPUT). f32, f16 and q8_0 are written directly; K-quants (q4_k_m, q5_k_m,
    q6_k) are made from an f16 file by llama.cpp's quantizer. With verify, the file is checked in llama.cpp (see
    gguf_check) before it is put in place; the figures, and which verifier ran, go to export.json beside it.
    """
    from transformers import AutoConfig

    if outtype not in GGUF_OUTTYPES:
        raise FinetuneError(f"export --gguf: expected one of {', '.join(GGUF_OUTTYPES)}, got {outtype!r}")
    if outtype in gguf_check.KQUANT_TYPES and gguf_check.llama_cpp_version() is None:
        gguf_check.quantize(Path(), Path(), outtype)  # the one-line error, before anything is merged or written
    start = time.perf_counter()
    merged_dir, run_dir, recipe = _resolve_export_source(Path(path))
    out_dir = (
        Path(output)
        if output is not None
        else (runs.RunFolder(run_dir).gguf if run_dir else merged_dir.with_name(merged_dir.name + "-gguf"))
    )
    name = recipe.name if recipe else merged_dir.name
    target = out_dir / f"{name}-{outtype}.gguf"
    config = AutoConfig.from_pretrained(merged_dir)
    if config.model_type != "llama":
        raise FinetuneError(
            f"{merged_dir}: model type {config.model_type!r}; GGUF export supports Llama-architecture models only"
        )
    tokenizer = training_tokenizer(merged_dir)
    runs.remove_partials(target)
    figures = {"file": target.name, "outtype": outtype}
    # Checked before it is put in place: a file that does not reproduce the model is never left behind.
    with runs.staged(target) as tmp:
        if outtype in gguf_check.KQUANT_TYPES:
            # The f16 file the quantizer reads is scratch, beside the target (same disk), removed in any case.
            f16 = tmp.with_name(f"{tmp.name}-f16")
            try:
                figures["tensors"] = _write(f16, config, name, "f16", merged_dir, tokenizer)
                gguf_check.quantize(f16, tmp, outtype)
                if verify:
                    figures.update(
                        gguf_check.compare_quant(f16, tmp, heldout_texts(recipe, tokenizer), outtype, target.name)
                    )
            finally:
                f16.unlink(missing_ok=True)
        else:
            figures["tensors"] = _write(tmp, config, name, outtype, merged_dir, tokenizer)
            if verify:
                figures.update(gguf_check.verify(tmp, merged_dir, outtype))
        figures.update(bytes=tmp.stat().st_size, seconds=round(time.perf_counter() - start, 1))
    modelfile = write_modelfile(target, tokenizer.chat_template, recipe.data.system_prompt if recipe else None, config)
    figures["modelfile"] = modelfile.name
    report = runs.read_json(out_dir / "export.json") or {}
    report.setdefault("merged", str(merged_dir))
    report.setdefault("files", {})[target.name] = figures
    runs.write_json(out_dir / "export.json", report)
    return target


def _write(path: Path, config, name: str, outtype: str, merged_dir: Path, tokenizer) -> int:
    """The GGUF file itself: metadata, vocabulary, chat template, then the tensors; returns the tensor count."""
    gguf = _gguf()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _write_metadata(writer, config, name, outtype, merged_dir, tokenizer, head_dim)
    count = _write_tensors(writer, merged_dir, config, outtype, head_dim)
    writer.close()
    return count


def heldout_texts(recipe: Recipe | None, tokenizer, rows: int = 8) -> list[str]:
    """Rows no training saw, chat-rendered, for a K-quant's perplexity: the first examples of the run's eval suite
    with their answers; the parity prompts when the run has no suite (or is a bare merged folder)."""
    from finetune.eval.prompts import examples
    from finetune.pipeline import eval_suite

    conversations = [list(m) for m in parity.PROMPTS]
    suite = eval_suite(recipe) if recipe is not None else None
    if suite is not None:
        from finetune.eval import load_suite

        chosen = load_suite(suite)
        task = next(iter(chosen.tasks.values()))
        items = examples(task, recipe.data.system_prompt, chosen.seed, n=rows)
        answer = (lambda it: it["answer"]) if task.kind == "mcq" else (lambda it: it["answer"])
        conversations = [it["messages"] + [{"role": "assistant", "content": answer(it)}] for it in items]
    return [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]


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
            writer.add_tensor_info(
                new, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=gguf.GGMLQuantizationType.Q8_0
            )
        else:
            writer.add_tensor_info(new, shape, np.dtype(np.float16), 2 * math.prod(shape))
    if rope_freqs is not None:
        writer.add_tensor_info(
            gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
            rope_freqs.shape,
            rope_freqs.dtype,
            rope_freqs.nbytes,
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, file, key in entries:
        data, _ = _gguf_tensor(_load_tensor(file, key, config), outtype)
        writer.write_tensor_data(data)
    if rope_freqs is not None:
        writer.write_tensor_data(rope_freqs)
    return len(entries) + (rope_freqs is not None)


def describe(path: Path) -> str:
    """What `finetune export` prints: the files written, how they were checked, and the Ollama command."""
    figures = runs.read_json(path.parent / "export.json")["files"][path.name]
    modelfile = path.parent / figures["modelfile"]
    lines = [
        f"wrote {path} ({figures['tensors']} tensors, {figures['bytes'] / 1e6:.1f} MB, {figures['seconds']:.1f} s) "
        f"and {modelfile}"
    ]
    if "max_abs_logit_diff" in figures:
        lines.append(
            f"  read back in {figures['verifier']}: max |Δlogit| vs merged {figures['max_abs_logit_diff']:.3g} "
            f"(threshold {figures['threshold']:g}), greedy text agreement {figures['greedy_text_agreement']:.2f}, "
            f"tokenization agreement {figures['tokenization_agreement']:.2f}"
        )
    if "top1_agreement_with_f16" in figures:
        outtype = figures["outtype"]
        lines.append(
            f"  vs its f16 file in llama.cpp on {figures['heldout_rows']} held-out rows: top-1 agreement "
            f"{figures['top1_agreement_with_f16']:.3f} (at least {gguf_check.KQUANT_MIN_TOP1:g}), perplexity "
            f"{figures[f'perplexity_{outtype}']:.2f} vs {figures['perplexity_f16']:.2f} "
            f"(x{figures['perplexity_ratio']:.2f}, at most {gguf_check.KQUANT_MAX_PERPLEXITY_RATIO:g})"
        )
    lines.append(f"  ollama create NAME -f {modelfile}")
    return "\n".join(lines)
