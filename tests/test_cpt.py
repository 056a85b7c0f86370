"""Continued pretraining on raw text: documents read from .txt blocks, folders and JSONL; every token trained, EOS after
each document; packed documents never attend across each other; held-out perplexity goes down on the project's
sample; CPT then SFT chains with train.init_from."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PROJECT
from safetensors.torch import load_file
from test_train import capture_trainers, tiny_recipe

from finetune import model as model_lib
from finetune import pipeline, recipe, train
from finetune.data.build import IGNORE, build, read_source, tokenize_text
from finetune.errors import FinetuneError
from finetune.eval.metrics import mean, paired_bootstrap
from finetune.eval.scoring import score_text
from finetune.eval.suite import Task
from finetune.recipe import ModelSection, Recipe, SourceSection, validate

DOCUMENTS = [
    "The liver makes bile.\nBile helps digest fat.",
    "Insulin is made in the pancreas.",
    "The kidneys filter the blood and make urine.",
    "Red blood cells carry oxygen to the tissues.",
]


def texts(path, reader: str = "text") -> list[str]:
    return [row["text"] for row in read_source(SourceSection(path=str(path), reader=reader), "error", 0)[1]]


def test_the_text_reader_reads_blank_line_blocks_folders_and_jsonl(tmp_path):
    (tmp_path / "notes.txt").write_text("\n\n".join(DOCUMENTS) + "\n\n\n")
    assert texts(tmp_path / "notes.txt") == DOCUMENTS
    folder = tmp_path / "corpus"
    folder.mkdir()
    for index, text in enumerate(DOCUMENTS):
        (folder / f"{index}.txt").write_text(text + "\n\nsecond paragraph of the same document")
    assert texts(folder) == [f"{text}\n\nsecond paragraph of the same document" for text in DOCUMENTS]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in DOCUMENTS))
    assert texts(tmp_path / "rows.jsonl") == DOCUMENTS
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(FinetuneError, match=r"bad.jsonl:1: field 'text': expected a non-empty string, found None"):
        texts(tmp_path / "bad.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinetuneError, match="no .txt files in the folder"):
        texts(tmp_path / "empty")


def test_pubmedqa_abstracts_keep_the_pubmedqa_splits():
    path = PROJECT / "datasets" / "medical" / "pubmedqa" / "ori_pqal.json"
    test = read_source(SourceSection(path=str(path), reader="pubmedqa_abstracts", split="test"), "error", 0)[1]
    questions = read_source(SourceSection(path=str(path), reader="pubmedqa", split="test"), "error", 0)[1]
    assert [row["id"].rsplit("-", 1)[1] for row in test] == [row["id"].rsplit("-", 1)[1] for row in questions]
    trained = texts(path, "pubmedqa_abstracts")
    assert len(trained) == 23 and not {row["text"] for row in test} & set(trained)
    assert test[0]["text"].startswith(questions[0]["question"]) and "\n\nCONCLUSIONS: " in test[0]["text"]


def cpt_recipe(tmp_path, base, **train_overrides) -> Recipe:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "notes.txt").write_text("\n\n".join(DOCUMENTS))
    return Recipe.model_validate(
        {
            "name": "tiny-cpt",
            "model": {"base": str(base)},
            "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
            "data": {"sources": [{"path": str(tmp_path / "notes.txt"), "reader": "text"}], "max_length": 24},
            "train": {"batch_size": 2, "output_dir": str(tmp_path / "run"), **train_overrides},
        }
    )


def test_documents_end_in_eos_and_every_token_but_the_first_is_trained(tmp_path, tokenizer):
    built = build(cpt_recipe(tmp_path, "embedded"), tokenizer)
    assert built.stats["train_rows"] == 4 and built.stats["dropped_too_long"] == 0
    for row in built.train:
        assert row["input_ids"][-1] == tokenizer.eos_token_id
        assert row["labels"] == [IGNORE] + row["input_ids"][1:]
    assert sorted(tokenizer.decode(row["input_ids"][:-1]) for row in built.train) == sorted(DOCUMENTS)
    # A document longer than a pack is kept (packing splits it), not dropped.
    long = cpt_recipe(tmp_path / "long", "embedded")
    long.data.max_length = 9
    assert build(long, tokenizer).stats["split_too_long"] >= 1


def test_packed_documents_restart_positions_and_never_attend_across_each_other(tmp_path, tiny_llama_dir, monkeypatch):
    trainers = capture_trainers(monkeypatch)
    out = train.run(cpt_recipe(tmp_path, tiny_llama_dir, max_steps=1))
    assert json.loads((out / "run.json").read_text())["packed"]
    trainer = trainers[0]
    batch = next(iter(trainer.get_train_dataloader()))
    ids, positions, labels = batch["input_ids"][0], batch["position_ids"][0], batch["labels"][0]
    starts = (positions == 0).nonzero().flatten().tolist() + [len(ids)]
    assert "attention_mask" not in batch and len(starts) > 2  # several documents in the row, no mask
    assert all(labels[start] == IGNORE for start in starts[:-1])  # nothing is predicted across a boundary
    model = trainer.model.eval()
    with torch.no_grad():
        packed = model(input_ids=ids[None], position_ids=positions[None], use_cache=False).logits[0]
        for start, end in zip(starts, starts[1:]):
            alone = model(input_ids=ids[None, start:end], use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:end], alone, rtol=1e-4, atol=1e-4)
        assert ids[starts[1] - 1] == trainer.processing_class.eos_token_id  # EOS closes each document


def test_perplexity_is_the_same_batched_or_one_document_at_a_time(tiny_llama_dir):
    model, tokenizer = model_lib.load(ModelSection(base=str(tiny_llama_dir)), for_training=False)
    model.eval()
    items = [{"text": text} for text in DOCUMENTS]
    task = Task(reader="text", path="x.txt", max_length=8)  # windows of 8 tokens
    batched, counts = score_text(model, tokenizer, items, task, batch_size=4)
    for item, perplexity in zip(items, batched["perplexity"]):
        assert score_text(model, tokenizer, [item], task, 1)[0]["perplexity"][0] == pytest.approx(perplexity, rel=1e-5)
    ids = tokenize_text(tokenizer, DOCUMENTS[1])["input_ids"]
    assert counts[1] == sum(len(ids[i : i + 8]) - 1 for i in range(0, len(ids), 8))


def test_continued_pretraining_lowers_held_out_perplexity_on_the_sample(tmp_path, tiny_llama_dir):
    cpt = recipe.load(
        "medical-cpt",
        [
            f"model.base={tiny_llama_dir}",
            f"train.output_dir={tmp_path / 'cpt'}",
            "train.learning_rate=5e-3",
            "train.epochs=2",
            "eval.n=10",
        ],
    )
    outcome = pipeline.run(cpt)
    abstracts = outcome.evaluation["tasks"]["abstracts"]
    assert abstracts["metric"] == "perplexity" and abstracts["n"] == 10
    assert abstracts["adapter"] < 0.9 * abstracts["base"], abstracts
    assert abstracts["ci95"][1] < 0 and not abstracts["regression"]
    # Each document's perplexity and tokens are kept, so the interval follows from eval.json alone.
    records = abstracts["examples"]
    assert [set(e) for e in records] == [{"id", "group", "tokens", "scores"}] * 10
    assert sum(e["tokens"] for e in records) == abstracts["tokens"]
    base, adapter = ([e["scores"][who] for e in records] for who in ("base", "adapter"))
    assert (mean(base), mean(adapter)) == (abstracts["base"], abstracts["adapter"])
    groups = [e["group"] for e in records]
    bootstrap = outcome.evaluation["bootstrap"]
    assert list(paired_bootstrap(base, adapter, bootstrap["resamples"], bootstrap["seed"], groups)) == abstracts["ci95"]
    assert "perplexity (lower is better)" in (outcome.run_dir / "eval.md").read_text()

    # CPT then SFT: the SFT run keeps training the same adapter.
    sft = tiny_recipe(tmp_path / "sft", tiny_llama_dir, max_steps=2, init_from=str(outcome.run_dir))
    before = load_file(outcome.run_dir / "adapter" / "adapter_model.safetensors")
    after = load_file(train.run(sft) / "adapter" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    ("sources", "method", "line"),
    [
        (
            [{"path": "a.txt", "reader": "text"}, {"path": "b.jsonl"}],
            "sft",
            "data.sources.0 is raw text and data.sources.1 is not; continued pretraining and SFT are separate runs: "
            "train on the text first, then on the rows with train.init_from",
        ),
        (
            [{"path": "a.txt", "reader": "text"}],
            "dpo",
            "train.method dpo needs preference pairs, and data.sources.0 (reader text) gives text rows; use a "
            "preference reader (preference, preference_messages, hh_rlhf) or a multiple-choice source",
        ),
    ],
)
def test_raw_text_mistakes_are_one_line(sources, method, line):
    with pytest.raises(FinetuneError) as error:
        validate({"name": "m", "data": {"sources": sources}, "train": {"method": method}}, "m.yaml")
    assert str(error.value) == f"m.yaml: recipe: {line}"


@pytest.mark.slow
def test_the_medical_cpt_recipe_lowers_held_out_perplexity_on_the_embedded_model(tmp_path):
    outcome = pipeline.run(recipe.load("medical-cpt", [f"train.output_dir={tmp_path / 'run'}", "eval.n=20"]))
    abstracts = outcome.evaluation["tasks"]["abstracts"]
    assert abstracts["adapter"] < abstracts["base"] and abstracts["ci95"][1] < 0, abstracts
