"""A GGUF checked where it is used: llama.cpp (llama-cpp-python, the engine Ollama runs) loads it and must reproduce
the merged model: next-token logits on fixed chat prompts, greedy text, and the tokens of the chat-templated prompt
(rendered by the template inside the GGUF). K-quants are made by llama.cpp's own quantizer and compared with the
f16 file: top-1 agreement and perplexity on held-out rows.

Without llama-cpp-python (`make setup-llamacpp`), transformers' GGUF reader is the fallback; it accepts files that
llama.cpp refuses, so export.json records which verifier ran.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import importlib.util
import logging
import math
from pathlib import Path

import numpy as np
import torch

from finetune import parity
from finetune.errors import FinetuneError
from finetune.inference import training_tokenizer

log = logging.getLogger(__name__)

# Largest max |Δlogit| against the merged model (computed in float32 by PyTorch) that a file may show, per type,
# measured on the embedded SmolLM2-135M (f32 0.034, f16 0.076, q8_0 1.70; llama.cpp keeps its KV cache in f16)
# and the tiny test Llama, with room for other CPUs' kernels.
LOGIT_THRESHOLDS = {"f32": 0.1, "f16": 0.3, "q8_0": 3.0}
# A K-quant must agree with its f16 file on most next tokens of the held-out rows, and not lose much perplexity.
KQUANT_MIN_TOP1 = 0.75
KQUANT_MAX_PERPLEXITY_RATIO = 1.5
KQUANT_TYPES = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}


def llama_cpp_version() -> str | None:
    """llama-cpp-python's version when it is installed, else None."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    return importlib.metadata.version("llama-cpp-python")


@contextlib.contextmanager
def _quiet_llama_cpp():
    """llama.cpp logs every tensor it loads or quantizes to stderr; keep it to --debug."""
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    if not log.isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load(path: Path, n_ctx: int = 1024, logits_all: bool = True):
    """The GGUF in llama.cpp, quiet; a file llama.cpp refuses is a one-line error."""
    from llama_cpp import Llama

    with _quiet_llama_cpp():
        try:
            return Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                logits_all=logits_all,
                verbose=False,
                n_threads=torch.get_num_threads(),
            )
        except (ValueError, RuntimeError) as e:  # llama.cpp refused the file: the user must never get it
            raise FinetuneError(
                f"{path.name}: llama.cpp cannot load the GGUF just written ({e}); report this"
            ) from None


def close(llm) -> None:
    """Free the model; llama.cpp reports its buffers as it tears the context down, so this is quiet too."""
    with _quiet_llama_cpp():
        llm.close()


def _logits(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def _greedy_ids(llm, ids: list[int], eos: set[int]) -> list[int]:
    out = []
    for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if token in eos or len(out) == parity.GREEDY_TOKENS:
            break
    return out


def verify(gguf_path: Path, merged_dir: Path, outtype: str) -> dict:
    """Figures of the GGUF against the merged model, from llama.cpp when it is installed (else transformers); a file
    that does not reproduce the model is refused before it is put in place."""
    from transformers import AutoModelForCausalLM

    tokenizer = training_tokenizer(merged_dir)
    prompts = parity.prompt_ids(tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    reference = parity.logits(merged, prompts)
    reference_ids = [
        ids[0, len(p[0]) :].tolist() for ids, p in zip(parity.greedy_ids(merged, tokenizer, prompts), prompts)
    ]
    del merged
    version = llama_cpp_version()
    if version is None:
        log.warning(
            "llama-cpp-python is not installed: checking the GGUF with transformers, which accepts files "
            "llama.cpp refuses (make setup-llamacpp installs it)"
        )
        figures = _transformers_figures(gguf_path, tokenizer, prompts, reference, reference_ids)
        figures["verifier"] = "transformers (llama-cpp-python not installed)"
    else:
        figures = _llama_cpp_figures(gguf_path, tokenizer, prompts, reference, reference_ids)
        figures["verifier"] = f"llama.cpp (llama-cpp-python {version})"
    log.info(
        "GGUF %s in %s: max |Δlogit| %.3g, top-1 agreement %.3f, greedy text %.2f, tokenization %.2f",
        outtype,
        figures["verifier"],
        figures["max_abs_logit_diff"],
        figures["top1_agreement"],
        figures["greedy_text_agreement"],
        figures["tokenization_agreement"],
    )
    threshold = LOGIT_THRESHOLDS[outtype]
    figures["threshold"] = threshold
    if not figures["max_abs_logit_diff"] <= threshold or figures["tokenization_agreement"] < 1.0:
        raise FinetuneError(
            f"{merged_dir}: the {outtype} GGUF does not reproduce the merged model in {figures['verifier']} (max "
            f"|Δlogit| {figures['max_abs_logit_diff']:.3g}, threshold {threshold:g}; tokenization agreement "
            f"{figures['tokenization_agreement']:.2f}); nothing was written; report this"
        )
    return figures


def _llama_cpp_figures(gguf_path: Path, tokenizer, prompts, reference, reference_ids) -> dict:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = load(gguf_path)
    logits = [_logits(llm, p[0].tolist()) for p in prompts]
    figures = parity.compare(reference, logits)
    eos = {tokenizer.eos_token_id, llm.token_eos()}
    greedy = [_greedy_ids(llm, p[0].tolist(), eos) for p in prompts]
    figures["greedy_text_agreement"] = _agreement(
        [tokenizer.decode(ids) for ids in reference_ids], [tokenizer.decode(ids) for ids in greedy]
    )
    # The prompt as a llama.cpp user gets it: rendered by the GGUF's own chat template, tokenized by llama.cpp (the
    # way llama-cpp-python's chat completion does: no second BOS where the template writes one).
    template = llm.metadata.get("tokenizer.chat_template")
    formatter = Jinja2ChatFormatter(template, eos_token=tokenizer.eos_token or "", bos_token=tokenizer.bos_token or "")
    same = 0
    for messages, ids in zip(parity.PROMPTS, prompts):
        rendered = formatter(messages=messages)
        tokens = llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)
        same += tokens == ids[0].tolist()
    figures["tokenization_agreement"] = same / len(prompts)
    close(llm)
    return figures


def _transformers_figures(gguf_path: Path, tokenizer, prompts, reference, reference_ids) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    back = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    figures = parity.compare(reference, parity.logits(back, prompts))
    greedy = _continuations(parity.greedy_ids(back, tokenizer, prompts), prompts)
    figures["greedy_text_agreement"] = _agreement(
        [tokenizer.decode(ids) for ids in reference_ids], [tokenizer.decode(ids) for ids in greedy]
    )
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    rendered = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in parity.PROMPTS]
    figures["tokenization_agreement"] = _agreement(
        [gguf_tokenizer(t)["input_ids"] for t in rendered], [tokenizer(t)["input_ids"] for t in rendered]
    )
    return figures


