"""Finance sources in their upstream formats: TAT-QA, ConvFinQA (dev, restructured JSON) and Financial PhraseBank."""

from __future__ import annotations

import re
from collections.abc import Iterator

from finetune.data import files, readers
from finetune.data.formats import bad_row, qa_answer, qa_prompt
from finetune.errors import FinetuneError

CONVFINQA_LICENSE = "MIT (ConvFinQA upstream; the restructured copy has no license file)"

TATQA_SCALES = ("", "thousand", "million", "billion", "percent")
PHRASEBANK_LABELS = ("positive", "negative", "neutral")
PHRASEBANK_QUESTION = "What is the sentiment of this financial news sentence from an investor's point of view?"


def _number(value) -> str:
    """A number as the sets print it: 12.0 -> '12', -12.6 -> '-12.6'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _cell(value) -> str:
    text = _number(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)
    return " ".join(text.split()).replace("|", "\\|")


def markdown_table(rows: list[list]) -> str:
    """A Markdown table whose first row is the header; short rows are padded so every row has the same width."""
    width = max(len(row) for row in rows)
    lines = []
    for index, row in enumerate(rows):
        cells = [_cell(c) for c in row] + [""] * (width - len(row))
        lines.append("| " + " | ".join(cells) + " |")
        if index == 0:
            lines.append("|" + " --- |" * width)
    return "\n".join(lines)


# ---------------------------------------------------------------- TAT-QA


def _tatqa_contexts(source: readers.RawSource, reader: str) -> Iterator[tuple[str, object, str]]:
    """The contexts (one report table and its paragraphs, with its questions) of the source's split, with where each
    is and its report key. Splits are by report, so no report is in two: validation is a fixed fifth (by the report
    key), train the rest, all the whole file."""
    path = files.local_path(source.path, source.hub, reader)
    readers.check_split(source, reader)
    data = files.parse_json(path)
    if not isinstance(data, list):
        raise FinetuneError(
            f"{path}: expected TAT-QA's layout (a list of contexts with table, paragraphs, questions), found a "
            f"{type(data).__name__}"
        )
    for index, context in enumerate(data):
        report = _report_key(context, index)
        if readers.in_split(source.split, report):
            yield f"{path}: context {index}", context, report


def tatqa_records(source: readers.RawSource) -> Iterator[tuple[str, dict]]:
    """Every question of every context."""
    for where, context, report in _tatqa_contexts(source, "tatqa"):
        questions = context.get("questions") if isinstance(context, dict) else None
        if not isinstance(questions, list):
            raise FinetuneError(f"{where}: expected a 'questions' list; fix or re-download the file")
        for number, question in enumerate(questions):
            uid = question.get("uid", number) if isinstance(question, dict) else number
            yield f"{where}, question {uid}", {"context": context, "question": question, "report": report}


def _report_key(context, index: int) -> str:
    """The report's table uid, or its position in the file where it has none; the split and the interval's group
    both use this key, so a report's questions are split and resampled together."""
    table = context.get("table") if isinstance(context, dict) else None
    return str(table.get("uid") if isinstance(table, dict) and table.get("uid") is not None else index)


def _tatqa_context(context: dict, where: str) -> str:
    table = (context.get("table") or {}).get("table") if isinstance(context.get("table"), dict) else None
    if not isinstance(table, list) or not table or not all(isinstance(row, list) and row for row in table):
        raise bad_row(where, "table.table", "a non-empty list of rows of cells", table)
    paragraphs = context.get("paragraphs")
    if not isinstance(paragraphs, list) or not all(
        isinstance(p, dict) and isinstance(p.get("text"), str) for p in paragraphs
    ):
        raise bad_row(where, "paragraphs", "a list of {order, text}", paragraphs)
    texts = [p["text"].strip() for p in sorted(paragraphs, key=lambda p: p.get("order", 0))]
    return "\n\n".join([markdown_table(table), *texts])


