"""The common row types every reader produces, their validation, and how they become chat rows.

- sft:        {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
- mcq:        {"id": str, "question": str, "options": {label: text}, "answer": label,
               "context": str|None, "explanation": str|None, "instruction": str|None, "group": str|None}
              Classification sets are mcq rows whose labels are the class names.
- qa:         {"id": str, "question": str, "context": str|None, "answer": str,
               "scale": str|None, "history": [{"role", "content"}, ...], "group": str|None}   (generation tasks)

`group` names the document a row was asked about (a contract, a report) when a source asks several questions of
one document: such rows are not independent, so an evaluation resamples them together (eval/metrics.py).
- preference: {"prompt": messages, "chosen": messages, "rejected": messages}
- unpaired:   {"prompt": messages, "completion": messages, "label": bool}   (KTO: a desirable or undesirable answer)
- text:       {"id": str, "text": str}   (a document of raw text, for continued pretraining)

A bad record raises FinetuneError naming the file, the record, the field, what was expected
and what was found.
"""

from __future__ import annotations

from finetune.errors import FinetuneError

ROLES = ("system", "user", "assistant")
KINDS = ("sft", "mcq", "qa", "preference", "unpaired", "text")


def bad_row(where: str, field: str, expected: str, found) -> FinetuneError:
    shown = repr(found)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return FinetuneError(f"{where}: field '{field}': expected {expected}, found {shown}")


def _text(row: dict, field: str, where: str, optional: bool = False) -> str | None:
    value = row.get(field)
    if value is None and optional:
        return None
    if not isinstance(value, str) or (not optional and not value.strip()):
        raise bad_row(where, field, "a non-empty string", value)
    return value


def check_messages(messages, where: str, field: str = "messages", need_assistant: bool = True) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad_row(where, field, "a non-empty list of {role, content} messages", messages)
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_row(where, f"{field}[{i}]", "a {role, content} object", message)
        role = message.get("role")
        if role not in ROLES:
            raise bad_row(where, f"{field}[{i}].role", f"one of {', '.join(ROLES)}", role)
        content = message.get("content")
        if not isinstance(content, str):
            raise bad_row(where, f"{field}[{i}].content", "a string", content)
        clean.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" and m["content"].strip() for m in clean):
        raise bad_row(where, field, "at least one non-empty assistant message", [m["role"] for m in clean])
    return clean


def check_sft(row: dict, where: str) -> dict:
    return {"messages": check_messages(row.get("messages"), where)}


def check_mcq(row: dict, where: str) -> dict:
    question = _text(row, "question", where)
    options = row.get("options")
    if (
        not isinstance(options, dict)
        or len(options) < 2
        or not all(isinstance(v, str) and v.strip() for v in options.values())
    ):
        raise bad_row(where, "options", "at least two {label: non-empty text} options", options)
    answer = row.get("answer")
    if answer not in options:
        raise bad_row(where, "answer", f"one of the option labels {list(options)}", answer)
    return {
        "id": str(row.get("id", where)),
        "question": question,
        "options": {str(k): v for k, v in options.items()},
        "answer": answer,
        "context": _text(row, "context", where, optional=True),
        "explanation": _text(row, "explanation", where, optional=True),
        "instruction": _text(row, "instruction", where, optional=True),
        "group": _text(row, "group", where, optional=True),
    }


def check_qa(row: dict, where: str) -> dict:
    history = row.get("history") or []
    return {
        "id": str(row.get("id", where)),
        "question": _text(row, "question", where),
        "context": _text(row, "context", where, optional=True),
        "answer": _text(row, "answer", where),
        "scale": _text(row, "scale", where, optional=True),
        "history": check_messages(history, where, "history", need_assistant=False) if history else [],
        "group": _text(row, "group", where, optional=True),
    }


def check_preference(row: dict, where: str) -> dict:
    prompt = check_messages(row.get("prompt"), where, "prompt", need_assistant=False)
    chosen = check_messages(row.get("chosen"), where, "chosen")
    rejected = check_messages(row.get("rejected"), where, "rejected")
    if chosen == rejected:
        raise bad_row(where, "rejected", "a response different from 'chosen'", rejected[-1]["content"])
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def check_unpaired(row: dict, where: str) -> dict:
    label = row.get("label")
    if not isinstance(label, bool):
        raise bad_row(where, "label", "true (a desirable answer) or false (an undesirable one)", label)
    return {
        "prompt": check_messages(row.get("prompt"), where, "prompt", need_assistant=False),
        "completion": check_messages(row.get("completion"), where, "completion"),
        "label": label,
    }


def check_text(row: dict, where: str) -> dict:
    return {"id": str(row.get("id", where)), "text": _text(row, "text", where)}


