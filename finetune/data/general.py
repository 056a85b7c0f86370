"""General formats shared by many public sets: ShareGPT, Alpaca, prompt/completion, MMLU CSV,
multiple-choice JSONL, preference pairs (plain strings, message lists, Anthropic HH transcripts), KTO's unpaired
rows, and raw text for continued pretraining.

Readers take the canonical field names below; a recipe's `columns:` mapping renames a source's
own fields to them, so one reader serves every set with the same shape.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator

from finetune.data import files, readers
from finetune.data.formats import bad_row
from finetune.errors import FinetuneError

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
MMLU_LABELS = ("A", "B", "C", "D")
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def _string(record: dict, field: str, where: str, optional: bool = False) -> str | None:
    value = record.get(field)
    if optional and (value is None or value == ""):
        return None
    if not isinstance(value, str) or not value.strip():
        raise bad_row(where, field, "a non-empty string", value)
    return value


def _record(record, where: str, fields: str) -> dict:
    if not isinstance(record, dict):
        raise bad_row(where, "(record)", f"an object with {fields}", record)
    return record


@readers.reader("sharegpt", "sft", card="formats.md")
def sharegpt_convert(record: dict, where: str, source: readers.RawSource) -> dict:
    """ShareGPT conversations: {conversations: [{from: human|gpt|system, value}]}."""
    turns = _record(record, where, "conversations").get("conversations")
    if not isinstance(turns, list) or not turns:
        raise bad_row(where, "conversations", "a non-empty list of {from, value} turns", turns)
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
            found = turn.get("from") if isinstance(turn, dict) else turn
            raise bad_row(where, f"conversations[{i}].from", f"one of {', '.join(SHAREGPT_ROLES)}", found)
        value = turn.get("value")
        if not isinstance(value, str):
            raise bad_row(where, f"conversations[{i}].value", "a string", value)
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": value})
    return {"messages": messages}


@readers.reader("alpaca", "sft", card="formats.md")
def alpaca_convert(record: dict, where: str, source: readers.RawSource) -> dict:
    """Alpaca instructions: {instruction, input (optional), output}; also medical instruction sets in this layout."""
    record = _record(record, where, "instruction, input, output")
    instruction = _string(record, "instruction", where)
    extra = _string(record, "input", where, optional=True)
    prompt = f"{instruction.strip()}\n\n{extra.strip()}" if extra else instruction.strip()
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _string(record, "output", where)},
        ]
    }


@readers.reader("prompt_completion", "sft", card="formats.md")
def prompt_completion_convert(record: dict, where: str, source: readers.RawSource) -> dict:
    """{prompt, completion} strings -> one user turn and one assistant turn."""
    record = _record(record, where, "prompt, completion")
    prompt = _string(record, "prompt", where)
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _string(record, "completion", where)},
        ]
    }


def mmlu_records(source: readers.RawSource) -> Iterator[tuple[str, dict]]:
    # MMLU's per-subject CSVs have no header row; the subject is only in the file name.
    yield from source.records(header=False)


def _mmlu_subject(source: readers.RawSource) -> str | None:
    if source.path is None:
        return None
    stem = source.path.name.removesuffix(".gz").rsplit(".", 1)[0]
    return re.sub(r"_(test|dev|val)$", "", stem).replace("_", " ") or None


@readers.reader("mmlu_csv", "mcq", records=mmlu_records, card="formats.md", license="MIT")
def mmlu_convert(record: dict, where: str, source: readers.RawSource) -> dict:
    """MMLU per-subject CSV without header: question, A, B, C, D, answer letter; the subject is the file's name."""
    record = _record(record, where, "6 columns: question, A, B, C, D, answer")
    if len(record) != 6:
        raise bad_row(where, "(columns)", "6 columns: question, A, B, C, D, answer letter", list(record.values()))
    answer = record["5"].strip()
    if answer not in MMLU_LABELS:
        raise bad_row(where, "column 6 (answer)", "one of A, B, C, D", record["5"])
    subject = _mmlu_subject(source)
    return {
        "id": where,
        "question": record["0"],
        "options": {label: record[str(i + 1)] for i, label in enumerate(MMLU_LABELS)},
        "answer": answer,
        "context": None,
        "explanation": None,
        "instruction": f"The following is a multiple choice question about {subject}." if subject else None,
    }


@readers.reader("mcq_jsonl", "mcq", card="formats.md")
def mcq_convert(record: dict, where: str, source: readers.RawSource) -> dict:
    """Multiple choice: {question, options ({label: text} or a list), answer (label or index), context?,
    explanation?, group? (the document asked about, so evaluation resamples its questions together)}."""
    record = _record(record, where, "question, options, answer")
    options = record.get("options")
    if isinstance(options, list) and 2 <= len(options) <= len(string.ascii_uppercase):
        options = dict(zip(string.ascii_uppercase, options))
    if not isinstance(options, dict):
        raise bad_row(where, "options", "an object {label: text} or a list of option texts", options)
    answer = record.get("answer")
    # An integer answer indexes the options in order (list options, or MMLU-style answer: 2).
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(options):
            raise bad_row(
                where, "answer", f"an option index 0..{len(options) - 1} or one of the labels {list(options)}", answer
            )
        answer = list(options)[answer]
    return {
        "id": str(record.get("id", where)),
        "question": record.get("question"),
        "options": options,
        "answer": answer,
        "context": _string(record, "context", where, optional=True),
        "explanation": _string(record, "explanation", where, optional=True),
        "instruction": _string(record, "instruction", where, optional=True),
        "group": _string(record, "group", where, optional=True),
    }


