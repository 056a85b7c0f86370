"""Medical sources in their upstream formats: PubMedQA (PQA-L) and MedMCQA (MedAgentsBench JSONL)."""

from __future__ import annotations

from collections.abc import Iterator

from finetune.data import files, readers
from finetune.data.formats import bad_row
from finetune.errors import FinetuneError

PUBMEDQA_LABELS = ("yes", "no", "maybe")
PUBMEDQA_SPLITS = ("train", "validation", "test", "all")
MEDMCQA_LABELS = ("A", "B", "C", "D")


def _pubmedqa_test_pmids(source: readers.RawSource) -> set[str]:
    ground_truth = source.path.parent / "test_ground_truth.json"
    if not ground_truth.is_file():
        raise FinetuneError(
            f"{source.path}: split {source.split}: test_ground_truth.json (the 500 official test PMIDs) must sit "
            "beside "
            "ori_pqal.json so the test questions are never trained on; copy it from the PubMedQA repository"
        )
    return set(files.parse_json(ground_truth))


def pubmedqa_records(source: readers.RawSource) -> Iterator[tuple[str, dict]]:
    """ori_pqal.json is keyed by PMID. Splits: test (the official test PMIDs), validation (a fixed fifth of the
    others, by the PMID's hash), train (the rest of the others), all."""
    path = files.local_path(source.path, source.hub, "pubmedqa")
    readers.check_split(source, "pubmedqa", PUBMEDQA_SPLITS)
    data = files.parse_json(path)
    if not isinstance(data, dict):
        raise FinetuneError(
            f"{source.path}: expected PubMedQA's ori_pqal.json layout (an object keyed by PMID), found a "
            f"{type(data).__name__}"
        )
    test = _pubmedqa_test_pmids(source) if source.split != "all" else set()
    for pmid, record in data.items():
        wanted = pmid in test if source.split == "test" else pmid not in test and readers.in_split(source.split, pmid)
        if wanted:
            yield f"{source.path}: PMID {pmid}", {"pmid": pmid, **record} if isinstance(record, dict) else record


# Both PubMedQA readers read the same file, with the same splits.
PUBMEDQA = dict(records=pubmedqa_records, card="medical/pubmedqa.md", license="MIT", hub="qiaojin/PubMedQA")


@readers.reader("pubmedqa", "mcq", **PUBMEDQA)
def pubmedqa_convert(record: dict, where: str, source: readers.RawSource) -> dict:
    """PubMedQA PQA-L (ori_pqal.json): question + abstract -> yes / no / maybe, conclusion as rationale. Splits: test
    (the 500 official test PMIDs), validation (100 of the other 500, fixed), train (the other 400), all."""
    if not isinstance(record, dict):
        raise bad_row(where, "(record)", "an object with QUESTION, CONTEXTS, final_decision", record)
    contexts = record.get("CONTEXTS")
    if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
        raise bad_row(where, "CONTEXTS", "a list of strings", contexts)
    label = record.get("final_decision")
    if label not in PUBMEDQA_LABELS:
        raise bad_row(where, "final_decision", "one of yes, no, maybe", label)
    question = record.get("QUESTION")
    if not isinstance(question, str) or not question.strip():
        raise bad_row(where, "QUESTION", "a non-empty string", question)
    long_answer = record.get("LONG_ANSWER")
    return {
        "id": f"pubmedqa-{record['pmid']}",
        "question": question,
        "options": {label: label for label in PUBMEDQA_LABELS},
        "answer": label,
        "context": "\n".join(contexts),
        "explanation": long_answer if isinstance(long_answer, str) and long_answer.strip() else None,
        "instruction": None,
    }


@readers.reader("pubmedqa_reasoning_free", "mcq", **PUBMEDQA)
def pubmedqa_reasoning_free_convert(record: dict, where: str, source: readers.RawSource) -> dict:
    """PubMedQA PQA-L in the paper's reasoning-free setting: question + the abstract's conclusion -> yes / no / maybe
    (training rows that teach the mapping; the headline score stays `pubmedqa`'s). Same splits.

    The conclusion (LONG_ANSWER) states the finding, so the label follows from it."""
    row = pubmedqa_convert(record, where, source)
    if row["explanation"] is None:
        raise bad_row(
            where, "LONG_ANSWER", "a non-empty string (the conclusion this setting reads)", record.get("LONG_ANSWER")
        )
    return {**row, "id": f"pubmedqa-conclusion-{record['pmid']}", "context": row["explanation"], "explanation": None}


@readers.reader("pubmedqa_abstracts", "text", **PUBMEDQA)
def pubmedqa_abstracts_convert(record: dict, where: str, source: readers.RawSource) -> dict:
    """PubMedQA PQA-L abstracts as raw text for continued pretraining: the question (the article's title as a
    question), each section under its label, and the conclusion. Same splits as pubmedqa, so the train split never
    holds a test abstract."""
    if not isinstance(record, dict):
        raise bad_row(where, "(record)", "an object with QUESTION, CONTEXTS, LABELS, LONG_ANSWER", record)
    contexts = record.get("CONTEXTS")
    if not isinstance(contexts, list) or not contexts or not all(isinstance(c, str) for c in contexts):
        raise bad_row(where, "CONTEXTS", "a non-empty list of strings", contexts)
    labels = record.get("LABELS")
    if not isinstance(labels, list) or len(labels) != len(contexts):
        labels = [None] * len(contexts)  # the sections are still the abstract without their headings
    parts = [record["QUESTION"].strip()] if isinstance(record.get("QUESTION"), str) else []
    parts += [f"{label}: {text.strip()}" if label else text.strip() for label, text in zip(labels, contexts)]
    conclusion = record.get("LONG_ANSWER")
    if isinstance(conclusion, str) and conclusion.strip():
        parts.append(f"CONCLUSIONS: {conclusion.strip()}")
    return {"id": f"pubmedqa-abstract-{record['pmid']}", "text": "\n\n".join(parts)}


@readers.reader(
    "medmcqa",
    "mcq",
    card="medical/medmcqa.md",
    license="MIT (MedAgentsBench packaging); MedMCQA upstream open-licensed",
    hub="openlifescienceai/medmcqa",
)
def medmcqa_convert(record: dict, where: str, source: readers.RawSource) -> dict:
    """MedMCQA as packaged by MedAgentsBench (JSONL: question, options{A..D}, answer_idx, answer, realidx; explanation
    when present) -> 4-option multiple choice."""
    if not isinstance(record, dict):
        raise bad_row(where, "(record)", "an object with question, options, answer_idx", record)
    options = record.get("options")
    if not isinstance(options, dict) or sorted(options) != list(MEDMCQA_LABELS):
        raise bad_row(where, "options", "an object with the keys A, B, C, D", options)
    label = record.get("answer_idx")
    if label not in MEDMCQA_LABELS:
        raise bad_row(where, "answer_idx", "one of A, B, C, D", label)
    # `answer` repeats the correct option's text: a mismatch means the row was mis-packaged.
    text = record.get("answer")
    if text is not None and text != options[label]:
        raise bad_row(where, "answer", f"the text of option {label} ({options[label]!r})", text)
    explanation = record.get("explanation")
    return {
        "id": f"medmcqa-{record.get('realidx') or where}",
        "question": record.get("question"),
        "options": {key: options[key] for key in MEDMCQA_LABELS},
        "answer": label,
        "context": None,
        "explanation": explanation if isinstance(explanation, str) and explanation.strip() else None,
        "instruction": None,
    }