CHECKS = {
    "sft": check_sft,
    "mcq": check_mcq,
    "qa": check_qa,
    "preference": check_preference,
    "unpaired": check_unpaired,
    "text": check_text,
}


def is_classification(row: dict) -> bool:
    """Options labelled by their own text (yes / no / maybe) rather than by letters."""
    return all(label == text for label, text in row["options"].items())


def mcq_prompt(row: dict) -> str:
    """The user message for an mcq row; evaluation scores each option as the assistant's reply to it."""
    parts = []
    if row.get("instruction"):
        parts.append(row["instruction"].strip())
    if row.get("context"):
        parts.append(f"Context:\n{row['context'].strip()}")
    parts.append(f"Question: {row['question'].strip()}")
    if is_classification(row):
        parts.append(f"Answer with one of: {', '.join(row['options'])}.")
    else:
        listed = "\n".join(f"{label}. {text}" for label, text in row["options"].items())
        parts.append(f"Options:\n{listed}\nAnswer with the letter of the correct option.")
    return "\n\n".join(parts)


def mcq_answer(row: dict, with_explanation: bool = True) -> str:
    """The assistant turn of an mcq row: its label, then the explanation when there is one and it is wanted."""
    answer = row["answer"]
    if with_explanation and row.get("explanation"):
        return f"{answer}\n\n{row['explanation'].strip()}"
    return answer


def qa_prompt(row: dict) -> str:
    """The user message for a qa row: context (when the row has one), then the question."""
    parts = []
    if row.get("context"):
        parts.append(f"Context:\n{row['context'].strip()}")
    parts.append(f"Question: {row['question'].strip()}")
    return "\n\n".join(parts)


def qa_answer(row: dict) -> str:
    """The assistant turn of a qa row: the answer with its scale ('12 million', '3.5%')."""
    scale = row.get("scale")
    if not scale:
        return row["answer"]
    if scale == "percent":
        return f"{row['answer']}%"
    return f"{row['answer']} {scale}"


def to_sft(row: dict, kind: str, system_prompt: str | None = None, with_explanation: bool = True) -> dict:
    """Turn any supervised row into a chat row; a system prompt is added where the row has none."""
    if kind == "sft":
        messages = list(row["messages"])
    elif kind == "mcq":
        messages = [
            {"role": "user", "content": mcq_prompt(row)},
            {"role": "assistant", "content": mcq_answer(row, with_explanation)},
        ]
    elif kind == "qa":
        messages = list(row["history"]) + [
            {"role": "user", "content": qa_prompt(row)},
            {"role": "assistant", "content": qa_answer(row)},
        ]
    else:
        raise FinetuneError(f"a {kind} row cannot be used for SFT; use a reader that yields sft, mcq or qa rows")
    return {"messages": _with_system(messages, system_prompt)}


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return list(messages)


def to_preferences(row: dict, kind: str, system_prompt: str | None = None, with_explanation: bool = True) -> list[dict]:
    """Preference pairs for DPO: preference rows as they are; an mcq row gives one pair per distractor,
    the correct answer (with its explanation unless `with_explanation` is false) chosen over the distractor's label."""
    if kind == "preference":
        return [
            {"prompt": _with_system(row["prompt"], system_prompt), "chosen": row["chosen"], "rejected": row["rejected"]}
        ]
    if kind != "mcq":
        raise FinetuneError(
            f"train.method dpo needs preference pairs, and a {kind} reader gives none; use a preference reader or a "
            "multiple-choice source"
        )
    prompt = _with_system([{"role": "user", "content": mcq_prompt(row)}], system_prompt)
    chosen = [{"role": "assistant", "content": mcq_answer(row, with_explanation)}]
    return [
        {"prompt": prompt, "chosen": chosen, "rejected": [{"role": "assistant", "content": label}]}
        for label in row["options"]
        if label != row["answer"]
    ]


def to_unpaired(row: dict, kind: str, system_prompt: str | None = None, with_explanation: bool = True) -> list[dict]:
    """Unpaired rows for KTO: unpaired rows as they are; a preference pair gives its chosen answer as desirable and
    its rejected one as undesirable; an mcq row gives its correct answer (with its explanation unless
    `with_explanation` is false) as desirable and each distractor's label as undesirable."""
    if kind == "unpaired":
        return [{**row, "prompt": _with_system(row["prompt"], system_prompt)}]
    pairs = to_preferences(row, kind, system_prompt, with_explanation)
    # A preference row is one pair; an mcq row's pairs all share its prompt and correct answer.
    desirable = {"prompt": pairs[0]["prompt"], "completion": pairs[0]["chosen"], "label": True}
    return [desirable] + [{"prompt": p["prompt"], "completion": p["rejected"], "label": False} for p in pairs]