@readers.reader(
    "tatqa", "qa", records=tatqa_records, card="finance/tatqa.md", license="CC BY 4.0", hub="next-tat/TAT-QA"
)
def tatqa_convert(record: dict, where: str, source: readers.RawSource) -> dict:
    """TAT-QA (tatqa_dataset_*.json): each question over a report table + paragraphs -> answer with its scale; the
    table is rendered as Markdown, span lists joined with ', '. Splits by report: train, validation (a fixed fifth),
    all."""
    question = record["question"]
    if not isinstance(question, dict):
        raise bad_row(where, "questions[]", "an object with question, answer, scale", question)
    answer = question.get("answer")
    if isinstance(answer, list) and answer and all(isinstance(a, (str, int, float)) for a in answer):
        answer = ", ".join(_number(a) if not isinstance(a, str) else a.strip() for a in answer)
    elif isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = _number(answer)
    elif not isinstance(answer, str):
        raise bad_row(where, "answer", "a list of spans, a number or a string", answer)
    scale = question.get("scale", "")
    if scale not in TATQA_SCALES:
        raise bad_row(where, "scale", f"one of {', '.join(repr(s) for s in TATQA_SCALES)}", scale)
    return {
        "id": f"tatqa-{question.get('uid', where)}",
        "question": question.get("question"),
        "context": _tatqa_context(record["context"], where),
        "answer": answer,
        "scale": scale or None,
        "history": [],
        "group": f"tatqa-report-{record['report']}",
    }


def tatqa_conversation_records(source: readers.RawSource) -> Iterator[tuple[str, dict]]:
    """Every context with all of its questions."""
    for where, context, report in _tatqa_contexts(source, "tatqa_conversation"):
        yield where, {"context": context, "report": report}


@readers.reader(
    "tatqa_conversation", "qa", records=tatqa_conversation_records, card="finance/tatqa.md", license="CC BY 4.0"
)
def tatqa_conversation_convert(record: dict, where: str, source: readers.RawSource) -> dict:
    """TAT-QA for training: each report's questions as one conversation (the table and paragraphs in the first user
    turn, as `tatqa` renders them; the other questions as follow-ups), so every answer is trained for one pass
    over the report.

    Questions keep TAT-QA's order; the first user turn is exactly the `tatqa` reader's prompt for the first
    question, and the report's text is read once, not once per question."""
    context, report = record["context"], record["report"]
    questions = context.get("questions") if isinstance(context, dict) else None
    if not isinstance(questions, list) or not questions:
        raise bad_row(where, "questions", "a non-empty list of questions", questions)
    ordered = sorted(questions, key=lambda q: q.get("order", 0) if isinstance(q, dict) else 0)
    rows = [
        tatqa_convert(
            {"context": context, "question": q, "report": report},
            f"{where}, question {q.get('uid') if isinstance(q, dict) else i}",
            source,
        )
        for i, q in enumerate(ordered)
    ]
    history = []
    for turn, row in enumerate(rows[:-1]):
        history += [
            {
                "role": "user",
                "content": qa_prompt({"context": row["context"] if turn == 0 else None, "question": row["question"]}),
            },
            {"role": "assistant", "content": qa_answer(row)},
        ]
    last = rows[-1]
    return {
        **last,
        "id": f"tatqa-context-{report}",
        "context": None if history else last["context"],
        "history": history,
    }


# ---------------------------------------------------------------- ConvFinQA


def convfinqa_records(source: readers.RawSource) -> Iterator[tuple[str, dict]]:
    """The conversations of the restructured ConvFinQA file ({"dev": [...]}; any split key it holds)."""
    path = files.local_path(source.path, source.hub, "convfinqa")
    data = files.parse_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise FinetuneError(
            f'{path}: expected the restructured ConvFinQA layout ({{"dev": [conversations]}}), found a '
            f"{type(data).__name__}"
        )
    if source.split in data:
        conversations = data[source.split]
    elif len(data) == 1:
        # The only public copy holds just the dev split; the recipe's default split (train) reads it rather than fail.
        conversations = next(iter(data.values()))
    else:
        raise FinetuneError(f"data.sources[].split: {path} has splits {', '.join(data)}, got {source.split!r}")
    for index, conversation in enumerate(conversations):
        name = conversation.get("id", index) if isinstance(conversation, dict) else index
        yield f"{path}: conversation {name}", conversation


