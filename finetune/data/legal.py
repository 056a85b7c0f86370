"""Legal sources in their upstream formats: ContractNLI, CUAD (master_clauses.csv) and LegalBench tasks."""

from __future__ import annotations

import ast
import math
import re
from collections import Counter
from collections.abc import Iterator

from finetune.data import files, readers
from finetune.data.formats import bad_row
from finetune.errors import FinetuneError

LEGALBENCH_LICENSE = "CC BY 4.0 / CC BY-SA 4.0 / MIT, per task"

# Contracts run to 40k characters (~10k tokens) while the training rows must fit a small model's
# max_length, so a legal context keeps at most this many characters of the spans that match the hypothesis.
CONTEXT_CHARS = 3000
BM25_K1, BM25_B = 1.5, 0.75
GAP = "\n[...]\n"

CC_BY = "CC BY 4.0"
CONTRACTNLI_LABELS = ("Entailment", "Contradiction", "NotMentioned")
CONTRACTNLI_INSTRUCTION = (
    "The context is an excerpt from a non-disclosure agreement. Decide whether the agreement entails the "
    "hypothesis, contradicts it, or does not mention it."
)

# CUAD's Yes/No categories (the other eight, e.g. Parties or Governing Law, hold free-text answers).
# Questions are written for this project after CUAD's category descriptions.
CUAD_QUESTIONS = {
    "Most Favored Nation": "Does the clause entitle a party to terms at least as favourable as those the counterparty "
    "gives to third parties?",
    "Competitive Restriction Exception": "Does the clause carve out an exception to a non-compete, exclusivity or "
    "no-solicit restriction?",
    "Non-Compete": "Does the clause restrict a party from competing with the counterparty or from operating in a "
    "field or area?",
    "Exclusivity": "Does the clause create exclusive dealing, such as a duty to buy from, sell to or license only one "
    "party?",
    "No-Solicit Of Customers": "Does the clause forbid a party from soliciting the counterparty's customers?",
    "No-Solicit Of Employees": "Does the clause forbid a party from soliciting or hiring the counterparty's employees?",
    "Non-Disparagement": "Does the clause forbid a party from disparaging the counterparty?",
    "Termination For Convenience": "Does the clause let a party terminate the contract without cause, on notice?",
    "Rofr/Rofo/Rofn": "Does the clause give a party a right of first refusal, first offer or first negotiation?",
    "Change Of Control": "Does the clause give a party rights, such as termination or consent, when the counterparty "
    "changes control, merges or sells its assets?",
    "Anti-Assignment": "Does the clause require consent or notice before a party may assign the contract?",
    "Revenue/Profit Sharing": "Does the clause require a party to share revenue or profit with the counterparty?",
    "Price Restrictions": "Does the clause restrict a party's ability to raise or lower prices?",
    "Minimum Commitment": "Does the clause set a minimum quantity, volume or amount that a party must buy or sell?",
    "Volume Restriction": "Does the clause cap usage or change the fees when usage passes a set volume?",
    "Ip Ownership Assignment": "Does the clause assign ownership of intellectual property to the counterparty?",
    "Joint Ip Ownership": "Does the clause provide for intellectual property owned jointly by the parties?",
    "License Grant": "Does the clause grant a licence to use intellectual property?",
    "Non-Transferable License": "Does the clause make a licence non-transferable or forbid sublicensing?",
    "Affiliate License-Licensor": "Does the clause license intellectual property owned by the licensor's affiliates?",
    "Affiliate License-Licensee": "Does the clause extend a licence to the licensee's affiliates?",
    "Unlimited/All-You-Can-Eat-License": "Does the clause grant an unlimited-use licence, such as an enterprise-wide "
    "or all-you-can-eat licence?",
    "Irrevocable Or Perpetual License": "Does the clause grant an irrevocable or perpetual licence?",
    "Source Code Escrow": "Does the clause require source code to be deposited with an escrow agent?",
    "Post-Termination Services": "Does the clause oblige a party to provide services or cooperation after the "
    "contract ends, such as transition support?",
    "Audit Rights": "Does the clause let a party audit the counterparty's books, records or premises to check "
    "compliance?",
    "Uncapped Liability": "Does the clause leave a party's liability uncapped for some breach or claim?",
    "Cap On Liability": "Does the clause cap a party's liability?",
    "Liquidated Damages": "Does the clause fix liquidated damages or a termination fee payable on breach or "
    "termination?",
    "Warranty Duration": "Does the clause set how long a warranty lasts?",
    "Insurance": "Does the clause require a party to carry insurance?",
    "Covenant Not To Sue": "Does the clause restrict a party from suing the counterparty or challenging its rights, "
    "such as its intellectual property?",
    "Third Party Beneficiary": "Does the clause name a third party that may enforce the contract?",
}
CUAD_CATEGORIES = list(CUAD_QUESTIONS)
CUAD_INSTRUCTION = (
    "The context is a clause extracted from a commercial contract. Decide whether it is an instance of "
    "the clause type the question describes."
)
YES_NO = {"Yes": "Yes", "No": "No"}

