"""data.build: mixing, dedup, a deterministic disjoint split, the long-row policy, bad rows, and the token cache key."""

from __future__ import annotations

import dataclasses
import json

import pytest

from finetune.data import build, readers
from finetune.errors import FinetuneError
from finetune.recipe import Recipe


def rows_file(path, n, start=0, extra=()):
    lines = [
        json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
        for i in range(start, start + n)
    ]
    path.write_text("\n".join([*lines, *extra]) + "\n")
    return path


def recipe_for(*sources, **data) -> Recipe:
    return Recipe.model_validate({"name": "t", "data": {"sources": [dict(s) for s in sources], **data}})


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch, embedded_dir):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))


def test_sources_mix_with_limits_dedup_and_a_disjoint_seeded_split(tmp_path, tokenizer):
    a = rows_file(tmp_path / "a.jsonl", 30)
    b = rows_file(tmp_path / "b.jsonl", 20, start=25)  # rows 25..29 duplicate a's
    recipe = recipe_for({"path": str(a)}, {"path": str(b)}, eval_fraction=0.2)
    built = build.build(recipe, tokenizer)
    assert built.stats["duplicates"] == 5
    assert built.stats["train_rows"] + built.stats["eval_rows"] == 45
    assert built.stats["eval_rows"] == 9
    train_ids = {tuple(r["input_ids"]) for r in built.train}
    eval_ids = {tuple(r["input_ids"]) for r in built.eval}
    assert not train_ids & eval_ids
    again = build.build(recipe_for({"path": str(a)}, {"path": str(b)}, eval_fraction=0.2), tokenizer)
    assert [r["input_ids"] for r in again.eval] == [r["input_ids"] for r in built.eval]

    limited = build.build(recipe_for({"path": str(a), "limit": 7}, eval_fraction=0.0), tokenizer)
    assert limited.stats["train_rows"] == 7


def test_rows_longer_than_max_length_are_dropped_and_counted(tmp_path, tokenizer):
    long_row = json.dumps(
        {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "short"}]}
    )
    path = rows_file(tmp_path / "rows.jsonl", 4, extra=[long_row])
    built = build.build(recipe_for({"path": str(path)}, max_length=64), tokenizer)
    assert built.stats["dropped_too_long"] == 1
    assert built.stats["train_rows"] == 4
    # Every kept row still trains its whole answer: "a<i>" + <|im_end|> = 3 tokens each, nothing cut.
    assert built.stats["trained_tokens"] == sum(len(tokenizer(f"a{i}")["input_ids"]) + 1 for i in range(4))


def test_bad_rows_stop_the_run_or_are_skipped_and_counted(tmp_path, tokenizer):
    bad = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]})
    path = rows_file(tmp_path / "rows.jsonl", 3, extra=[bad])
    with pytest.raises(FinetuneError) as error:
        build.build(recipe_for({"path": str(path)}), tokenizer)
    assert (
        str(error.value)
        == f"{path}:4: field 'messages[1].role': expected one of system, user, assistant, found 'robot'"
    )
    built = build.build(recipe_for({"path": str(path)}, on_bad_row="skip"), tokenizer)
    assert built.stats["sources"][0]["skipped"] == 1 and built.stats["train_rows"] == 3


def test_no_rows_is_an_error(tmp_path, tokenizer):
    path = rows_file(tmp_path / "rows.jsonl", 1)
    with pytest.raises(FinetuneError, match="leaves no training rows"):
        build.build(recipe_for({"path": str(path)}, eval_fraction=0.5), tokenizer)


def test_token_cache_is_keyed_by_everything_that_changes_tokens(tmp_path, tokenizer, monkeypatch):
    path = rows_file(tmp_path / "rows.jsonl", 6)
    recipe = recipe_for({"path": str(path)})
    assert build.build(recipe, tokenizer).stats["cache_hit"] is False
    assert build.build(recipe, tokenizer).stats["cache_hit"] is True

    assert build.build(recipe_for({"path": str(path)}, max_length=512), tokenizer).stats["cache_hit"] is False

    changed_template = tokenizer.chat_template.replace(
        "<|im_start|>' + message['role']", "<|im_start|>' + message['role'] + ' '"
    )
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = changed_template
        assert build.build(recipe, tokenizer).stats["cache_hit"] is False
    finally:
        tokenizer.chat_template = original

    bumped = dataclasses.replace(readers.READERS["messages"], version=readers.READERS["messages"].version + 1)
    with monkeypatch.context() as patch:
        patch.setitem(readers.READERS, "messages", bumped)
        assert build.build(recipe, tokenizer).stats["cache_hit"] is False

    rows_file(path, 6, start=1)  # the data itself changed
    assert build.build(recipe, tokenizer).stats["cache_hit"] is False

    other = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    other.chat_template = original
    other.pad_token = "<|im_start|>"  # a different pad token changes the fingerprint
    assert build.build(recipe, other).stats["cache_hit"] is False


def test_explanations_false_trains_the_answer_label_alone(tmp_path, tokenizer):
    rows = tmp_path / "mcq.jsonl"
    rows.write_text(
        json.dumps(
            {
                "question": "Which is a fruit?",
                "options": {"A": "apple", "B": "brick"},
                "answer": "A",
                "explanation": "An apple grows on a tree.",
            }
        )
        + "\n"
    )
    source = {"path": str(rows), "reader": "mcq_jsonl"}
    with_reason = build.build(recipe_for(source), tokenizer).train[0]
    label_only = build.build(recipe_for(source, explanations=False), tokenizer).train[0]
    trained = [t for t in label_only["labels"] if t != build.IGNORE]
    assert tokenizer.decode(trained) == "A<|im_end|>"
    assert (
        tokenizer.decode([t for t in with_reason["labels"] if t != build.IGNORE])
        == "A\n\nAn apple grows on a tree.<|im_end|>"
    )
    # The prompt is the same either way: only the answer turn changes.
    prompt = [t for t, label in zip(label_only["input_ids"], label_only["labels"]) if label == build.IGNORE]
    assert (
        prompt
        == [t for t, label in zip(with_reason["input_ids"], with_reason["labels"]) if label == build.IGNORE][
            : len(prompt)
        ]
    )
