"""Prompts never depend on the gold answer. For every multiple-choice and QA reader, on its real file (and the
project's sample), a copy of the source with every gold answer changed gives byte-identical prompts: a user asking
the question has no label, so neither may training or evaluation."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import PROJECT, SHARED_DATA, shared_data

from finetune.data import formats
from finetune.data.build import read_source
from finetune.data.readers import READERS, RawSource
from finetune.recipe import SourceSection


def prompts(reader: str, path: Path, split: str = "all") -> dict[str, list[dict]]:
    """Each row's messages before its answer, by row id."""
    _, rows, _ = read_source(SourceSection(path=str(path), reader=reader, split=split), "error", 0)
    kind = READERS[reader].kind
    return {row["id"]: formats.to_sft(row, kind)["messages"][:-1] for row in rows}


def answers(reader: str, path: Path) -> dict[str, str]:
    _, rows, _ = read_source(SourceSection(path=str(path), reader=reader, split="all"), "error", 0)
    return {row["id"]: row["answer"] for row in rows}


def rotate(value, labels):
    """The next label: a changed answer whose label set stays the same (the set is part of some prompts)."""
    return labels[(labels.index(value) + 1) % len(labels)]


def flip_pubmedqa(source: Path, target: Path) -> None:
    data = json.loads(source.read_text())
    for record in data.values():
        record["final_decision"] = rotate(record["final_decision"], ["yes", "no", "maybe"])
    target.write_text(json.dumps(data))


def flip_medmcqa(source: Path, target: Path) -> None:
    lines = []
    for line in source.read_text().splitlines():
        record = json.loads(line)
        record["answer_idx"] = rotate(record["answer_idx"], ["A", "B", "C", "D"])
        record["answer"] = record["options"][record["answer_idx"]]
        lines.append(json.dumps(record))
    target.write_text("\n".join(lines) + "\n")


def flip_contractnli(source: Path, target: Path) -> None:
    """Every label moved on, every evidence span dropped: the evidence is the answer's rationale, not input."""
    data = json.loads(source.read_text())
    for document in data["documents"]:
        for annotation in document["annotation_sets"][0]["annotations"].values():
            annotation["choice"] = rotate(annotation["choice"], ["Entailment", "Contradiction", "NotMentioned"])
            annotation["spans"] = []
    target.write_text(json.dumps(data))


def flip_tatqa(source: Path, target: Path, last_only: bool = False) -> None:
    """Every answer (or, for a report conversation, the last question's: earlier answers are the history a
    conversation is given) replaced by a wrong one, scale dropped."""
    data = json.loads(source.read_text())
    for context in data:
        questions = sorted(context["questions"], key=lambda q: q.get("order", 0))
        for question in questions[-1:] if last_only else questions:
            question["answer"], question["scale"] = "-1", ""
    target.write_text(json.dumps(data))


def flip_convfinqa(source: Path, target: Path) -> None:
    data = json.loads(source.read_text())
    for conversations in data.values():
        for conversation in conversations:
            conversation["dialogue"]["conv_answers"][-1] = "-1"
    target.write_text(json.dumps(data))


def flip_phrasebank(source: Path, target: Path) -> None:
    lines = []
    for line in source.read_bytes().decode("latin-1").splitlines():
        sentence, _, label = line.rpartition("@")
        lines.append(f"{sentence}@{rotate(label.strip(), ['positive', 'negative', 'neutral'])}")
    target.write_bytes("\n".join(lines).encode("latin-1"))


def flip_legalbench(source: Path, target: Path) -> None:
    with source.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    labels = sorted({row["answer"] for row in rows})
    for row in rows:
        row["answer"] = rotate(row["answer"], labels)
    with target.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    card = source.parent / "README.md"
    if card.is_file():  # the task's instruction comes from its card beside the file
        shutil.copy(card, target.parent / "README.md")