# LegalBench columns that are not model input: ids and provenance, and diversity_*'s two sub-answers
# (they would leak the label).
LEGALBENCH_NOT_INPUT = {
    "index",
    "answer",
    "document_name",
    "slice",
    "case id",
    "Docket No.",
    "year",
    "parties_are_diverse",
    "aic_is_met",
}
LEGALBENCH_MAX_LABELS = 12


def _fit(pieces: list[str], budget: int = CONTEXT_CHARS) -> str:
    """Whole pieces in order while they fit the budget; a first piece longer than it is cut at a word."""
    kept, size = [], -len(GAP)
    for piece in pieces:
        if size + len(GAP) + len(piece) > budget:
            if not kept:
                kept.append(piece[: budget - 6].rsplit(" ", 1)[0] + " [...]")
            break
        kept.append(piece)
        size += len(GAP) + len(piece)
    return GAP.join(kept)


# ---------------------------------------------------------------- ContractNLI


def contractnli_records(source: readers.RawSource) -> Iterator[tuple[str, dict]]:
    """One record per (document, hypothesis): every document is annotated for every hypothesis in `labels`. Splits
    are by contract, so no contract is in two: validation is a fixed fifth (by the file name's hash), train the rest."""
    path = files.local_path(source.path, source.hub, "contractnli")
    data = files.parse_json(path)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("labels"), dict)
        or not isinstance(data.get("documents"), list)
    ):
        found = list(data) if isinstance(data, dict) else type(data).__name__
        raise FinetuneError(
            f"{path}: expected ContractNLI's layout (an object with 'labels' and 'documents'), found {found}; point "
            "data.sources[].path at train.json, dev.json or test.json"
        )
    readers.check_split(source, "contractnli")
    for index, document in enumerate(data["documents"]):
        name = document.get("id", index) if isinstance(document, dict) else index
        key = document.get("file_name", str(name)) if isinstance(document, dict) else str(name)
        if not readers.in_split(source.split, str(key)):
            continue
        for hypothesis_id, label in data["labels"].items():
            hypothesis = label.get("hypothesis") if isinstance(label, dict) else label
            yield (
                f"{path}: document {name}, {hypothesis_id}",
                {"document": document, "hypothesis_id": hypothesis_id, "hypothesis": hypothesis},
            )


