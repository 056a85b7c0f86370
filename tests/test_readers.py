"""Every domain reader on the real upstream files in ../shared/data (counts and label mixes from each
SOURCE.md, one exact rendered row each), on the project's own samples in datasets/, and on bad records."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import PROJECT, shared_data

from finetune.data import formats, legal
from finetune.data.readers import READERS, RawSource
from finetune.errors import FinetuneError

SAMPLES = PROJECT / "datasets"


def read(
    reader: str, path: Path | None, split: str = "train", columns: dict | None = None, hub: str | None = None
) -> tuple[list[dict], list[str]]:
    """Validated rows and the error lines of skipped records, as data.build reads a source with on_bad_row=skip."""
    spec = READERS[reader]
    source = RawSource(path=path, hub=hub, split=split, columns=columns or {})
    rows, errors = [], []
    for where, record in spec.records(source):
        try:
            rows.append(formats.CHECKS[spec.kind](spec.convert(record, where, source), where))
        except FinetuneError as e:
            errors.append(str(e))
    return rows, errors


def rows_of(reader: str, path: Path, **kwargs) -> list[dict]:
    rows, errors = read(reader, path, **kwargs)
    assert errors == []
    return rows


def answers(rows: list[dict]) -> dict:
    return dict(Counter(row["answer"] for row in rows))


def one_error(reader: str, path: Path, **kwargs) -> str:
    """The single error a bad file or record gives, whether the whole file or only the record fails."""
    try:
        rows, errors = read(reader, path, **kwargs)
    except FinetuneError as e:
        return str(e)
    assert len(errors) == 1, (rows, errors)
    return errors[0]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_every_reader_is_registered_with_a_card_and_license():
    expected = {
        "messages",
        "pubmedqa",
        "pubmedqa_reasoning_free",
        "medmcqa",
        "sharegpt",
        "alpaca",
        "prompt_completion",
        "mmlu_csv",
        "mcq_jsonl",
        "preference",
        "preference_messages",
        "hh_rlhf",
        "contractnli",
        "cuad",
        "legalbench",
        "tatqa",
        "tatqa_conversation",
        "convfinqa",
        "phrasebank",
    }
    assert expected <= set(READERS)
    for reader in READERS.values():
        assert reader.kind in formats.KINDS and reader.description
        assert (SAMPLES / reader.card).is_file(), f"{reader.name}: card datasets/{reader.card} is missing"
    assert READERS["phrasebank"].commercial_use is False
    assert not (SAMPLES / "__init__.py").exists()


# ---------------------------------------------------------------- real data: medical


def test_pubmedqa_splits_on_real_data():
    path = shared_data("medical/pubmedqa/ori_pqal.json")
    splits = ("train", "validation", "test", "all")
    train, validation, test, everything = (rows_of("pubmedqa", path, split=s) for s in splits)
    assert (len(train), len(validation), len(test), len(everything)) == (400, 100, 500, 1000)
    assert answers(train) == {"yes": 219, "no": 138, "maybe": 43}
    assert answers(validation) == {"yes": 57, "no": 31, "maybe": 12}
    assert answers(test) == {"yes": 276, "no": 169, "maybe": 55}
    assert answers(everything) == {"yes": 552, "no": 338, "maybe": 110}
    ids = [{r["id"] for r in rows} for rows in (train, validation, test)]
    assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]
    assert ids[0] | ids[1] | ids[2] == {r["id"] for r in everything}
    first = train[0]
    assert first["id"] == "pubmedqa-10808977"
    assert formats.mcq_prompt(first).endswith(
        "promoting being on schedule with screening during 1996 and 1997 among women who were off-schedule during the "
        "previous year."
        "\n\nQuestion: Can tailored interventions increase mammography use among HMO women?\n\nAnswer with one of: "
        "yes, no, maybe."
    )
    assert formats.mcq_answer(first).startswith(
        "yes\n\nThe effects of the intervention were most pronounced after the first intervention."
    )


def test_medmcqa_on_real_data():
    rows = rows_of("medmcqa", shared_data("medical/medmcqa/test.jsonl"))
    assert len(rows) == 2816
    assert answers(rows) == {"A": 950, "B": 735, "C": 617, "D": 514}
    assert formats.to_sft(rows[0], "mcq")["messages"] == [
        {
            "role": "user",
            "content": "Question: A 29 yrs old woman with a pregnancy of 17 week has a 10 years old boy with down "
            "syndrome. She does not "
            "want another down syndrome kid; best advice to her is\n\nOptions:\n"
            "A. No test is required now as her age is below 35 years\n"
            "B. Ultra sound at this point of time will definitely tell her that next baby will be down syndromic or "
            "not\n"
            "C. Amniotic fluid samples plus chromosomal analysis will definitely tell her that next baby will be down "
            "syndromic or not\n"
            "D. blood screening at this point of time will clear the exact picture\n"
            "Answer with the letter of the correct option.",
        },
        {"role": "assistant", "content": "C"},
    ]
    assert rows[0]["id"] == "medmcqa-b64a9cd7-d076-4c55-8be1-f9c44fece6cc"


# ---------------------------------------------------------------- real data: legal


def test_contractnli_on_real_data():
    dev_file, test_file = shared_data("legal/contract-nli/dev.json"), shared_data("legal/contract-nli/test.json")
    dev, test = rows_of("contractnli", dev_file, split="all"), rows_of("contractnli", test_file, split="all")
    assert len(dev) == 1037 and answers(dev) == {"Entailment": 519, "Contradiction": 95, "NotMentioned": 423}
    assert len(test) == 2091 and answers(test) == {"Entailment": 968, "Contradiction": 220, "NotMentioned": 903}
    # Splits by contract: 10 of dev's 61 contracts (170 pairs) validate, the other 51 train.
    train, validation = (rows_of("contractnli", dev_file, split=s) for s in ("train", "validation"))
    assert (len(train), len(validation)) == (867, 170)
    contracts = [{r["id"].rsplit("-", 2)[0] for r in rows} for rows in (train, validation)]
    assert not contracts[0] & contracts[1] and len(contracts[1]) == 10
    # A contract's 17 hypotheses share its group, which the evaluation's bootstrap resamples as one.
    assert all(r["group"] == r["id"].rsplit("-", 2)[0] for r in dev + test)
    assert [len({r["group"] for r in rows}) for rows in (test, validation)] == [123, 10]
    assert answers(validation) == {"Entailment": 98, "Contradiction": 14, "NotMentioned": 58}
    # Contexts stay within the budget (plus the [...] markers at either end).
    assert max(len(r["context"]) for r in dev + test) <= legal.CONTEXT_CHARS + 12
    assert all((r["explanation"] is None) == (r["answer"] == "NotMentioned") for r in dev)
    first = dev[0]
    assert first["id"] == "contractnli-3-nda-11"
    assert first["context"].startswith("[...]\nIn respect of Confidential Information disclosed in documentary form")
    assert first["context"].endswith(
        "from the date of disclosure of the Confidential Information.\n[...]\n<Party>\n[...]"
    )
    assert (
        "f) Not to alter, modify, disassemble, reverse engineer or decompile any Confidential Information;"
        in first["context"]
    )
    assert formats.mcq_prompt(first).endswith(
        'Question: Is this hypothesis entailed, contradicted or not mentioned by the agreement? "Receiving Party '
        "shall not reverse "
        "engineer any objects which embody Disclosing Party's Confidential Information.\"\n\n"
        "Answer with one of: Entailment, Contradiction, NotMentioned."
    )
    assert formats.mcq_answer(first) == (
        "Entailment\n\nThe Receiving Parties undertake and agree: f) Not to alter, modify, disassemble, reverse "
        "engineer or decompile "
        "any Confidential Information;"
    )


def test_the_label_blind_retriever_finds_the_evidence_of_most_entailed_or_contradicted_pairs():
    """What the label-blind contexts cost: the pairs whose context holds some / all of their gold evidence spans
    (dev 532 / 322 of 614, test 1,055 / 652 of 1,188; datasets/legal/contractnli.md)."""
    for name, expected in (("dev", (614, 532, 322)), ("test", (1188, 1055, 652))):
        data = json.loads(shared_data(f"legal/contract-nli/{name}.json").read_text())
        pairs = some = every = 0
        for document in data["documents"]:
            for hypothesis_id, label in data["labels"].items():
                annotation = document["annotation_sets"][0]["annotations"][hypothesis_id]
                if annotation["choice"] == "NotMentioned":
                    continue
                chosen = set(legal.retrieve(document["text"], document["spans"], label["hypothesis"]))
                evidence = set(annotation["spans"])
                pairs, some, every = pairs + 1, some + bool(evidence & chosen), every + (evidence <= chosen)
        assert (pairs, some, every) == expected, name


def test_contractnli_context_is_deterministic():
    path = shared_data("legal/contract-nli/dev.json")
    assert rows_of("contractnli", path)[:40] == rows_of("contractnli", path)[:40]


def test_cuad_on_real_data():
    rows = rows_of("cuad", shared_data("legal/cuad/master_clauses.csv"))
    # 3,688 Yes cells, less the two with no clause extracted; one certain negative per positive.
    assert len(rows) == 7372 and answers(rows) == {"Yes": 3686, "No": 3686}
    assert max(len(r["context"]) for r in rows) <= legal.CONTEXT_CHARS
    assert formats.mcq_prompt(rows[0]) == (
        "The context is a clause extracted from a commercial contract. Decide whether it is an instance of the clause "
        "type the question describes."
        "\n\nContext:\nCompany shall not specify the business practices of MA, nor regulate the manner in which MA "
        "shall operate its business, "
        "provided that MA (a) conducts business in a manner that reflects favorably at all times on the Technology "
        "sold and the good name, "
        "goodwill and reputation of Company and its affiliates<omitted>"
        "\n\nQuestion: Does the clause forbid a party from disparaging the counterparty? (clause type: "
        "Non-Disparagement)"
        "\n\nAnswer with one of: Yes, No."
    )
    assert rows[1]["context"] == rows[0]["context"] and rows[1]["answer"] == "No"
    assert (
        rows[0]["group"]
        == rows[1]["group"]
        == "cuad-CybergyHoldingsInc_20140520_10-Q_EX-10.27_8605784_EX-10.27_Affiliate Agreement.pdf"
    )
    assert len({r["group"] for r in rows}) == 463  # contracts
    assert rows[1]["question"].endswith("(clause type: Termination For Convenience)")


LEGALBENCH_REJECTED = {
    "citation_prediction_open": "its card says the task type is 'Open generation'",
    "definition_extraction": "its card says the task type is 'Extraction'",
    "maud_specific_performance": "its answers are option letters whose option texts are not in the file",
    "sara_numeric": "its answers ['$0', '$19039', '$27181', '$62000'] are values, not class labels",
}


def test_legalbench_on_real_data():
    tasks = shared_data("legal/legalbench/tasks")
    read_ok, total, rejected = 0, 0, {}
    for task in sorted(p.name for p in tasks.iterdir()):
        path = tasks / task / "train.tsv"
        try:
            rows = rows_of("legalbench", path)
        except FinetuneError as e:
            rejected[task] = str(e)
            continue
        read_ok, total = read_ok + 1, total + len(rows)
    assert (read_ok, total) == (89, 579)
    assert len(rejected) == 43 and sum(t.startswith("maud_") for t in rejected) == 34
    for task, reason in LEGALBENCH_REJECTED.items():
        assert rejected[task] == (
            f"{tasks / task / 'train.tsv'}: legalbench task {task}: {reason}; the legalbench reader reads "
            "classification tasks only; "
            "pick one listed in datasets/legal/legalbench.md"
        )
    assert (
        rejected["rule_qa"]
        == f"{tasks / 'rule_qa' / 'train.tsv'}: legalbench task rule_qa has no rows (header only); pick another task "
        "or split"
    )
    rows = rows_of("legalbench", tasks / "abercrombie" / "train.tsv")
    assert answers(rows) == {"generic": 1, "descriptive": 1, "suggestive": 1, "arbitrary": 1, "fanciful": 1}
    assert formats.to_sft(rows[1], "mcq")["messages"] == [
        {
            "role": "user",
            "content": "Determine the Abercrombie classification for a mark/product pair.\n\n"
            'Question: The mark "Tasty" for bread.\n\nAnswer with one of: arbitrary, descriptive, fanciful, generic, '
            "suggestive.",
        },
        {"role": "assistant", "content": "descriptive"},
    ]
    # A task with a question column: the question is asked about the other columns.
    contract_qa = rows_of("legalbench", tasks / "contract_qa" / "train.tsv")[0]
    assert contract_qa["question"] == "Does the clause discuss PII data breaches?"
    assert contract_qa["context"].startswith("In the event of a data breach involving the unauthorized access")
    # diversity_*'s sub-answer columns would give the label away.
    assert "aic_is_met" not in rows_of("legalbench", tasks / "diversity_1" / "train.tsv")[0]["question"]


# ---------------------------------------------------------------- real data: finance and preference


def test_tatqa_on_real_data():
    dev_file = shared_data("finance/tat-qa/tatqa_dataset_dev.json")
    dev = rows_of("tatqa", dev_file, split="all")
    test = rows_of("tatqa", shared_data("finance/tat-qa/tatqa_dataset_test_gold.json"), split="all")
    assert (len(dev), len(test)) == (1668, 1663)
    reports = rows_of("tatqa_conversation", dev_file, split="all")
    assert len(reports) == 278 and sum(1 + len(r["history"]) // 2 for r in reports) == 1668
    # Splits by report: 56 of dev's 278 reports (336 questions) validate, the other 222 train.
    train, validation = (rows_of("tatqa_conversation", dev_file, split=s) for s in ("train", "validation"))
    assert (len(train), len(validation)) == (222, 56)
    assert [len(rows_of("tatqa", dev_file, split=s)) for s in ("train", "validation")] == [1332, 336]
    assert not {r["id"] for r in train} & {r["id"] for r in validation}
    # Questions of one report share its group: 277 test reports, 56 validation ones.
    assert len({r["group"] for r in test}) == 277
    assert len({r["group"] for r in rows_of("tatqa", dev_file, split="validation")}) == 56
    assert {r["group"] for r in train} == {r["group"] for r in rows_of("tatqa", dev_file, split="train")}
    assert Counter(r["scale"] for r in dev) == {
        None: 794,
        "thousand": 345,
        "percent": 268,
        "million": 254,
        "billion": 7,
    }
    # Spans stay verbatim (the report prints "27.0"); computed numbers lose a trailing .0 (see the sample test).
    assert Counter(r["answer"] for r in dev)["27.0"] == 1
    by_id = {r["id"]: r for r in dev}
    assert (
        by_id["tatqa-593c4388-5209-4462-8b83-b429c8612c25"]["answer"]
        == "fixed-price type, cost-plus type, time-and-material type"
    )
    assert formats.to_sft(by_id["tatqa-eb787966-fa02-401f-bfaf-ccabf3828b23"], "qa")["messages"] == [
        {
            "role": "user",
            "content": "Context:\n|  |  | Years Ended September 30, |  |\n| --- | --- | --- | --- |\n|  | 2019 | 2018 "
            "| 2017 |\n"
            "| Fixed Price | $ 1,452.4 | $ 1,146.2 | $ 1,036.9 |\n| Other | 44.1 | 56.7 | 70.8 |\n| Total sales | "
            "$1,496.5 | $1,202.9 | $1,107.7 |\n\n"
            "Sales by Contract Type: Substantially all of our contracts are fixed-price type contracts. Sales "
            "included in Other contract types "
            "represent cost plus and time and material type contracts.\n\n"
            "On a fixed-price type contract, we agree to perform the contractual statement of work for a "
            "predetermined sales price. On a "
            "cost-plus type contract, we are paid our allowable incurred costs plus a profit which can be fixed or "
            "variable depending on the "
            "contract’s fee arrangement up to predetermined funding levels determined by the customer. On a "
            "time-and-material type contract, "
            "we are paid on the basis of direct labor hours expended at specified fixed-price hourly rates (that "
            "include wages, overhead, "
            "allowable general and administrative expenses and profit) and materials at cost. The table below "
            "presents total net sales "
            "disaggregated by contract type (in millions):\n\nQuestion: What is the change in Other in 2019 from 2018?",
        },
        {"role": "assistant", "content": "-12.6 million"},
    ]


def test_convfinqa_on_real_data():
    rows = rows_of("convfinqa", shared_data("finance/convfinqa/convfinqa_dataset.json"))
    assert len(rows) == 421
    # Conversations on one filing page (Single_MRO/2007/page_134.pdf-1, -2, Double_...) share a group: 218 pages.
    assert rows[0]["group"] == "convfinqa-MRO/2007/page_134.pdf" and len({r["group"] for r in rows}) == 218
    assert sum(len(r["history"]) // 2 + 1 for r in rows) == 1490
    messages = formats.to_sft(rows[0], "qa")["messages"]
    assert messages[0]["content"].startswith(
        "Context:\nstock-based awards under the plan stock options 2013 marathon grants"
    )
    assert messages[0]["content"].endswith(
        "|  | 2007 | 2006 | 2005 |\n| --- | --- | --- | --- |\n"
        "| weighted average exercise price per share | 60.94 | 37.84 | 25.14 |\n"
        "| expected annual dividends per share | 0.96 | 0.8 | 0.66 |\n"
        "| expected life in years | 5 | 5.1 | 5.5 |\n"
        "| expected volatility | -27 | -28 | -28 |\n"
        "| risk-free interest rate | -4.1 | -5 | -3.8 |\n"
        "| weighted average grant date fair value of stock option awards granted | 17.24 | 10.19 | 6.15 |\n\n.\n\n"
        "Question: what was the weighted average exercise price per share in 2007?"
    )
    assert messages[1:] == [
        {"role": "assistant", "content": "60.94"},
        {"role": "user", "content": "Question: and what was it in 2005?"},
        {"role": "assistant", "content": "25.14"},
        {"role": "user", "content": "Question: what was, then, the change over the years?"},
        {"role": "assistant", "content": "35.80"},
        {"role": "user", "content": "Question: what was the weighted average exercise price per share in 2005?"},
        {"role": "assistant", "content": "25.14"},
        {
            "role": "user",
            "content": "Question: and how much does that change represent in relation to this 2005 weighted average "
            "exercise price?",
        },
        {"role": "assistant", "content": "142.4%"},
    ]
    # A one-turn conversation keeps the document as the row's context.
    assert all(r["context"] for r in rows if not r["history"])


def test_hh_rlhf_on_real_data():
    helpful, helpful_bad = read("hh_rlhf", shared_data("preference/hh-rlhf/helpful-base/test.jsonl.gz"))
    harmless, harmless_bad = read("hh_rlhf", shared_data("preference/hh-rlhf/harmless-base/test.jsonl.gz"))
    # Upstream defects: empty final replies, and pairs whose conversations diverge before the last reply.
    assert (len(helpful), len(helpful_bad), len(harmless), len(harmless_bad)) == (2339, 15, 2303, 9)
    assert helpful[0]["prompt"] == [
        {"role": "user", "content": "Do you know why turkeys became the official food of thanksgiving?"}
    ]
    assert helpful[0]["chosen"][0]["content"].startswith("To be honest, I don’t know anything about that.")
    assert helpful_bad[0].endswith(
        "test.jsonl.gz:121: field 'rejected': expected at least one non-empty assistant message, found ['assistant']"
    )


# ---------------------------------------------------------------- the project's own samples


def test_pubmedqa_sample():
    path = SAMPLES / "medical/pubmedqa/ori_pqal.json"
    train, validation, test = (rows_of("pubmedqa", path, split=s) for s in ("train", "validation", "test"))
    assert (len(train), len(validation), len(test)) == (23, 7, 10)
    assert answers(train) == {"yes": 11, "no": 8, "maybe": 4} and answers(test) == {"yes": 6, "no": 3, "maybe": 1}
    assert all(len(r["id"]) == len("pubmedqa-") + 8 for r in train + validation + test)


def test_pubmedqa_reasoning_free_asks_the_question_of_the_conclusion_on_the_same_splits():
    path = SAMPLES / "medical/pubmedqa/ori_pqal.json"
    required = {r["id"].removeprefix("pubmedqa-"): r for r in rows_of("pubmedqa", path)}
    free = rows_of("pubmedqa_reasoning_free", path)
    assert sorted(r["id"].removeprefix("pubmedqa-conclusion-") for r in free) == sorted(required)
    for row in free:
        same = required[row["id"].removeprefix("pubmedqa-conclusion-")]
        assert row["context"] == same["explanation"] and row["explanation"] is None
        assert (row["question"], row["answer"], row["options"]) == (same["question"], same["answer"], same["options"])
    assert len(rows_of("pubmedqa_reasoning_free", path, split="test")) == 10


def test_medmcqa_sample():
    rows = rows_of("medmcqa", SAMPLES / "medical/medmcqa_sample.jsonl")
    assert len(rows) == 20 and answers(rows) == {"A": 6, "B": 6, "C": 4, "D": 4}
    assert formats.mcq_prompt(rows[0]) == (
        "Question: Which vitamin deficiency causes scurvy?\n\nOptions:\nA. Vitamin A\nB. Vitamin C\nC. Vitamin D\nD. "
        "Vitamin K\n"
        "Answer with the letter of the correct option."
    )


def test_contractnli_sample():
    rows = rows_of("contractnli", SAMPLES / "legal/contract-nli/train.json")
    assert len(rows) == 24 and answers(rows) == {"Entailment": 12, "Contradiction": 6, "NotMentioned": 6}
    short = next(r for r in rows if r["id"] == "contractnli-3-nda-6")
    assert formats.to_sft(short, "mcq")["messages"][1] == {"role": "assistant", "content": "NotMentioned"}
    assert formats.mcq_prompt(short) == (
        "The context is an excerpt from a non-disclosure agreement. Decide whether the agreement entails the "
        "hypothesis, contradicts it, "
        "or does not mention it.\n\nContext:\nNON-DISCLOSURE AGREEMENT\n"
        'This Agreement is between Northfield Library Consortium ("Northfield") and Brightwave Software Co. '
        '("Brightwave").\n'
        "1. Each party may disclose to the other technical and business information about a catalogue migration "
        "project.\n"
        '2. Information is Confidential Information only if it is labelled "Confidential" when it is disclosed.\n'
        "3. The receiving party shall hold Confidential Information in confidence and use it only for the migration "
        "project.\n"
        "4. The receiving party may share Confidential Information with its employees and contractors who need it for "
        "the project.\n"
        "5. The receiving party may disclose Confidential Information where a statute, regulation or court order "
        "requires disclosure.\n"
        "6. The obligations in this Agreement continue for five years after the project ends or this Agreement is "
        "terminated, whichever is later.\n"
        "7. This Agreement is governed by the laws of the State of Ohio.\n\n"
        'Question: Is this hypothesis entailed, contradicted or not mentioned by the agreement? "The Agreement grants '
        "the Receiving Party "
        "a licence to the Disclosing Party's intellectual property.\"\n\nAnswer with one of: Entailment, "
        "Contradiction, NotMentioned."
    )


def test_contractnli_long_document_keeps_the_spans_that_match_the_hypothesis(tmp_path):
    filler = [
        f"{i}. The parties agree to routine administrative term number {i} of this agreement." for i in range(200)
    ]
    clauses = filler[:120] + ["The Receiving Party shall not reverse engineer any sample."] + filler[120:]
    text, spans = "", []
    for clause in clauses:
        spans.append([len(text), len(text) + len(clause)])
        text += clause + "\n"
    annotation = {"choice": "Entailment", "spans": [120]}
    data = {
        "labels": {"h": {"hypothesis": "The Receiving Party shall not reverse engineer the samples."}},
        "documents": [{"id": 1, "text": text, "spans": spans, "annotation_sets": [{"annotations": {"h": annotation}}]}],
    }
    path = write(tmp_path / "long.json", json.dumps(data))
    (row,) = rows_of("contractnli", path, split="all")
    assert len(text) > 3 * legal.CONTEXT_CHARS and len(row["context"]) <= legal.CONTEXT_CHARS + 12
    # The matching clause is found without being told it is the evidence; equally (un)matching filler fills the rest
    # of the budget from the top, and the text left out between them is marked.
    assert "\n[...]\nThe Receiving Party shall not reverse engineer any sample.\n[...]" in row["context"]
    assert row["context"].startswith("0. The parties agree")
    annotation.update(choice="NotMentioned", spans=[])
    (unlabelled,) = rows_of("contractnli", write(tmp_path / "same.json", json.dumps(data)), split="all")
    assert unlabelled["context"] == row["context"]


def test_tatqa_sample():
    rows = rows_of("tatqa", SAMPLES / "finance/tat-qa/tatqa_sample.json")
    assert len(rows) == 17
    assert [formats.qa_answer(r) for r in rows] == [
        "48,210 thousand",
        "new enterprise customers in Europe, higher renewal rates",
        "5185 thousand",
        "-15.61%",
        "2",
        "Singapore, Sydney",
        "825",
        "North America",
        "4.25%",
        "5.75%",
        "175 million",
        "2029",
        "15516.67 thousand",
        "1.60",
        "-225 thousand",
        "2",
        "310,000, $9.3 million",
    ]
    assert rows[8]["context"].startswith(
        "|  | Total | 2024 | 2025 | 2026 and after |\n| --- | --- | --- | --- | --- |\n| Term loan | $ 450.0 | $ 50.0 "
        "| $ 100.0 | $ 300.0 |"
    )


def test_tatqa_reports_without_a_table_uid_are_split_and_grouped_by_their_position(tmp_path):
    sample = json.loads((SAMPLES / "finance/tat-qa/tatqa_sample.json").read_text(encoding="utf-8"))
    data = [json.loads(json.dumps(context)) for _ in range(4) for context in sample]  # 16 reports, so some validate
    for repeat, context in enumerate(data):
        del context["table"]["uid"]
        for question in context["questions"]:
            question["uid"] = f"{repeat}-{question['uid']}"
    path = write(tmp_path / "no-uid.json", json.dumps(data))
    rows = rows_of("tatqa", path, split="all")
    # One group per report (its position), so an interval resamples a report's questions together.
    assert [r["group"] for r in rows] == [
        f"tatqa-report-{index}" for index, context in enumerate(data) for _ in context["questions"]
    ]
    reports = rows_of("tatqa_conversation", path, split="all")
    assert [r["id"] for r in reports] == [f"tatqa-context-{index}" for index in range(len(data))]
    # The split keys on the same position: each report's questions fall in one split, the splits part the file.
    train, validation = (rows_of("tatqa", path, split=s) for s in ("train", "validation"))
    assert {r["group"] for r in validation} == {"tatqa-report-11", "tatqa-report-13", "tatqa-report-14"}
    assert {r["group"] for r in train}.isdisjoint({r["group"] for r in validation})
    assert sorted(r["id"] for r in train + validation) == sorted(r["id"] for r in rows)


def test_tatqa_conversation_trains_every_question_of_a_report_in_one_row(tokenizer):
    from finetune.data.build import tokenize

    path = SAMPLES / "finance/tat-qa/tatqa_sample.json"
    single = rows_of("tatqa", path)
    reports = rows_of("tatqa_conversation", path)
    assert len(reports) == 4 and sum(1 + len(r["history"]) // 2 for r in reports) == len(single) == 17
    first = reports[0]
    messages = formats.to_sft(first, "qa", "SYS")["messages"]
    # The first turn is exactly the prompt `tatqa` (and evaluation) gives the report's first question.
    assert messages[:3] == formats.to_sft(single[0], "qa", "SYS")["messages"]
    assert all(m["content"].startswith("Question: ") for m in messages[3::2])
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert answers == [
        "48,210 thousand",
        "new enterprise customers in Europe, higher renewal rates",
        "5185 thousand",
        "-15.61%",
    ]
    # Every answer (and its end-of-turn) is trained; nothing else is.
    tokens = tokenize(tokenizer, messages)
    trained = tokenizer.decode([t for t in tokens["labels"] if t != -100])
    assert trained == "".join(f"{a}<|im_end|>" for a in answers)


def test_phrasebank_sample_is_latin1():
    path = SAMPLES / "finance/phrasebank_sample.txt"
    with pytest.raises(UnicodeDecodeError):
        path.read_bytes().decode("utf-8")
    rows = rows_of("phrasebank", path)
    assert len(rows) == 30 and answers(rows) == {"positive": 10, "negative": 9, "neutral": 11}
    assert formats.mcq_prompt(rows[1]) == (
        "Context:\nNet sales of the Tähtiranta Group decreased by 11 % to EUR 212 mn in the first quarter .\n\n"
        "Question: What is the sentiment of this financial news sentence from an investor's point of view?\n\n"
        "Answer with one of: positive, negative, neutral."
    )


# ---------------------------------------------------------------- general formats


def test_general_formats(tmp_path):
    sharegpt = write(
        tmp_path / "chat.jsonl",
        json.dumps(
            {
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Hello."},
                ]
            }
        )
        + "\n",
    )
    assert rows_of("sharegpt", sharegpt)[0]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]

    alpaca = write(
        tmp_path / "alpaca.json",
        json.dumps(
            [
                {"instruction": "Name the bone.", "input": "The thigh bone.", "output": "Femur."},
                {"instruction": "Spell cat.", "input": "", "output": "C-A-T."},
            ]
        ),
    )
    assert [r["messages"][0]["content"] for r in rows_of("alpaca", alpaca)] == [
        "Name the bone.\n\nThe thigh bone.",
        "Spell cat.",
    ]

    completion = write(tmp_path / "pc.jsonl", '{"q": "2+2=", "a": "4"}\n')
    assert rows_of("prompt_completion", completion, columns={"prompt": "q", "completion": "a"})[0]["messages"] == [
        {"role": "user", "content": "2+2="},
        {"role": "assistant", "content": "4"},
    ]

    mmlu = write(
        tmp_path / "college_medicine_test.csv", 'Which organ makes insulin?,Liver,Pancreas,"Kidney, left",Spleen,B\n'
    )
    (row,) = rows_of("mmlu_csv", mmlu)
    assert formats.mcq_prompt(row) == (
        "The following is a multiple choice question about college medicine.\n\nQuestion: Which organ makes "
        "insulin?\n\n"
        "Options:\nA. Liver\nB. Pancreas\nC. Kidney, left\nD. Spleen\nAnswer with the letter of the correct option."
    )

    mcq = write(
        tmp_path / "mcq.jsonl",
        "\n".join(
            json.dumps(r)
            for r in [
                {"question": "Pick two.", "options": ["one", "two"], "answer": 1, "explanation": "Two is two."},
                {
                    "question": "Pick x.",
                    "options": {"x": "ex", "y": "why"},
                    "answer": "x",
                    "context": "Letters.",
                    "group": "alphabet",
                },
            ]
        ),
    )
    first, second = rows_of("mcq_jsonl", mcq)
    assert (first["options"], first["answer"], formats.mcq_answer(first)) == (
        {"A": "one", "B": "two"},
        "B",
        "B\n\nTwo is two.",
    )
    assert (second["answer"], second["context"], first["group"], second["group"]) == ("x", "Letters.", None, "alphabet")

    pairs = write(tmp_path / "pairs.jsonl", json.dumps({"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}) + "\n")
    assert rows_of("preference", pairs) == [
        {
            "prompt": [{"role": "user", "content": "Say hi"}],
            "chosen": [{"role": "assistant", "content": "Hi!"}],
            "rejected": [{"role": "assistant", "content": "No."}],
        }
    ]

    user = {"role": "user", "content": "Say hi"}
    implicit = write(
        tmp_path / "implicit.jsonl",
        json.dumps(
            {
                "chosen": [user, {"role": "assistant", "content": "Hi!"}],
                "rejected": [user, {"role": "assistant", "content": "No."}],
            }
        )
        + "\n",
    )
    assert rows_of("preference_messages", implicit)[0]["prompt"] == [user]


# ---------------------------------------------------------------- bad records and bad files


def test_bad_records_give_one_line_errors(tmp_path):
    medmcqa = write(
        tmp_path / "m.jsonl", json.dumps({"question": "Q?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}}) + "\n"
    )
    assert one_error("medmcqa", medmcqa) == f"{medmcqa}:1: field 'answer_idx': expected one of A, B, C, D, found None"

    wrong = write(
        tmp_path / "w.jsonl",
        json.dumps(
            {"question": "Q?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "B", "answer": "c"}
        )
        + "\n",
    )
    assert one_error("medmcqa", wrong) == f"{wrong}:1: field 'answer': expected the text of option B ('b'), found 'c'"

    mcq = write(
        tmp_path / "mcq.jsonl", json.dumps({"question": "Q?", "options": {"A": "a", "B": "b"}, "answer": "C"}) + "\n"
    )
    assert (
        one_error("mcq_jsonl", mcq)
        == f"{mcq}:1: field 'answer': expected one of the option labels ['A', 'B'], found 'C'"
    )
    mcq = write(
        tmp_path / "mcq.jsonl",
        json.dumps({"question": "Q?", "options": {"A": "a", "B": "b"}, "answer": "A", "group": 7}) + "\n",
    )
    assert one_error("mcq_jsonl", mcq) == f"{mcq}:1: field 'group': expected a non-empty string, found 7"

    alpaca = write(tmp_path / "a.jsonl", json.dumps({"instruction": "Do it."}) + "\n")
    assert one_error("alpaca", alpaca) == f"{alpaca}:1: field 'output': expected a non-empty string, found None"

    sharegpt = write(tmp_path / "s.jsonl", json.dumps({"conversations": [{"from": "bot", "value": "x"}]}) + "\n")
    assert (
        one_error("sharegpt", sharegpt)
        == f"{sharegpt}:1: field 'conversations[0].from': expected one of human, gpt, system, found 'bot'"
    )

    phrasebank = write(tmp_path / "pb.txt", "Sales rose .@positive\nSales fell .@bad\n")
    assert one_error("phrasebank", phrasebank) == (
        f"{phrasebank}:2: field 'label': expected a line 'sentence@label' with label one of positive, negative, "
        "neutral, found 'Sales fell .@bad'"
    )

    tatqa = json.loads((SAMPLES / "finance/tat-qa/tatqa_sample.json").read_text(encoding="utf-8"))[:1]
    tatqa[0]["questions"] = tatqa[0]["questions"][:1]
    tatqa[0]["questions"][0]["scale"] = "crore"
    path = write(tmp_path / "t.json", json.dumps(tatqa))
    uid = tatqa[0]["questions"][0]["uid"]
    assert one_error("tatqa", path) == (
        f"{path}: context 0, question {uid}: field 'scale': expected one of '', 'thousand', 'million', 'billion', "
        "'percent', found 'crore'"
    )

    contractnli = json.loads((SAMPLES / "legal/contract-nli/train.json").read_text(encoding="utf-8"))
    contractnli["documents"] = contractnli["documents"][:1]
    contractnli["labels"] = {"nda-2": contractnli["labels"]["nda-2"]}
    contractnli["documents"][0]["annotation_sets"][0]["annotations"]["nda-2"]["choice"] = "Maybe"
    path = write(tmp_path / "c.json", json.dumps(contractnli))
    assert one_error("contractnli", path) == (
        f"{path}: document 1, nda-2: field 'annotations.nda-2.choice': expected one of Entailment, Contradiction, "
        "NotMentioned, found 'Maybe'"
    )


def test_bad_files_give_one_line_errors(tmp_path):
    truncated = write(
        tmp_path / "train.json", (SAMPLES / "legal/contract-nli/train.json").read_text(encoding="utf-8")[:500]
    )
    assert (
        one_error("contractnli", truncated)
        == f"{truncated}:6: invalid JSON (Unterminated string starting at column 12); fix or re-download the file"
    )

    empty = write(tmp_path / "empty.jsonl", "")
    assert (
        one_error("medmcqa", empty) == f"{empty}: the file is empty; check data.sources[].path or re-download the file"
    )

    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"Sales rose\x00\x81\x90@positive\n")
    assert (
        one_error("phrasebank", binary)
        == f"{binary}: byte 11 is neither UTF-8 nor Latin-1 text; save the file as UTF-8"
    )

    wrong_layout = write(tmp_path / "tatqa.json", json.dumps({"dev": []}))
    assert one_error("contractnli", wrong_layout) == (
        f"{wrong_layout}: expected ContractNLI's layout (an object with 'labels' and 'documents'), found ['dev']; "
        "point data.sources[].path at train.json, dev.json or test.json"
    )

    not_cuad = write(tmp_path / "clauses.csv", "Filename,Parties\nx.pdf,[]\n")
    assert one_error("cuad", not_cuad) == (
        f"{not_cuad}: record 2: not CUAD's master_clauses.csv layout: no column 'Most Favored Nation'; point "
        "data.sources[].path at master_clauses.csv"
    )

    assert one_error("contractnli", None, hub="kiddothe2b/contract-nli") == (
        "data.sources[].hub: kiddothe2b/contract-nli: the contractnli reader reads the upstream release files, not a "
        "Hub data set; "
        "download them and set data.sources[].path instead"
    )

    task = tmp_path / "tasks" / "toy_extraction"
    write(task / "README.md", "# toy\n\n### Extract the party.\n\n**Task type**: Extraction\n")
    tsv = write(task / "train.tsv", "index\ttext\tanswer\n0\tAcme sued Bolt.\tAcme\n1\tCarr sued Dune.\tCarr\n")
    assert one_error("legalbench", tsv) == (
        f"{tsv}: legalbench task toy_extraction: its card says the task type is 'Extraction'; the legalbench reader "
        "reads classification "
        "tasks only; pick one listed in datasets/legal/legalbench.md"
    )


def test_hh_transcript_errors(tmp_path):
    path = tmp_path / "hh.jsonl.gz"
    path.write_bytes(
        gzip.compress(
            (json.dumps({"chosen": "Human: hi", "rejected": "\n\nHuman: hi\n\nAssistant: yo"}) + "\n").encode()
        )
    )
    assert (
        one_error("hh_rlhf", path)
        == f"{path}:1: field 'chosen': expected a transcript starting with '\\n\\nHuman:', found 'Human: hi'"
    )


def test_cuad_and_convfinqa_rows_match_their_cards(tmp_path):
    import csv

    columns = ["Filename"] + [c for category in legal.CUAD_QUESTIONS for c in (category, f"{category}-Answer")]
    contract = {c: "No" if c.endswith("-Answer") else "[]" for c in columns[1:]}
    clause = (
        "Distributor may, on 30 days' notice, inspect the Supplier's records relating to the Products to verify "
        "the royalty statements."
    )
    contract.update({"Filename": "toy.pdf", "Audit Rights": repr([clause]), "Audit Rights-Answer": "Yes"})
    path = tmp_path / "master_clauses.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerow(contract)
    yes, no = rows_of("cuad", path)
    assert formats.mcq_prompt(yes) == (
        "The context is a clause extracted from a commercial contract. Decide whether it is an instance of the clause "
        "type the question describes."
        f"\n\nContext:\n{clause}\n\nQuestion: Does the clause let a party audit the counterparty's books, records or "
        "premises to check compliance? "
        "(clause type: Audit Rights)\n\nAnswer with one of: Yes, No."
    )
    assert (yes["answer"], no["answer"], no["question"].endswith("(clause type: Uncapped Liability)")) == (
        "Yes",
        "No",
        True,
    )
    assert "(clause type: Audit Rights)" in (SAMPLES / "legal/cuad.md").read_text(encoding="utf-8")

    conversation = {
        "id": "toy",
        "doc": {
            "pre_text": "revenue grew on higher volumes .",
            "post_text": "",
            "table": {"2021": {"net revenue": 412.5}, "2020": {"net revenue": 380.0}},
        },
        "dialogue": {
            "conv_questions": ["what was net revenue in 2021?", "what was the change from 2020?"],
            "conv_answers": ["412.5", "32.5"],
        },
    }
    path = write(tmp_path / "conv.json", json.dumps({"dev": [conversation]}))
    (row,) = rows_of("convfinqa", path)
    rendered = "\n".join(f"[{m['role']}]\n{m['content']}" for m in formats.to_sft(row, "qa")["messages"])
    assert rendered == (
        "[user]\nContext:\nrevenue grew on higher volumes .\n\n|  | 2021 | 2020 |\n| --- | --- | --- |\n| net revenue "
        "| 412.5 | 380 |\n\n"
        "Question: what was net revenue in 2021?\n[assistant]\n412.5\n[user]\nQuestion: what was the change from "
        "2020?\n[assistant]\n32.5"
    )
    assert rendered in (SAMPLES / "finance/convfinqa.md").read_text(encoding="utf-8")