@readers.reader("preference", "preference", card="formats.md")
def preference_convert(record: dict, where: str, source: readers.RawSource) -> dict:
    """DPO pairs as plain strings: {prompt, chosen, rejected}."""
    record = _record(record, where, "prompt, chosen, rejected")
    prompt = _string(record, "prompt", where)
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": _string(record, "chosen", where)}],
        "rejected": [{"role": "assistant", "content": _string(record, "rejected", where)}],
    }


def text_records(source: readers.RawSource) -> Iterator[tuple[str, dict]]:
    """Documents: a folder's .txt files (one each), a .txt file's blank-line-separated blocks, or any other source's
    records (their `text` field)."""
    if source.hub is None and source.path.is_dir():
        found = sorted(p for p in source.path.rglob("*") if p.is_file() and files.suffix(p) == ".txt")
        if not found:
            raise FinetuneError(f"{source.path}: no .txt files in the folder; check data.sources[].path")
        for path in found:
            yield str(path), {"text": files.read_text(path)}
    elif source.hub is None and files.suffix(source.path) == ".txt":
        block, start = [], 0
        lines = files.read_text(source.path).splitlines()
        for number, line in enumerate([*lines, ""], start=1):
            if line.strip():
                start = start if block else number
                block.append(line)
            elif block:
                yield f"{source.path}:{start}", {"text": "\n".join(block)}
                block = []
    else:
        yield from source.records()


@readers.reader("text", "text", records=text_records, card="formats.md")
def text_convert(record: dict, where: str, source: readers.RawSource) -> dict:
    """Raw text for continued pretraining: a .txt file (one document per blank-line-separated block), a folder of
    .txt files (one document per file), or records with a `text` field (.jsonl, .json, .parquet, a Hub set)."""
    record = _record(record, where, "text")
    return {"id": str(record.get("id", where)), "text": _string(record, "text", where)}


@readers.reader("kto", "unpaired", card="formats.md")
def kto_convert(record: dict, where: str, source: readers.RawSource) -> dict:
    """KTO rows, one answer each: {prompt, completion, label: true (desirable) | false (undesirable)}; prompt and
    completion are strings or message lists."""
    record = _record(record, where, "prompt, completion, label")
    prompt, completion = record.get("prompt"), record.get("completion")
    return {
        "prompt": [{"role": "user", "content": _string(record, "prompt", where)}]
        if isinstance(prompt, str)
        else prompt,
        "completion": [{"role": "assistant", "content": _string(record, "completion", where)}]
        if isinstance(completion, str)
        else completion,
        "label": record.get("label"),
    }


@readers.reader("preference_messages", "preference", card="formats.md")
def preference_messages_convert(record: dict, where: str, source: readers.RawSource) -> dict:
    """DPO pairs as message lists: {prompt, chosen, rejected}, or chosen/rejected whole conversations (implicit
    prompt)."""
    record = _record(record, where, "prompt, chosen, rejected")
    prompt, chosen, rejected = record.get("prompt"), record.get("chosen"), record.get("rejected")
    # TRL's "implicit prompt" layout: no prompt field, chosen and rejected are whole conversations
    # sharing their opening turns; those shared turns are the prompt.
    if prompt is None and isinstance(chosen, list) and isinstance(rejected, list):
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise bad_row(
                where,
                "prompt",
                "a list of messages (or chosen/rejected conversations that share their opening turns)",
                None,
            )
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _hh_turns(transcript, where: str, field: str) -> list[dict]:
    if not isinstance(transcript, str) or not transcript.startswith("\n\nHuman:"):
        raise bad_row(where, field, "a transcript starting with '\\n\\nHuman:'", transcript)
    parts = HH_TURN.split(transcript)
    # split() gives ['', role, text, role, text, ...]
    return [
        {"role": "user" if role == "Human" else "assistant", "content": text.strip()}
        for role, text in zip(parts[1::2], parts[2::2])
    ]


@readers.reader("hh_rlhf", "preference", card="preference/hh-rlhf.md", license="MIT")
def hh_rlhf_convert(record: dict, where: str, source: readers.RawSource) -> dict:
    """Anthropic HH-RLHF transcripts {chosen, rejected} split at the last Assistant turn into prompt / chosen /
    rejected."""
    record = _record(record, where, "chosen, rejected")
    chosen = _hh_turns(record.get("chosen"), where, "chosen")
    rejected = _hh_turns(record.get("rejected"), where, "rejected")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise bad_row(
            where, "chosen/rejected", "transcripts ending with an '\\n\\nAssistant:' turn", chosen[-1]["content"]
        )
    if chosen[:-1] != rejected[:-1]:
        # A handful of upstream pairs diverge before the last reply; they are not a preference over one prompt.
        raise bad_row(
            where,
            "rejected",
            "the same conversation as 'chosen' up to the last Assistant turn",
            rejected[-2]["content"] if len(rejected) > 1 else "",
        )
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}
