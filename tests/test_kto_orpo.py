"""KTO and ORPO for real on a tiny random Llama, as DPO is tested: KTO's implied reward margin and ORPO's log-odds ratio
rise, only the adapter moves and is saved, QLoRA works; how rows become KTO's unpaired rows; the recipe's checks."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from test_dpo import PAIRS, dpo_recipe, logged

from finetune import train
from finetune.data.build import build_preferences
from finetune.errors import FinetuneError
from finetune.recipe import Recipe, validate

UNPAIRED = [
    {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
    for p in PAIRS
    for side in ("chosen", "rejected")
]


def recipe_for(method: str, section: dict, tmp_path, base, data: dict, **train_overrides) -> Recipe:
    """test_dpo's recipe with another method, its section and source."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in data["rows"]))
    recipe = dpo_recipe(tmp_path, base, **train_overrides).model_dump()
    recipe["train"]["method"] = method
    recipe["data"]["sources"] = [{"path": str(path), "reader": data["reader"]}]
    recipe.update(dpo=None, **{method: section})
    return Recipe.model_validate(recipe)


def kto_recipe(tmp_path, base, **train_overrides) -> Recipe:
    return recipe_for("kto", {"beta": 0.1}, tmp_path, base, {"rows": UNPAIRED, "reader": "kto"}, **train_overrides)


def orpo_recipe(tmp_path, base, **train_overrides) -> Recipe:
    return recipe_for("orpo", {"beta": 0.5}, tmp_path, base, {"rows": PAIRS, "reader": "preference"}, **train_overrides)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def only_lora_weights(out) -> dict:
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter and all(".lora_" in name for name in adapter), "the adapter stores base weights"
    assert not any(".ref." in name for name in adapter), "the frozen reference copy must not be saved"
    assert any(name.endswith("lora_B.weight") and w.abs().max() > 0 for name, w in adapter.items())
    return adapter


def test_kto_raises_the_reward_margin_and_moves_only_the_adapter(tmp_path, tiny_llama_dir):
    out = train.run(kto_recipe(tmp_path, tiny_llama_dir))
    margin = logged(out, "rewards/margins")
    assert len(margin) >= 10, margin  # a batch without desirable (or undesirable) rows logs no margin
    assert mean(margin[-3:]) > mean(margin[:3]) + 0.1, margin
    assert (out / "rewards.png").is_file()
    only_lora_weights(out)
    meta = json.loads((out / "run.json").read_text())
    assert meta["method"] == "kto" and meta["steps"] == 12
    assert meta["data"]["desirable_rows"] == 12 and meta["data"]["train_rows"] == 24


def test_orpo_raises_the_log_odds_ratio_and_moves_only_the_adapter(tmp_path, tiny_llama_dir):
    out = train.run(orpo_recipe(tmp_path, tiny_llama_dir))
    log_odds = logged(out, "log_odds_ratio")
    assert len(log_odds) == 12
    assert mean(log_odds[-3:]) > mean(log_odds[:3]) + 0.1, log_odds
    assert mean(logged(out, "rewards/margins")[-3:]) > mean(logged(out, "rewards/margins")[:3])
    assert (out / "rewards.png").is_file()
    only_lora_weights(out)
    assert json.loads((out / "run.json").read_text())["method"] == "orpo"


@pytest.mark.parametrize("make", [kto_recipe, orpo_recipe], ids=["kto", "orpo"])
def test_qlora_kto_and_orpo_run(tmp_path, tiny_llama_dir, make):
    recipe = make(tmp_path, tiny_llama_dir, max_steps=3)
    recipe.model.quantization = "nf4"
    out = train.run(recipe)
    assert len(logged(out, "loss")) == 3
    assert {str(w.dtype) for w in only_lora_weights(out).values()} == {"torch.float32"}


def test_kto_continues_an_adapter_and_saves_it_without_the_reference_copy(tmp_path, tiny_llama_dir):
    first = train.run(orpo_recipe(tmp_path / "orpo", tiny_llama_dir, max_steps=2))
    out = train.run(kto_recipe(tmp_path / "kto", tiny_llama_dir, max_steps=2, init_from=str(first)))
    assert only_lora_weights(out).keys() == load_file(first / "adapter" / "adapter_model.safetensors").keys()


def test_pairs_and_multiple_choice_become_unpaired_rows(tmp_path, tokenizer):
    mcq = tmp_path / "mcq.jsonl"
    mcq.write_text(
        json.dumps(
            {"question": "Which is a fruit?", "options": {"A": "apple", "B": "brick", "C": "bolt"}, "answer": "A"}
        )
        + "\n"
    )
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Is 2 even?", "chosen": "yes", "rejected": "no"}) + "\n")
    recipe = Recipe.model_validate(
        {
            "name": "m",
            "data": {
                "sources": [{"path": str(mcq), "reader": "mcq_jsonl"}, {"path": str(pairs), "reader": "preference"}],
                "system_prompt": "Be brief.",
            },
            "train": {"method": "kto"},
        }
    )
    built = build_preferences(recipe, tokenizer)
    rows = sorted((r["completion"][0]["content"], r["label"]) for r in built.train)
    assert rows == [("A", True), ("B", False), ("C", False), ("no", False), ("yes", True)]
    assert all(r["prompt"][0] == {"role": "system", "content": "Be brief."} for r in built.train)
    assert built.stats["desirable_rows"] == 2 and built.stats["duplicates"] == 0


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (
            {"train": {"method": "kto", "batch_size": 1}, "data": {"sources": [{"path": "x.jsonl", "reader": "kto"}]}},
            "train.method kto estimates its KL term from the other rows of a batch: set train.batch_size to 2 or more",
        ),
        ({"orpo": {"beta": 0.2}}, "the orpo section is only used with train.method: orpo; remove it or set the method"),
        (
            {"train": {"method": "orpo"}, "data": {"sources": [{"path": "x.jsonl", "reader": "kto"}]}},
            "train.method orpo needs preference pairs, and data.sources.0 (reader kto) gives unpaired rows; use a "
            "preference reader (preference, preference_messages, hh_rlhf) or a multiple-choice source",
        ),
        (
            {"train": {"method": "kto"}},
            "train.method kto needs desirable and undesirable answers, and data.sources.0 (reader messages) gives sft "
            "rows; use the kto reader, a preference reader (preference, preference_messages, hh_rlhf) or a "
            "multiple-choice source",
        ),
        (
            {"data": {"sources": [{"path": "x.jsonl", "reader": "kto"}]}},
            "train.method sft needs conversations or raw text, and data.sources.0 (reader kto) gives unpaired rows; "
            "use a chat, instruction, multiple-choice, QA or text reader",
        ),
    ],
)
def test_method_mistakes_are_one_line(data, line):
    recipe = {"name": "m", "data": {"sources": [{"path": "x.jsonl"}]}, **data}
    with pytest.raises(FinetuneError) as error:
        validate(recipe, "m.yaml")
    assert str(error.value) == f"m.yaml: recipe: {line}"
