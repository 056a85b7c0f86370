"""data.build(): the recipe's sources -> validated rows -> chat rows -> tokens with assistant-only labels (raw-text
documents: tokens ending in EOS, labels on every token).

Policy for long rows: a conversation whose tokens exceed data.max_length is dropped and counted,
never truncated, because truncation would cut the answer (and its EOS) and train the model to
stop mid-sentence. A document longer than max_length is kept: packing splits it. Tokenized rows
are cached under the cache folder, keyed by everything that changes tokens: the tokenizer's
vocabulary and special tokens, the chat template, max_length, the reader versions and the rows
themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
from dataclasses import dataclass, field

from finetune import runs
from finetune.config import resolve_path
from finetune.data import files, formats
from finetune.data.readers import READERS, RawSource, Reader
from finetune.errors import FinetuneError
from finetune.model import cache_dir
from finetune.recipe import DataSection, Recipe, SourceSection

IGNORE = -100  # the label of a position that is not trained (PyTorch's cross-entropy ignore_index)
log = logging.getLogger(__name__)


@dataclass
class Built:
    train: object  # datasets.Dataset with input_ids, labels
    eval: object | None
    stats: dict = field(default_factory=dict)


def raw_source(section: SourceSection) -> RawSource:
    path = resolve_path(section.path) if section.path else None
    return RawSource(
        path=path, hub=section.hub, config=section.config, split=section.split, columns=dict(section.columns)
    )


def read_source(section: SourceSection, on_bad_row: str, seed: int) -> tuple[Reader, list[dict], int]:
    """Validated rows of one source (its limit applied after a seeded shuffle) and the skipped count."""
    reader = READERS[section.reader]
    source = raw_source(section)
    check = formats.CHECKS[reader.kind]
    rows, skipped = [], 0
    with files.skipping_bad_lines() if on_bad_row == "skip" else contextlib.nullcontext([]) as bad_lines:
        for where, record in reader.records(source):
            try:
                rows.append(check(reader.convert(record, where, source), where))
            except FinetuneError:
                if on_bad_row == "error":
                    raise
                skipped += 1
    skipped += len(bad_lines)
    if skipped:
        log.warning("%s: skipped %d malformed record(s) (data.on_bad_row=skip)", source.name, skipped)
    if section.limit is not None and len(rows) > section.limit:
        rows = random.Random(seed).sample(rows, section.limit)
    return reader, rows, skipped


def _mixed(data: DataSection, seed: int, convert) -> tuple[list[dict], dict]:
    """All sources converted to training rows, deduplicated, in a seeded order, with per-source counts."""
    rows, seen, stats = [], set(), {"sources": [], "duplicates": 0}
    for section in data.sources:
        reader, source_rows, skipped = read_source(section, data.on_bad_row, seed)
        stats["sources"].append(
            {"source": section.path or section.hub, "reader": reader.name, "rows": len(source_rows), "skipped": skipped}
        )
        for row in source_rows:
            for converted in convert(row, reader.kind):
                key = json.dumps(converted, sort_keys=True)
                if key in seen:
                    stats["duplicates"] += 1
                    continue
                seen.add(key)
                rows.append(converted)
    if not rows:
        raise FinetuneError("data: the sources gave no rows; check data.sources[].path, split and limit")
    random.Random(seed).shuffle(rows)
    return rows, stats


def chat_rows(data: DataSection, seed: int) -> tuple[list[dict], dict]:
    """Chat rows for SFT: {"messages": [...]}."""
    return _mixed(data, seed, lambda row, kind: [formats.to_sft(row, kind, data.system_prompt, data.explanations)])


def text_rows(data: DataSection, seed: int) -> tuple[list[dict], dict]:
    """Documents for continued pretraining: {"text": str}."""
    return _mixed(data, seed, lambda row, kind: [{"text": row["text"]}])


def preference_rows(data: DataSection, seed: int) -> tuple[list[dict], dict]:
    """Preference pairs for DPO: {"prompt", "chosen", "rejected"} message lists."""
    return _mixed(
        data, seed, lambda row, kind: formats.to_preferences(row, kind, data.system_prompt, data.explanations)
    )


def unpaired_rows(data: DataSection, seed: int) -> tuple[list[dict], dict]:
    """Unpaired rows for KTO: {"prompt", "completion" message lists, "label": desirable or not}."""
    return _mixed(data, seed, lambda row, kind: formats.to_unpaired(row, kind, data.system_prompt, data.explanations))


def _split(rows: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    n_eval = max(1, round(len(rows) * fraction)) if fraction else 0
    if len(rows) - n_eval < 1:
        raise FinetuneError(f"data.eval_fraction: {fraction} leaves no training rows out of {len(rows)}; lower it")
    return rows[n_eval:], rows[:n_eval]


def build_preferences(recipe: Recipe, tokenizer) -> Built:
    """The rows of a preference method as TRL's conversational rows: pairs for DPO and ORPO, unpaired rows for KTO
    (already in a seeded order: KTO samples them in order). Rows longer than max_length are dropped and counted."""
    from datasets import Dataset

    unpaired = recipe.train.method == "kto"
    rows, stats = (unpaired_rows if unpaired else preference_rows)(recipe.data, recipe.train.seed)
    answers = ("completion",) if unpaired else ("chosen", "rejected")

    def fits(row: dict) -> bool:
        longest = max(len(tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=True)) for side in answers)
        return longest <= recipe.data.max_length

    kept = [row for row in rows if fits(row)]
    noun = "unpaired rows" if unpaired else "preference pairs"
    if not kept:
        raise FinetuneError(
            f"data.max_length: all {len(rows)} {noun} are longer than {recipe.data.max_length} tokens; "
            "raise data.max_length"
        )
    if len(kept) < len(rows):
        log.warning(
            "dropped %d %s longer than data.max_length=%d tokens", len(rows) - len(kept), noun, recipe.data.max_length
        )
    train, evaluation = _split(kept, recipe.data.eval_fraction)
    stats.update(train_rows=len(train), eval_rows=len(evaluation), dropped_too_long=len(rows) - len(kept))
    if unpaired:
        stats["desirable_rows"] = sum(row["label"] for row in train)
    return Built(Dataset.from_list(train), Dataset.from_list(evaluation) if evaluation else None, stats)


def tokenize(tokenizer, messages: list[dict]) -> dict:
    """input_ids and labels; labels are -100 except on assistant content and its end-of-turn token."""
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
    if not any(mask):
        raise FinetuneError(
            "model.chat_template: the template marks no assistant tokens; it needs {% generation %} markers around "
            "the assistant content"
        )
    return {"input_ids": ids, "labels": [t if m else IGNORE for t, m in zip(ids, mask)]}


def tokenize_text(tokenizer, text: str) -> dict:
    """A document's input_ids (as the tokenizer encodes text, with its BOS if it adds one) ending in EOS, and labels
    on every token but the first: no token is predicted from the document before it in a pack."""
    ids = list(tokenizer(text)["input_ids"])
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    return {"input_ids": ids, "labels": [IGNORE] + ids[1:]}


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = json.dumps([tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token], sort_keys=True)
    return hashlib.sha256((vocab + special).encode()).hexdigest()


def cache_key(tokenizer, recipe: Recipe, rows: list[dict]) -> str:
    digest = hashlib.sha256()
    for part in (
        tokenizer_fingerprint(tokenizer),
        tokenizer.chat_template,
        str(recipe.data.max_length),
        json.dumps({s.reader: READERS[s.reader].version for s in recipe.data.sources}, sort_keys=True),
        json.dumps(rows, sort_keys=True),
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:24]


def _tokenize_all(tokenizer, rows: list[dict], max_length: int) -> tuple[list[dict], int]:
    """Tokenized rows and how many were too long: conversations longer than max_length are dropped; documents are
    kept, and packing splits them."""
    kept, too_long = [], 0
    for row in rows:
        tokens = tokenize_text(tokenizer, row["text"]) if "text" in row else tokenize(tokenizer, row["messages"])
        if len(tokens["input_ids"]) > max_length:
            too_long += 1
            if "text" not in row:
                continue
        kept.append(tokens)
    return kept, too_long


def build(recipe: Recipe, tokenizer) -> Built:
    """SFT rows tokenized with assistant-only labels (or raw-text documents with labels on every token), split into
    train / eval, with statistics; cached by content."""
    from datasets import Dataset, load_from_disk

    rows, stats = (text_rows if recipe.raw_text else chat_rows)(recipe.data, recipe.train.seed)
    train_rows, eval_rows = _split(rows, recipe.data.eval_fraction)

    key = cache_key(tokenizer, recipe, rows) + f"-{len(eval_rows)}"
    folder = cache_dir() / "tokenized" / key
    if (folder / "stats.json").is_file():
        log.info("tokenized rows from cache %s", folder)
        cached = json.loads((folder / "stats.json").read_text())
        with _no_progress_bars():
            train = load_from_disk(str(folder / "train"))
            evaluation = load_from_disk(str(folder / "eval")) if (folder / "eval").is_dir() else None
        return Built(train, evaluation, {**stats, **cached, "cache": str(folder), "cache_hit": True})

    train_tokens, too_long = _tokenize_all(tokenizer, train_rows, recipe.data.max_length)
    eval_tokens, eval_too_long = _tokenize_all(tokenizer, eval_rows, recipe.data.max_length)
    if recipe.raw_text:
        split = {"split_too_long": too_long + eval_too_long}
        too_long = eval_too_long = 0
        if split["split_too_long"]:
            log.info(
                "%d document(s) longer than data.max_length=%d tokens are split across packs",
                split["split_too_long"],
                recipe.data.max_length,
            )
    if too_long:
        log.warning(
            "dropped %d training row(s) longer than data.max_length=%d tokens", too_long, recipe.data.max_length
        )
    if not train_tokens:
        raise FinetuneError(
            f"data.max_length: all {len(train_rows)} training rows are longer than {recipe.data.max_length} tokens; "
            "raise data.max_length"
        )
    token_stats = {
        "train_rows": len(train_tokens),
        "eval_rows": len(eval_tokens),
        "dropped_too_long": too_long + eval_too_long,
        "train_tokens": sum(len(t["input_ids"]) for t in train_tokens),
        "trained_tokens": sum(sum(label != IGNORE for label in t["labels"]) for t in train_tokens),
        "lengths": sorted(len(t["input_ids"]) for t in train_tokens),
        **(split if recipe.raw_text else {}),
    }
    train = Dataset.from_list(train_tokens)
    evaluation = Dataset.from_list(eval_tokens) if eval_tokens else None
    _save_cache(folder, train, evaluation, token_stats)
    return Built(train, evaluation, {**stats, **token_stats, "cache": str(folder), "cache_hit": False})


@contextlib.contextmanager
def _no_progress_bars():
    """The token cache is ours, not the user's business: no "Saving the dataset" bars around the real output."""
    from datasets.utils import logging as datasets_logging

    was_enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            datasets_logging.enable_progress_bar()


def _save_cache(folder, train, evaluation, token_stats: dict) -> None:
    try:
        with _no_progress_bars(), runs.staged(folder, folder=True) as tmp:
            train.save_to_disk(str(tmp / "train"))
            if evaluation is not None:
                evaluation.save_to_disk(str(tmp / "eval"))
            (tmp / "stats.json").write_text(json.dumps(token_stats))
    except OSError as e:  # a cache that cannot be written costs the next run time, never this run
        log.warning("could not cache tokenized rows in %s (%s); continuing without the cache", folder, e)