def _continuations(outputs: list[torch.Tensor], prompts: list[torch.Tensor]) -> list[list[int]]:
    return [out[0, prompt.shape[1] :].tolist() for out, prompt in zip(outputs, prompts)]


def _agreement(a: list, b: list) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def quantize(source: Path, target: Path, outtype: str) -> None:
    """Quantize an f16 GGUF into a K-quant with llama.cpp's own quantizer (tensors too narrow for 256-wide blocks
    get llama.cpp's fallback types, as its llama-quantize does)."""
    if llama_cpp_version() is None:
        raise FinetuneError(
            f"export --gguf {outtype}: K-quants are made by llama.cpp; run `make setup-llamacpp` "
            "(pip install -e '.[llamacpp]') first, or export f16 / q8_0"
        )
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, KQUANT_TYPES[outtype])
    params.nthread = torch.get_num_threads()
    with _quiet_llama_cpp():
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if code != 0:
        raise FinetuneError(f"export --gguf {outtype}: llama.cpp's quantizer failed on {source.name} (code {code})")


def compare_quant(f16_path: Path, quant_path: Path, texts: list[str], outtype: str, name: str) -> dict:
    """A K-quant against its f16 file in llama.cpp: next-token top-1 agreement and perplexity over held-out rows."""
    figures = {}
    predictions = {}
    for kind, path in (("f16", f16_path), (outtype, quant_path)):
        llm = load(path, n_ctx=2048)
        nll = count = 0.0
        tops = []
        for text in texts:
            ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)[:2048]
            logits = _logits(llm, ids).double()
            targets = torch.tensor(ids[1:])
            nll += float(torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="sum"))
            count += len(ids) - 1
            tops.append(logits[:-1].argmax(-1))
        close(llm)
        figures[f"perplexity_{kind}"] = math.exp(nll / count)
        predictions[kind] = torch.cat(tops)
    figures["top1_agreement_with_f16"] = float((predictions["f16"] == predictions[outtype]).float().mean())
    figures["perplexity_ratio"] = figures[f"perplexity_{outtype}"] / figures["perplexity_f16"]
    figures["heldout_rows"] = len(texts)
    log.info(
        "GGUF %s vs f16 in llama.cpp on %d held-out rows: top-1 agreement %.3f, perplexity %.2f vs %.2f",
        outtype,
        len(texts),
        figures["top1_agreement_with_f16"],
        figures[f"perplexity_{outtype}"],
        figures["perplexity_f16"],
    )
    if (
        figures["top1_agreement_with_f16"] < KQUANT_MIN_TOP1
        or figures["perplexity_ratio"] > KQUANT_MAX_PERPLEXITY_RATIO
    ):
        raise FinetuneError(
            f"{name}: the {outtype} file strays from f16 in llama.cpp (top-1 agreement "
            f"{figures['top1_agreement_with_f16']:.2f}, perplexity x{figures['perplexity_ratio']:.2f}); nothing was "
            "written; use q8_0 or f16 for this model"
        )
    return figures