def _terms(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def retrieve(text: str, spans: list[list[int]], query: str, budget: int = CONTEXT_CHARS) -> list[int]:
    """The spans a label-blind retriever gives for the query, in document order: the contract's spans ranked by BM25
    against the query (the hypothesis), taken best first while they fit the character budget. The gold label and
    evidence play no part, so training and evaluation prompts are built as a user's would be."""
    bags = [Counter(_terms(text[start:end])) for start, end in spans]
    sizes = [sum(bag.values()) for bag in bags]
    average = sum(sizes) / len(bags) or 1.0
    words = set(_terms(query))
    frequency = {w: sum(w in bag for bag in bags) for w in words}
    idf = {w: math.log(1 + (len(bags) - frequency[w] + 0.5) / (frequency[w] + 0.5)) for w in words}

    def score(i: int) -> float:
        bag, norm = bags[i], BM25_K1 * (1 - BM25_B + BM25_B * sizes[i] / average)
        return sum(idf[w] * bag[w] * (BM25_K1 + 1) / (bag[w] + norm) for w in words if bag[w])

    ranked = sorted(range(len(spans)), key=lambda i: (-score(i), i))
    chosen, size = [], 0
    for i in ranked:
        # Each span may cost a "[...]" gap (or the spaces joining it to its neighbour) on top of its own text.
        length = spans[i][1] - spans[i][0] + len(GAP)
        if size + length <= budget:
            chosen.append(i)
            size += length
    return sorted(chosen) or ranked[:1]  # a best span longer than the budget is cut by _excerpt


def _excerpt(text: str, spans: list[list[int]], chosen: list[int]) -> str:
    """The chosen spans in document order: adjacent ones as one run of the contract, "[...]" where text is left out."""
    runs, start = [], chosen[0]
    for previous, current in zip(chosen, chosen[1:] + [None]):
        if current != previous + 1:
            runs.append(text[spans[start][0] : spans[previous][1]].strip())
            start = current
    lead = "[...]\n" if chosen[0] > 0 else ""
    tail = "\n[...]" if chosen[-1] < len(spans) - 1 else ""
    body = GAP.join(runs)
    if len(body) > CONTEXT_CHARS:  # one span longer than the budget
        body = body[: CONTEXT_CHARS - 6].rsplit(" ", 1)[0] + " [...]"
    return lead + body + tail


@readers.reader("contractnli", "mcq", records=contractnli_records, card="legal/contractnli.md", license=CC_BY)
def contractnli_convert(record: dict, where: str, source: readers.RawSource) -> dict:
    """ContractNLI (train/dev/test.json): one NDA x hypothesis pair -> Entailment / Contradiction / NotMentioned;
    context = the contract's spans that best match the hypothesis (BM25, label-blind), in document order, up to 3,000
    characters; the evidence spans as rationale. Splits by contract: train, validation (a fixed fifth), all."""
    document, hypothesis_id = record["document"], record["hypothesis_id"]
    if not isinstance(document, dict):
        raise bad_row(where, "documents[]", "an object with text, spans, annotation_sets", document)
    text, spans = document.get("text"), document.get("spans")
    if not isinstance(text, str) or not text.strip():
        raise bad_row(where, "text", "the contract text (a non-empty string)", text)
    if (
        not isinstance(spans, list)
        or not spans
        or not all(isinstance(s, list) and len(s) == 2 and 0 <= s[0] <= s[1] <= len(text) for s in spans)
    ):
        raise bad_row(where, "spans", "a non-empty list of [start, end] character offsets into text", spans)
    try:
        annotation = document["annotation_sets"][0]["annotations"][hypothesis_id]
    except (KeyError, IndexError, TypeError):
        raise bad_row(
            where,
            f"annotation_sets[0].annotations.{hypothesis_id}",
            "the hypothesis's {choice, spans} annotation",
            None,
        ) from None
    choice = annotation.get("choice") if isinstance(annotation, dict) else None
    if choice not in CONTRACTNLI_LABELS:
        raise bad_row(where, f"annotations.{hypothesis_id}.choice", f"one of {', '.join(CONTRACTNLI_LABELS)}", choice)
    evidence = annotation.get("spans")
    if not isinstance(evidence, list) or not all(isinstance(i, int) and 0 <= i < len(spans) for i in evidence):
        raise bad_row(
            where, f"annotations.{hypothesis_id}.spans", f"indices into the document's {len(spans)} spans", evidence
        )
    hypothesis = record["hypothesis"]
    if not isinstance(hypothesis, str) or not hypothesis.strip():
        raise bad_row(where, f"labels.{hypothesis_id}.hypothesis", "a non-empty string", hypothesis)
    evidence = sorted(set(evidence))
    return {
        "id": f"contractnli-{document.get('id')}-{hypothesis_id}",
        "question": "Is this hypothesis entailed, contradicted or not mentioned by the agreement? "
        f'"{hypothesis.strip()}"',
        "options": {label: label for label in CONTRACTNLI_LABELS},
        "answer": choice,
        "context": _excerpt(text, spans, retrieve(text, spans, hypothesis)),
        "explanation": " ".join(text[spans[i][0] : spans[i][1]].strip() for i in evidence) or None,
        "instruction": CONTRACTNLI_INSTRUCTION,
        "group": f"contractnli-{document.get('id')}",
    }


# ---------------------------------------------------------------- CUAD


def cuad_records(source: readers.RawSource) -> Iterator[tuple[str, dict]]:
    """Two records per present clause: is it its own category (Yes), is it a category the contract lacks (No).

    CUAD has no contract texts, and a category marked No has no clause, so "clause text -> Yes/No"
    would be answerable from an empty context. Instead, as LegalBench's cuad_* tasks do, every
    extracted clause is asked about its own category (Yes) and about the next category, in column
    order, that the same contract does not have at all (No): that negative is certain, balanced
    with the positives, and deterministic.
    """
    checked = False
    for where, contract in source.records():
        if not checked:
            missing = [c for c in CUAD_QUESTIONS for column in (c, f"{c}-Answer") if column not in contract]
            if missing:
                raise FinetuneError(
                    f"{where}: not CUAD's master_clauses.csv layout: no column {missing[0]!r}; point "
                    "data.sources[].path at master_clauses.csv"
                )
            checked = True
        absent = [i for i, c in enumerate(CUAD_QUESTIONS) if contract[f"{c}-Answer"].strip() == "No"]
        for position, category in enumerate(CUAD_QUESTIONS):
            # Two upstream cells say Yes with no clause extracted: nothing to show the model.
            if contract[f"{category}-Answer"].strip() != "Yes" or contract[category].strip() in ("", "[]"):
                continue
            record = {"Filename": contract.get("Filename", ""), "category": category, "clause": contract[category]}
            yield f"{where} ({category})", {**record, "asked": category, "answer": "Yes"}
            later = [i for i in absent if i > position] or absent
            if later:
                asked = CUAD_CATEGORIES[later[0]]
                yield f"{where} ({category} asked as {asked})", {**record, "asked": asked, "answer": "No"}


@readers.reader(
    "cuad", "mcq", records=cuad_records, card="legal/cuad.md", license="CC BY 4.0", hub="theatticusproject/cuad"
)
def cuad_convert(record: dict, where: str, source: readers.RawSource) -> dict:
    """CUAD v1 master_clauses.csv: each extracted clause -> Yes for its own clause type and No for a type the contract
    lacks (33 Yes/No categories)."""
    try:
        excerpts = ast.literal_eval(record["clause"])
    except (ValueError, SyntaxError):
        excerpts = None
    if not isinstance(excerpts, list) or not excerpts or not all(isinstance(e, str) and e.strip() for e in excerpts):
        raise bad_row(
            where,
            record["category"],
            "a Python-list-style string of clause excerpts, e.g. \"['...']\"",
            record["clause"],
        )
    asked = record["asked"]
    return {
        "id": f"cuad-{record['Filename']}-{record['category']}-{asked}",
        "question": f"{CUAD_QUESTIONS[asked]} (clause type: {asked})",
        "options": YES_NO,
        "answer": record["answer"],
        "context": _fit([" ".join(e.split()) for e in excerpts]),
        "explanation": None,
        "instruction": CUAD_INSTRUCTION,
        "group": f"cuad-{record['Filename']}",
    }


# ---------------------------------------------------------------- LegalBench


def _legalbench_card(source: readers.RawSource) -> tuple[str | None, str | None]:
    """The task's one-line description (the card's '###' heading) and '**Task type**', when the card is beside it."""
    if source.path is None:
        return None, None
    cards = [p for p in source.path.parent.iterdir() if p.name.lower() == "readme.md"]
    if not cards:
        return None, None
    card = files.read_text(cards[0])
    heading = re.search(r"^###\s*(.+)$", card, re.M)
    task_type = re.search(r"\*\*Task type\*\*:\s*(.+)", card)
    instruction = heading.group(1).replace("*", "").strip() if heading else None
    return instruction, task_type.group(1).strip() if task_type else None


def legalbench_records(source: readers.RawSource) -> Iterator[tuple[str, dict]]:
    """A task file's rows, each carrying the task's label set (the answers seen in the whole file) and instruction."""
    task = source.path.parent.name if source.path else source.config or source.name
    rows = list(source.records())
    if not rows:
        raise FinetuneError(
            f"{source.name}: legalbench task {task} has no rows (header only); pick another task or split"
        )
    instruction, task_type = _legalbench_card(source)
    labels = sorted({str(record.get("answer", "")).strip() for _, record in rows} - {""})
    problem = None
    if task_type and "classification" not in task_type.lower():
        problem = f"its card says the task type is '{task_type}'"
    elif all(re.fullmatch(r"[A-Z]", label) for label in labels):
        problem = "its answers are option letters whose option texts are not in the file"
    elif len(labels) > LEGALBENCH_MAX_LABELS or any(len(label) > 60 for label in labels):
        problem = f"its {len(labels)} distinct answers are not a small set of short labels"
    elif len(labels) < 2:
        problem = f"the file shows only {len(labels)} answer label(s) {labels}"
    elif not all(re.search(r"[A-Za-z]", label) for label in labels):
        problem = f"its answers {labels[:4]} are values, not class labels"
    if problem:
        raise FinetuneError(
            f"{source.name}: legalbench task {task}: {problem}; the legalbench reader reads classification tasks "
            "only; pick one listed in datasets/legal/legalbench.md"
        )
    for where, record in rows:
        yield where, {"row": record, "labels": labels, "instruction": instruction, "task": task}


@readers.reader(
    "legalbench",
    "mcq",
    records=legalbench_records,
    card="legal/legalbench.md",
    license=LEGALBENCH_LICENSE,
    hub="nguha/legalbench",
)
def legalbench_convert(record: dict, where: str, source: readers.RawSource) -> dict:
    """One LegalBench classification task (tasks/<task>/train.tsv or test.tsv, or nguha/legalbench with config=<task>):
    the card's instruction + the input columns -> one of the answer labels seen in the file."""
    row = record["row"]
    answer = str(row.get("answer", "")).strip()
    if answer not in record["labels"]:
        raise bad_row(where, "answer", f"one of the task's labels {record['labels']}", row.get("answer"))
    inputs = {
        k: str(v).strip() for k, v in row.items() if k not in LEGALBENCH_NOT_INPUT and v is not None and str(v).strip()
    }
    if not inputs:
        raise bad_row(where, "(input columns)", "at least one non-empty input column such as text", row)
    question = inputs.pop("question", None)
    rendered = (
        "\n".join(f"{name}: {value}" for name, value in inputs.items())
        if len(inputs) > 1
        else next(iter(inputs.values()), None)
    )
    return {
        "id": f"legalbench-{record['task']}-{row.get('index', where)}",
        "question": question or rendered,
        "options": {label: label for label in record["labels"]},
        "answer": answer,
        "context": rendered if question else None,
        "explanation": None,
        "instruction": record["instruction"],
    }
