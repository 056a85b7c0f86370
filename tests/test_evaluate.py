"""Evaluation that can be trusted: the scores mean what they claim, the suites never score training rows,
and a run's report has exactly the shape the model card reads."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from finetune import eval as evaluation
from finetune.config import PROJECT_ROOT, resolve_path
from finetune.data import formats
from finetune.data.build import chat_rows, read_source, text_rows
from finetune.data.readers import READERS
from finetune.errors import FinetuneError
from finetune.eval import cache, metrics, prompts, report, scoring
from finetune.eval import suite as suites
from finetune.recipe import SourceSection
from finetune.recipe import load as load_recipe

torch.set_num_threads(1)  # the test machine has 2 cores shared with other jobs


def classification_rows(labels: list[str], options=("yes", "no", "maybe")) -> list[dict]:
    return [
        {
            "id": f"row-{i}",
            "messages": [
                {
                    "role": "user",
                    "content": f"Question {i}: is claim {i} supported? Answer with one of: yes, no, maybe.",
                }
            ],
            "options": list(options),
            "answer": label,
        }
        for i, label in enumerate(labels)
    ]


class AlwaysPrefers:
    """A stand-in causal LM whose next-token distribution always puts most mass on one token."""

    config = None  # an empty key/value cache is all the scorer builds from it

    def __init__(self, token_id: int, vocab: int):
        self.token_id, self.vocab, self.device = token_id, vocab, torch.device("cpu")

    def __call__(self, input_ids, attention_mask, logits_to_keep=0, **cache_arguments):
        logits = torch.zeros(input_ids.shape[0], logits_to_keep or input_ids.shape[1], self.vocab)
        logits[..., self.token_id] = 10.0
        return SimpleNamespace(logits=logits)


# ---------------------------------------------------------------- log-likelihood scoring


def test_a_model_that_always_answers_the_majority_label_scores_exactly_the_majority_rate(tokenizer):
    labels = ["yes"] * 7 + ["no"] * 2 + ["maybe"]
    yes = tokenizer("yes", add_special_tokens=False)["input_ids"]
    assert len(yes) == 1
    model = AlwaysPrefers(yes[0], len(tokenizer))
    task = SimpleNamespace(metric="accuracy")
    scores, picked = scoring.score_mcq(model, tokenizer, classification_rows(labels), task, batch_size=4)
    assert metrics.mean(scores["accuracy"]) == pytest.approx(0.7)
    assert metrics.mean(scores["accuracy_sum"]) == pytest.approx(0.7)
    assert picked == ["yes"] * 10


def test_choose_normalises_by_option_length_and_breaks_ties_by_order():
    # (sum, tokens): option 1 is likelier per token, option 0 likelier in sum.
    scores = [(-3.0, 1), (-4.0, 4)]
    assert scoring.choose(scores, normalise=True) == 1
    assert scoring.choose(scores, normalise=False) == 0
    assert scoring.choose([(-1.0, 1), (-1.0, 1)]) == 0


def _reference_logprob(model, prompt: list[int], option: list[int]) -> float:
    """Log-likelihood of the option by one unpadded forward pass: what the batched scorer must reproduce."""
    ids = torch.tensor([prompt + option])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(logprobs[len(prompt) - 1 + k, token].item() for k, token in enumerate(option))


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return model.eval()


def test_batched_right_padded_scores_equal_unpadded_forward_passes(tiny_model, tokenizer):
    rows = classification_rows(
        ["Entailment", "Contradiction", "NotMentioned"], options=("Entailment", "Contradiction", "NotMentioned")
    )
    rows[1]["messages"][0]["content"] += (
        " A much longer question that makes this prompt the longest in the batch by far."
    )
    prompts = [scoring.encode_prompt(tokenizer, r["messages"]) for r in rows]
    scores = scoring.option_logprobs(tiny_model, tokenizer, prompts, [r["options"] for r in rows], batch_size=4)
    with torch.inference_mode():
        for prompt, row, option_scores in zip(prompts, rows, scores):
            for label, (total, count) in zip(row["options"], option_scores):
                option = tokenizer(label, add_special_tokens=False)["input_ids"]
                assert count == len(option)
                assert total == pytest.approx(_reference_logprob(tiny_model, prompt, option), abs=1e-4)


def test_batched_greedy_answers_come_back_in_order_and_equal_one_at_a_time(tiny_model, tokenizer):
    lengths = [3, 40, 1, 25, 8]  # batches are formed longest first, so the order is mixed on purpose
    conversations = [[{"role": "user", "content": f"Row {i}: " + "more words " * n}] for i, n in enumerate(lengths)]
    batched = scoring.generate_batch(tiny_model, tokenizer, conversations, max_new_tokens=6, batch_size=2)
    alone = [
        scoring.generate_batch(tiny_model, tokenizer, [c], max_new_tokens=6, batch_size=1)[0] for c in conversations
    ]
    assert batched == alone
    assert len(set(alone)) > 1  # the prompts really get different answers, so an order mix-up would show


def test_shuffling_the_option_order_does_not_change_the_score(tiny_model, tokenizer):
    """The scorer gives each option a score that depends on the prompt and the option only, not on the
    position it is fed in (batching, padding). The prompt is held fixed: for classification rows it
    lists the labels, so changing that text is a different question, not a different scorer."""
    labels = ["positive", "negative", "neutral"]
    rows = classification_rows([random.Random(i).choice(labels) for i in range(8)], options=labels)
    prompts = [scoring.encode_prompt(tokenizer, r["messages"]) for r in rows]
    shuffled = [random.Random(100 + i).sample(labels, 3) for i in range(len(rows))]
    original = scoring.option_logprobs(tiny_model, tokenizer, prompts, [labels] * len(rows), batch_size=5)
    permuted = scoring.option_logprobs(tiny_model, tokenizer, prompts, shuffled, batch_size=3)
    for order, first, second in zip(shuffled, original, permuted):
        by_label = dict(zip(order, second))
        for label, (total, count) in zip(labels, first):
            assert by_label[label][1] == count
            assert by_label[label][0] == pytest.approx(total, abs=1e-4)
        assert labels[scoring.choose(first)] == order[scoring.choose(second)]


# ---------------------------------------------------------------- text metrics


@pytest.mark.parametrize(
    "prediction, gold",
    [
        ("1.2 million", "1,200 thousand"),
        ("$1,200,000", "1.2 million"),
        ("The total was 5,185 thousand.", "5185 thousand"),
        ("48,210", "48,210 thousand"),  # a bare number is read in the gold's (the table's) scale
        ("(1,234)", "-1234"),
        ("$(3.2) million", "-3,200 thousand"),
        ("-15.6%", "-15.61%"),  # within the 0.1% relative tolerance
        ("-15.61", "-15.61%"),
        ("12.5 percent", "12.5%"),
        ("5 bn", "5000 million"),
    ],
)
def test_numeric_match_understands_scale_percent_commas_and_parentheses(prediction, gold):
    assert metrics.numeric_match(prediction, gold) == 1.0


@pytest.mark.parametrize(
    "prediction, gold",
    [
        ("1.3 million", "1,200 thousand"),
        ("1,234", "-1234"),
        ("15.61 million", "15.61%"),  # a percentage never equals an amount
        ("15.61%", "15.61 million"),
        ("5.8%", "5.75%"),  # outside the tolerance
        ("2023 was a good year with 1410 thousand", "1410 thousand"),  # the first number is the answer
        ("no number here", "1410 thousand"),
    ],
)
def test_numeric_match_rejects_wrong_numbers(prediction, gold):
    assert metrics.numeric_match(prediction, gold) == 0.0


def test_numeric_match_falls_back_to_exact_match_for_spans():
    assert metrics.numeric_match("Singapore, Sydney", "Singapore, Sydney") == 1.0
    assert metrics.numeric_match("310,000; $9.3 million.", "310,000, $9.3 million") == 1.0
    assert metrics.numeric_match("Sydney", "Singapore, Sydney") == 0.0


def test_exact_match_and_token_f1():
    assert metrics.exact_match("The company held fewer trade shows.", "the company held fewer trade shows") == 1.0
    assert metrics.token_f1("fewer trade shows", "the company held fewer trade shows") == pytest.approx(
        2 * 1 * 0.6 / 1.6
    )
    assert metrics.token_f1("nothing alike", "fewer trade shows") == 0.0


# ---------------------------------------------------------------- bootstrap and regressions


def test_paired_bootstrap_contains_the_delta_and_is_deterministic_by_seed():
    rng = random.Random(3)
    base = [float(rng.random() < 0.5) for _ in range(60)]
    adapter = [float(rng.random() < 0.7) for _ in range(60)]
    delta = metrics.mean(adapter) - metrics.mean(base)
    low, high = metrics.paired_bootstrap(base, adapter, 1000, seed=0)
    assert low <= delta <= high and low < high
    assert metrics.paired_bootstrap(base, adapter, 1000, seed=0) == (low, high)
    assert metrics.paired_bootstrap(base, adapter, 1000, seed=1) != (low, high)
    # Identical per-example differences leave no uncertainty.
    assert metrics.paired_bootstrap([0.0] * 5, [1.0] * 5, 200, seed=0) == (1.0, 1.0)


def test_a_grouped_bootstrap_resamples_whole_documents():
    # 12 documents of 5 questions each; whether the adapter helps depends mostly on the document.
    documents = [f"doc-{i // 5}" for i in range(60)]
    base = [float(i % 5 == 0) for i in range(60)]
    adapter = [float((i // 5) % 3 != 0 and i % 5 != 4) for i in range(60)]
    grouped = metrics.paired_bootstrap(base, adapter, 1000, seed=0, groups=documents)
    # Equal-sized documents: resampling documents is resampling their mean deltas, with the same draws.
    means = [metrics.mean(adapter[d * 5 : d * 5 + 5]) - metrics.mean(base[d * 5 : d * 5 + 5]) for d in range(12)]
    per_document = metrics.paired_bootstrap([0.0] * 12, means, 1000, seed=0)
    assert grouped == pytest.approx(per_document)
    assert grouped == pytest.approx((0.1333333, 0.5333333))
    # Resampling the 60 questions one by one claims a narrower interval than the 12 documents support.
    by_example = metrics.paired_bootstrap(base, adapter, 1000, seed=0)
    assert by_example == pytest.approx((0.1833333, 0.4833333))
    # One question per document is the plain bootstrap, draw for draw.
    assert metrics.paired_bootstrap(base, adapter, 1000, seed=0, groups=[str(i) for i in range(60)]) == by_example
    with pytest.raises(ValueError, match="one group per example"):
        metrics.paired_bootstrap(base, adapter, 100, groups=documents[:-1])


def test_a_task_is_a_regression_only_when_its_whole_interval_is_below_zero():
    result = {"tasks": {"worse": {"regression": True}, "unclear": {"regression": False}}}
    assert report.regressions(result) == ["worse"]
    assert report.regressions({"tasks": {}}) == []


# ---------------------------------------------------------------- suites


def test_every_shipped_suite_loads_and_reads_its_examples_offline():
    assert set(suites.suite_names()) >= {"medical", "legal", "finance"}
    for name in suites.suite_names():
        suite = suites.load_suite(name)
        for task_name, task in suite.tasks.items():
            items = prompts.examples(task, "system", suite.seed)
            assert items, (name, task_name)
            if task.kind == "text":
                assert all(it["text"].strip() for it in items)
                continue
            assert items[0]["messages"][0] == {"role": "system", "content": "system"}
            if task.kind == "mcq":
                assert all(it["answer"] in it["options"] for it in items)


def test_suite_defaults_score_the_held_out_samples():
    sizes = {
        name: {t: len(prompts.examples(task, None)) for t, task in suites.load_suite(name).tasks.items()}
        for name in ("medical", "legal", "finance")
    }
    assert sizes == {
        "medical": {"pubmedqa": 10, "medmcqa": 20},
        "legal": {"contractnli": 16},
        "finance": {"tatqa": 9, "phrasebank": 27},
    }


@pytest.mark.parametrize("recipe_name", [p.stem for p in sorted((PROJECT_ROOT / "recipes").glob("*.yaml"))])
def test_no_evaluation_example_is_a_training_row_of_the_same_recipe(recipe_name):
    recipe = load_recipe(recipe_name)
    try:
        suite = suites.load_suite(suites.suite_for(recipe))
    except FinetuneError:
        pytest.skip(f"recipe {recipe_name} has no eval suite")
    missing = [s.path for s in recipe.data.sources if s.path and not resolve_path(s.path).exists()]
    if missing:
        pytest.skip(f"training data {missing[0]} is absent")
    if recipe.raw_text:  # continued pretraining: no scored document, nor any scored question, is a trained text
        trained = "\n\0".join(row["text"] for row in text_rows(recipe.data, recipe.train.seed)[0])
    else:
        rows, _ = chat_rows(recipe.data, recipe.train.seed)
        trained = {m["content"] for row in rows for m in row["messages"] if m["role"] == "user"}
    for name, task in suite.tasks.items():
        for item in prompts.examples(task, recipe.data.system_prompt, suite.seed):
            scored = item["text"] if task.kind == "text" else item["messages"][-1]["content"]
            assert scored not in trained, (recipe_name, name, item["id"])


def test_few_shot_demonstrations_are_earlier_turns_and_never_a_scored_row():
    suite = suites.load_suite("finance")
    task = suite.tasks["phrasebank"]
    items = prompts.examples(task, "sys", suite.seed)
    scored = {it["messages"][-1]["content"] for it in items}
    first = items[0]["messages"]
    assert [m["role"] for m in first] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    demos = [m["content"] for m in first[1:-1:2]]
    assert not scored & set(demos)
    # The demonstrations answer with the bare label, the way the options are scored.
    assert {m["content"] for m in first[2:-1:2]} <= {"positive", "negative", "neutral"}


def _legalbench_task(folder: Path, name: str, rows: list[tuple[str, str]]) -> None:
    (folder / name).mkdir(parents=True)
    lines = ["index\tanswer\ttext"] + [f"{i}\t{answer}\t{text}" for i, (answer, text) in enumerate(rows)]
    (folder / name / "train.tsv").write_text("\n".join(lines) + "\n")


def test_a_glob_task_scores_every_file_and_same_file_shots_leave_the_example_out(tmp_path):
    """LegalBench's tasks hold 5-9 rows each: one task scores several files, and each example's demonstrations
    are other rows of its own file (never itself, never another task's rows)."""
    _legalbench_task(
        tmp_path,
        "nda_a",
        [("Yes", f"Clause A{i} keeps the agreement secret.") for i in range(3)]
        + [("No", f"Clause A{i} is about fees.") for i in range(3, 5)],
    )
    _legalbench_task(
        tmp_path,
        "nda_b",
        [("Yes", f"Clause B{i} allows copies.") for i in range(2)]
        + [("No", f"Clause B{i} forbids copies.") for i in range(2, 4)],
    )
    _legalbench_task(tmp_path, "other", [("Yes", "not matched by the pattern"), ("No", "nor this")])
    task = {"reader": "legalbench", "path": str(tmp_path / "nda_*" / "train.tsv"), "shots": 2, "shots_from": "same"}
    suite = suites.load_suite(str(write_suite(tmp_path, {"t": task})))
    items = prompts.examples(suite.tasks["t"], "sys", suite.seed)
    assert len(items) == 9
    for item in items:
        own = item["messages"][-1]["content"]
        demos = [m["content"] for m in item["messages"][1:-1:2]]
        assert len(demos) == 2 and own not in demos
        letter = "A" if "Clause A" in own else "B"
        assert all(f"Clause {letter}" in d for d in demos)
    # The draw is seeded per example: the same suite gives the same prompts.
    assert [it["messages"] for it in prompts.examples(suite.tasks["t"], "sys", suite.seed)] == [
        it["messages"] for it in items
    ]
    with pytest.raises(
        FinetuneError, match=r"shots: 5 but legalbench-nda_\w-\d's file has only [34] other rows; lower shots"
    ):
        prompts.examples(suites.load_suite(str(write_suite(tmp_path, {"t": {**task, "shots": 5}}))).tasks["t"], None)
    missing = {**task, "path": str(tmp_path / "nosuch_*" / "train.tsv")}
    with pytest.raises(
        FinetuneError, match=r"nosuch_\*/train.tsv\): the pattern matches no file; check the path in the suite"
    ):
        prompts.examples(suites.load_suite(str(write_suite(tmp_path, {"t": missing}))).tasks["t"], None)


@pytest.mark.skipif(not (PROJECT_ROOT.parent / "shared" / "data").is_dir(), reason="needs ../shared/data")
@pytest.mark.parametrize("name", ["medical", "legal", "finance"])
def test_train_validation_and_test_never_share_a_row(name):
    """recipes/real/NAME.yaml trains (every variant its sweep tries), evals/real/NAME-validation.yaml chooses,
    evals/real/NAME.yaml reports: no scored question, nor the document it is asked about, is in training, and no
    test question is a validation one."""
    recipe = load_recipe(f"real/{name}")
    sources = list(recipe.data.sources) + [
        SourceSection(**source) for value in recipe.sweep.grid.get("data.sources", []) for source in value
    ]
    # Every user turn of the training conversations, as one text.
    trained = "\n\0".join(
        m["content"]
        for source in sources
        for row in read_source(source, "error", 0)[1]
        for m in formats.to_sft(row, READERS[source.reader].kind)["messages"]
        if m["role"] == "user"
    )
    scored = {}
    for suite_name in (recipe.sweep.validation, recipe.sweep.test):
        suite = suites.load_suite(suite_name)
        scored[suite_name] = set()
        for task_name, task in suite.tasks.items():
            items = prompts.examples(task, None, suite.seed)
            assert len(items) >= 100, task_name
            for item in items:
                assert item["messages"][-1]["content"] not in trained, (task_name, item["id"])
                assert item["row"]["context"] is None or item["row"]["context"] not in trained, (task_name, item["id"])
                scored[suite_name].add(item["messages"][-1]["content"])
    assert not scored[recipe.sweep.validation] & scored[recipe.sweep.test]


def write_suite(folder: Path, tasks: dict, **top) -> Path:
    path = folder / "mine.yaml"
    path.write_text(yaml.safe_dump({"tasks": tasks, **top}))
    return path


def test_suite_errors_name_the_file_the_key_and_the_fix(tmp_path):
    with pytest.raises(FinetuneError, match=r"--suite nosuch: no such eval suite; known: .*medical"):
        suites.load_suite("nosuch")
    task = {"reader": "pubmedqa", "path": "datasets/medical/pubmedqa/ori_pqal.json", "split": "test"}
    with pytest.raises(FinetuneError, match=r"mine.yaml: tasks.t.shot: unknown key \(did you mean 'shots'\?\)"):
        suites.load_suite(str(write_suite(tmp_path, {"t": {**task, "shot": 2}})))
    with pytest.raises(
        FinetuneError, match=r"mine.yaml: tasks.t.reader: unknown reader 'pubmedq' \(did you mean 'pubmedqa'\?\)"
    ):
        suites.load_suite(str(write_suite(tmp_path, {"t": {**task, "reader": "pubmedq"}})))
    with pytest.raises(
        FinetuneError, match=r"metric 'f1' does not apply to mcq rows; use one of accuracy, accuracy_sum"
    ):
        suites.load_suite(str(write_suite(tmp_path, {"t": {**task, "metric": "f1"}})))
    with pytest.raises(FinetuneError, match=r"shots > 0 needs shots_from"):
        suites.load_suite(str(write_suite(tmp_path, {"t": {**task, "shots": 2}})))
    with pytest.raises(FinetuneError, match=r"reader 'messages' yields sft rows; a task needs mcq, qa or text rows"):
        suites.load_suite(str(write_suite(tmp_path, {"t": {**task, "reader": "messages"}})))
    empty = tmp_path / "empty_tatqa.json"
    empty.write_text("[]")
    suite = suites.load_suite(str(write_suite(tmp_path, {"t": {"reader": "tatqa", "path": str(empty)}})))
    with pytest.raises(FinetuneError, match=r"empty_tatqa.json, split train\): no rows; check the path and split"):
        prompts.examples(suite.tasks["t"], None)


def test_a_recipe_finds_the_suite_of_its_domain():
    assert suites.suite_for(load_recipe("medical")) == "medical"
    assert suites.suite_for(load_recipe("llama-3.1-8b-legal-qlora")) == "legal"
    recipe = load_recipe("medical", ["name=unrelated"])
    with pytest.raises(FinetuneError, match=r"recipe unrelated: no eval suite evals/unrelated.yaml; pass --suite NAME"):
        suites.suite_for(recipe)


# ---------------------------------------------------------------- a whole run


TASK_KEYS = {
    "reader",
    "split",
    "n",
    "metric",
    "kind",
    "shots",
    "base",
    "adapter",
    "delta",
    "ci95",
    "regression",
    "metrics",
    "seconds",
    "seconds_per_example",
    "cached",
    "groups",
    "examples",
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_llama_dir):
    from test_train import tiny_recipe

    from finetune import train

    folder = tmp_path_factory.mktemp("eval-run")
    out = train.run(tiny_recipe(folder, tiny_llama_dir, max_steps=2, save_steps=50))
    suite = write_suite(
        folder,
        {
            "sentiment": {"reader": "phrasebank", "path": "datasets/finance/phrasebank_sample.txt", "n": 6},
            "tables": {
                "reader": "tatqa",
                "path": "datasets/finance/tat-qa/tatqa_sample_test.json",
                "n": 3,
                "max_new_tokens": 4,
            },
        },
        bootstrap=200,
    )
    return out, suite


def test_a_run_writes_eval_json_md_and_png_with_exact_keys(tiny_run):
    out, suite = tiny_run
    result = evaluation.run(out, suite=str(suite))
    written = json.loads((out / "eval.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert written["suite"] == "mine"
    assert set(written["tasks"]) == {"sentiment", "tables"}
    for name, task in written["tasks"].items():
        assert set(task) == TASK_KEYS | (set() if name == "tables" else {"label_counts"})
        assert task["n"] == {"sentiment": 6, "tables": 3}[name]
        assert task["metric"] == {"sentiment": "accuracy", "tables": "numeric_match"}[name]
        assert 0.0 <= task["base"] <= 1.0 and 0.0 <= task["adapter"] <= 1.0
        assert task["delta"] == pytest.approx(task["adapter"] - task["base"])
        low, high = task["ci95"]
        assert low <= task["delta"] <= high
        assert task["regression"] == (high < 0)
    # Every example with its document, its answer and each model's output: the interval follows from the file alone.
    tables, sentiment = written["tasks"]["tables"], written["tasks"]["sentiment"]
    assert all(
        set(e) == {"id", "group", "answer", "base", "adapter", "scores"}
        for t in (tables, sentiment)
        for e in t["examples"]
    )
    assert [e["group"][:13] for e in tables["examples"]] == ["tatqa-report-"] * 3
    assert (tables["groups"], sentiment["groups"]) == (len({e["group"] for e in tables["examples"]}), 6)
    for task, score in (
        (tables, lambda e, who: metrics.numeric_match(e[who], e["answer"])),
        (sentiment, lambda e, who: float(e[who] == e["answer"])),
    ):
        scores = {who: [score(e, who) for e in task["examples"]] for who in ("base", "adapter")}
        assert [[e["scores"][who] for e in task["examples"]] for who in ("base", "adapter")] == list(scores.values())
        groups = [e["group"] for e in task["examples"]]
        assert metrics.mean(scores["adapter"]) == task["adapter"] and metrics.mean(scores["base"]) == task["base"]
        assert list(metrics.paired_bootstrap(scores["base"], scores["adapter"], 200, 0, groups)) == task["ci95"]
    counts = written["tasks"]["sentiment"]["label_counts"]
    assert set(counts) == {"gold", "base", "adapter"}
    assert all(sum(c.values()) == 6 for c in counts.values())
    assert set(counts["base"]) | set(counts["adapter"]) <= {"positive", "negative", "neutral"}
    md = (out / "eval.md").read_text()
    assert "| task | metric | n | base | adapter | delta | 95% CI of delta |" in md
    assert "| sentiment | accuracy | 6 |" in md
    assert f"| tables | numeric_match | {report.count(tables)} |" in md
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # n caps every task, on the same examples for base and adapter.
    capped = evaluation.run(out, suite=str(suite), n=2)
    assert {t["n"] for t in capped["tasks"].values()} == {2}


def test_a_merged_folder_is_scored_too_and_matches_the_adapter(tiny_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.runs import finished_recipe

    out, suite = tiny_run
    base = AutoModelForCausalLM.from_pretrained(finished_recipe(out).model.base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload()
    merged.save_pretrained(out / "merged")
    AutoTokenizer.from_pretrained(out / "adapter").save_pretrained(out / "merged")
    try:
        result = evaluation.run(out, suite=str(suite))
    finally:
        import shutil

        shutil.rmtree(out / "merged")
    for task in result["tasks"].values():
        assert task["merged"] == pytest.approx(task["adapter"])
    assert "| adapter | merged | delta |" in report.table(result).splitlines()[0]


def test_base_scores_are_reused_from_the_cache_on_the_same_prompts(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    out, suite = tiny_run
    first = evaluation.run(out, suite=str(suite))
    assert all(t["cached"] == [] for t in first["tasks"].values())
    entries = sorted((tmp_path / "eval").glob("base-*.json"))
    assert len(entries) == 2  # one per task
    again = evaluation.run(out, suite=str(suite))
    for name, task in again["tasks"].items():
        assert task["cached"] == ["base"]
        assert task["metrics"] == first["tasks"][name]["metrics"]
    assert "Base scores of sentiment, tables were reused" in (out / "eval.md").read_text()
    # What is read back is really what the next report uses: a doctored entry shows in the base score...
    for entry in entries:
        scored = json.loads(entry.read_text())
        scored["per_example"] = {metric: [1.0] * len(values) for metric, values in scored["per_example"].items()}
        entry.write_text(json.dumps(scored))
    doctored = evaluation.run(out, suite=str(suite))
    assert {t["base"] for t in doctored["tasks"].values()} == {1.0}
    # ...and --no-cache scores the base again, as the first run did.
    fresh = evaluation.run(out, suite=str(suite), cache=False)
    for name, task in fresh["tasks"].items():
        assert task["cached"] == [] and task["metrics"] == first["tasks"][name]["metrics"]
    # A cache that cannot be written (here its folder would sit under a file) costs time, never the report.
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "a-file" / "cache"))
    unwritable = evaluation.run(out, suite=str(suite))
    assert {name: t["metrics"] for name, t in unwritable["tasks"].items()} == {
        name: t["metrics"] for name, t in first["tasks"].items()
    }


def test_the_base_score_cache_key_changes_with_everything_that_changes_the_scores(tiny_run, tmp_path):
    from finetune.model import load_tokenizer
    from finetune.runs import finished_recipe

    out, suite_path = tiny_run
    recipe = finished_recipe(out)
    tokenizer = load_tokenizer(recipe.model.base, recipe.model)
    suite = suites.load_suite(str(suite_path))
    task = suite.tasks["tables"]
    items = prompts.examples(task, "system A")

    def key(recipe=recipe, task=task, items=items, batch_size=8, tokenizer=tokenizer):
        return cache.base_cache_file(recipe, tokenizer, task, items, batch_size)

    reference = key()
    assert reference == key()  # deterministic
    other_template = load_tokenizer(recipe.model.base, recipe.model)
    other_template.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    changed = {
        "prompts": key(items=prompts.examples(task, "system B")),
        "task": key(task=task.model_copy(update={"max_new_tokens": 5})),
        "batch size": key(batch_size=4),
        "quantization": key(
            recipe=recipe.model_copy(update={"model": recipe.model.model_copy(update={"quantization": "nf4"})})
        ),
        "chat template": key(tokenizer=other_template),
    }
    assert all(path != reference for path in changed.values()), changed
    # New weights in the same folder are a new base.
    weights = next(Path(recipe.model.base).glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    assert key() != reference
    # A Hub id is pinned only by a full commit hash: a branch name can move.
    hub = recipe.model_copy(update={"model": recipe.model.model_copy(update={"base": "org/model", "revision": "main"})})
    assert key(recipe=hub) is None
    pinned = recipe.model_copy(
        update={"model": recipe.model.model_copy(update={"base": "org/model", "revision": "a" * 40})}
    )
    assert key(recipe=pinned) is not None


def test_regressions_are_marked_in_the_table():
    task = {
        "n": 10,
        "metric": "accuracy",
        "base": 0.8,
        "adapter": 0.2,
        "delta": -0.6,
        "ci95": [-0.9, -0.3],
        "regression": True,
    }
    result = {"suite": "s", "target": "t", "bootstrap": {"resamples": 1000, "seed": 0}, "tasks": {"pubmedqa": task}}
    assert "**REGRESSION**" in report.table(result)
    assert "Warning: the adapter regresses on pubmedqa" in report.markdown(result)


@pytest.mark.slow
def test_the_medical_suite_runs_on_the_embedded_base_through_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = evaluation.run("medical")
    tasks = result["tasks"]
    assert result["suite"] == "medical" and set(tasks) == {"pubmedqa", "medmcqa"}
    assert tasks["pubmedqa"]["n"] == 10 and tasks["medmcqa"]["n"] == 20
    for task in tasks.values():
        assert 0.0 <= task["base"] <= 1.0 and task["adapter"] is None and task["ci95"] is None
    written = json.loads((tmp_path / "runs" / "medical" / "base-eval" / "eval.json").read_text())
    assert written["tasks"]["pubmedqa"]["base"] == tasks["pubmedqa"]["base"]