def _convfinqa_table(table, where: str) -> str:
    """The {column: {row label: value}} table as Markdown with the row labels down the left."""
    if not isinstance(table, dict) or not table or not all(isinstance(col, dict) for col in table.values()):
        raise bad_row(where, "doc.table", "an object {column: {row label: value}}", table)
    labels = list(dict.fromkeys(label for column in table.values() for label in column))
    rows = [["", *table]] + [[label, *(column.get(label, "") for column in table.values())] for label in labels]
    return markdown_table(rows)


@readers.reader("convfinqa", "qa", records=convfinqa_records, card="finance/convfinqa.md", license=CONVFINQA_LICENSE)
def convfinqa_convert(record: dict, where: str, source: readers.RawSource) -> dict:
    """ConvFinQA (restructured dev JSON): each conversation -> the earlier turns as history (the document in the first
    user turn) and the last question as the one to answer."""
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("doc"), dict)
        or not isinstance(record.get("dialogue"), dict)
    ):
        raise bad_row(where, "(record)", "an object with id, doc and dialogue", record)
    doc, dialogue = record["doc"], record["dialogue"]
    questions, answers = dialogue.get("conv_questions"), dialogue.get("conv_answers")
    if not isinstance(questions, list) or not questions or not all(isinstance(q, str) and q.strip() for q in questions):
        raise bad_row(where, "dialogue.conv_questions", "a non-empty list of questions", questions)
    if (
        not isinstance(answers, list)
        or len(answers) != len(questions)
        or not all(isinstance(a, str) and a.strip() for a in answers)
    ):
        raise bad_row(where, "dialogue.conv_answers", f"{len(questions)} answer strings, one per question", answers)
    parts = [doc.get("pre_text"), _convfinqa_table(doc.get("table"), where), doc.get("post_text")]
    document = "\n\n".join(p.strip() for p in parts if isinstance(p, str) and p.strip())
    # The document goes with the first question; later turns are plain follow-ups, as the annotators asked them.
    history = []
    for turn, (question, answer) in enumerate(zip(questions[:-1], answers[:-1])):
        prompt = qa_prompt({"context": document if turn == 0 else None, "question": question})
        history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer.strip()}]
    return {
        "id": f"convfinqa-{record.get('id', where)}",
        "question": questions[-1],
        "context": None if history else document,
        "answer": answers[-1].strip(),
        "scale": None,
        "history": history,
        # Several conversations read the same filing page (Single_X/2007/page_1.pdf-1, -2, Double_X/2007/page_1.pdf).
        "group": "convfinqa-" + re.sub(r"^(Single|Double)_|-\d+$", "", str(record.get("id", where))),
    }


# ---------------------------------------------------------------- Financial PhraseBank


def phrasebank_records(source: readers.RawSource) -> Iterator[tuple[str, dict]]:
    """`sentence@label` lines; the upstream Sentences_*.txt files are Latin-1, read_text falls back to it."""
    path = files.local_path(source.path, source.hub, "phrasebank")
    for number, line in enumerate(files.read_text(path).splitlines(), start=1):
        if line.strip():
            yield f"{path}:{number}", {"line": line}


@readers.reader(
    "phrasebank",
    "mcq",
    records=phrasebank_records,
    card="finance/phrasebank.md",
    license="CC BY-NC-SA 3.0 (non-commercial)",
    commercial_use=False,
    hub="takala/financial_phrasebank",
)
def phrasebank_convert(record: dict, where: str, source: readers.RawSource) -> dict:
    """Financial PhraseBank (Sentences_*.txt, 'sentence@label' lines, Latin-1) -> positive / negative / neutral."""
    sentence, at, label = record["line"].rpartition("@")
    label = label.strip()
    if not at or label not in PHRASEBANK_LABELS:
        raise bad_row(
            where, "label", f"a line 'sentence@label' with label one of {', '.join(PHRASEBANK_LABELS)}", record["line"]
        )
    return {
        "id": f"phrasebank-{where.rsplit(':', 1)[-1]}",
        "question": PHRASEBANK_QUESTION,
        "options": {label: label for label in PHRASEBANK_LABELS},
        "answer": label,
        "context": sentence.strip(),
        "explanation": None,
        "instruction": None,
    }