FLIPS = {
    "pubmedqa": flip_pubmedqa,
    "pubmedqa_reasoning_free": flip_pubmedqa,
    "medmcqa": flip_medmcqa,
    "contractnli": flip_contractnli,
    "legalbench": flip_legalbench,
    "tatqa": flip_tatqa,
    "tatqa_conversation": lambda source, target: flip_tatqa(source, target, last_only=True),
    "convfinqa": flip_convfinqa,
    "phrasebank": flip_phrasebank,
}
SAMPLES = {
    "pubmedqa": "datasets/medical/pubmedqa/ori_pqal.json",
    "pubmedqa_reasoning_free": "datasets/medical/pubmedqa/ori_pqal.json",
    "medmcqa": "datasets/medical/medmcqa_sample.jsonl",
    "contractnli": "datasets/legal/contract-nli/train.json",
    "tatqa": "datasets/finance/tat-qa/tatqa_sample.json",
    "tatqa_conversation": "datasets/finance/tat-qa/tatqa_sample.json",
    "phrasebank": "datasets/finance/phrasebank_sample.txt",
}
REAL = {
    "pubmedqa": "medical/pubmedqa/ori_pqal.json",
    "pubmedqa_reasoning_free": "medical/pubmedqa/ori_pqal.json",
    "medmcqa": "medical/medmcqa/test.jsonl",
    "contractnli": "legal/contract-nli/test.json",
    "legalbench": "legal/legalbench/tasks/contract_nli_limited_use/train.tsv",
    "tatqa": "finance/tat-qa/tatqa_dataset_test_gold.json",
    "tatqa_conversation": "finance/tat-qa/tatqa_dataset_dev.json",
    "convfinqa": "finance/convfinqa/convfinqa_dataset.json",
}
CASES = [(reader, PROJECT / path) for reader, path in SAMPLES.items()] + [
    pytest.param(reader, SHARED_DATA / path, id=f"{reader}-real") for reader, path in REAL.items()
]


def test_every_multiple_choice_and_qa_reader_is_covered():
    covered = set(FLIPS) | {"cuad", "mmlu_csv", "mcq_jsonl"}  # the last three are tested below, record by record
    assert covered == {name for name, reader in READERS.items() if reader.kind in ("mcq", "qa")}


@pytest.mark.parametrize(("reader", "path"), CASES)
def test_a_flipped_gold_answer_leaves_every_prompt_byte_identical(reader, path, tmp_path):
    if not path.exists():
        shared_data(str(path.relative_to(SHARED_DATA)))  # skips with the reason
    flipped = tmp_path / path.parent.name / path.name  # the same folder name: LegalBench's task is its folder
    flipped.parent.mkdir()
    FLIPS[reader](path, flipped)
    original, changed = prompts(reader, path), prompts(reader, flipped)
    assert original and original == changed
    # The flip really changed the gold answers, so this test would see a prompt that depends on them.
    before, after = answers(reader, path), answers(reader, flipped)
    assert sum(before[i] != after[i] for i in before) >= len(before) // 2


def test_cuad_and_general_readers_render_the_same_prompt_for_any_answer(tmp_path):
    def flipped_prompts(reader: str, records: list[tuple[dict, dict]]) -> None:
        convert = READERS[reader].convert
        source = RawSource(path=tmp_path / "anatomy_test.csv")
        for record, other in records:
            rows = [convert(r, "here", source) for r in (record, other)]
            assert rows[0]["answer"] != rows[1]["answer"]
            assert formats.mcq_prompt(rows[0]) == formats.mcq_prompt(rows[1])

    clause = "['The Licensee shall not assign this Agreement without consent.']"
    cuad = {"Filename": "x", "category": "Anti-Assignment", "clause": clause, "asked": "Anti-Assignment"}
    flipped_prompts("cuad", [({**cuad, "answer": "Yes"}, {**cuad, "answer": "No"})])
    mcq = {"question": "Which is a fruit?", "options": ["apple", "brick"], "context": "A list."}
    flipped_prompts("mcq_jsonl", [({**mcq, "answer": "A"}, {**mcq, "answer": "B"})])
    mmlu = {"0": "Which is a fruit?", "1": "apple", "2": "brick", "3": "bolt", "4": "nut"}
    flipped_prompts("mmlu_csv", [({**mmlu, "5": "A"}, {**mmlu, "5": "C"})])
