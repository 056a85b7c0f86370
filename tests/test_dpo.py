"""DPO for real on a tiny random Llama: rewards separate, only the adapter moves, QLoRA works, SFT -> DPO chains."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from finetune import train
from finetune.data.build import build_preferences
from finetune.errors import FinetuneError
from finetune.recipe import Recipe, validate

PAIRS = [
    {"prompt": f"Is {n} even?", "chosen": "yes" if n % 2 == 0 else "no", "rejected": "no" if n % 2 == 0 else "yes"}
    for n in range(12)
]


def dpo_recipe(tmp_path, base, **train_overrides) -> Recipe:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return Recipe.model_validate(
        {
            "name": "tiny-dpo",
            "model": {"base": str(base)},
            "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
            "data": {"sources": [{"path": str(data), "reader": "preference"}], "max_length": 64},
            "train": {
                "method": "dpo",
                "max_steps": 12,
                "learning_rate": 5e-3,
                "batch_size": 4,
                "warmup_ratio": 0.0,
                "lr_scheduler": "constant",
                "save_steps": 100,
                "output_dir": str(tmp_path / "run"),
                **train_overrides,
            },
            "dpo": {"beta": 0.1},
        }
    )


def logged(run_dir, key) -> list[float]:
    return [r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


def test_dpo_raises_reward_accuracy_and_margin_and_moves_only_the_adapter(tmp_path, tiny_llama_dir):
    out = train.run(dpo_recipe(tmp_path, tiny_llama_dir))
    accuracy, margin = logged(out, "rewards/accuracies"), logged(out, "rewards/margins")
    assert len(accuracy) == 12
    assert sum(accuracy[-3:]) / 3 > max(0.75, sum(accuracy[:3]) / 3), accuracy
    assert sum(margin[-3:]) / 3 > sum(margin[:3]) / 3 + 0.1, margin
    assert (out / "rewards.png").is_file() and (out / "loss.png").is_file()
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(name.endswith("lora_B.weight") and w.abs().max() > 0 for name, w in adapter.items())
    assert not any(".ref." in name for name in adapter), "the frozen reference copy must not be saved"
    # The base on disk is untouched and the adapter stores no base weights.
    assert all(".lora_" in name for name in adapter)
    meta = json.loads((out / "run.json").read_text())
    assert meta["method"] == "dpo" and meta["steps"] == 12


def test_qlora_dpo_runs(tmp_path, tiny_llama_dir):
    recipe = dpo_recipe(tmp_path, tiny_llama_dir, max_steps=3)
    recipe.model.quantization = "nf4"
    out = train.run(recipe)
    assert len(logged(out, "rewards/accuracies")) == 3
    assert {str(w.dtype) for w in load_file(out / "adapter" / "adapter_model.safetensors").values()} == {
        "torch.float32"
    }


def test_dpo_continues_an_sft_adapter(tmp_path, tiny_llama_dir):
    sft = Recipe.model_validate(
        {
            "name": "tiny-sft",
            "model": {"base": str(tiny_llama_dir)},
            "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
            "data": {"sources": [{"path": str(tmp_path / "sft.jsonl")}], "max_length": 64},
            "train": {"max_steps": 3, "learning_rate": 5e-3, "batch_size": 4, "output_dir": str(tmp_path / "sft-run")},
        }
    )
    (tmp_path / "sft.jsonl").write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}]}
            )
            + "\n"
            for p in PAIRS
        )
    )
    sft_out = train.run(sft)
    before = load_file(sft_out / "adapter" / "adapter_model.safetensors")
    dpo = dpo_recipe(tmp_path / "dpo", tiny_llama_dir, max_steps=3, init_from=str(sft_out))
    out = train.run(dpo)
    after = load_file(out / "adapter" / "adapter_model.safetensors")
    assert before.keys() == after.keys(), "DPO keeps training the same adapter"
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert json.loads((out / "run.json").read_text())["init_from"] == str(sft_out / "adapter")


def test_multiple_choice_rows_become_pairs_against_each_distractor(tmp_path, tokenizer):
    rows = tmp_path / "mcq.jsonl"
    rows.write_text(
        json.dumps(
            {
                "question": "Which is a fruit?",
                "options": {"A": "apple", "B": "brick", "C": "bolt"},
                "answer": "A",
                "explanation": "An apple grows on a tree.",
            }
        )
        + "\n"
    )
    recipe = Recipe.model_validate(
        {
            "name": "m",
            "data": {"sources": [{"path": str(rows), "reader": "mcq_jsonl"}], "system_prompt": "Be brief."},
            "train": {"method": "dpo"},
        }
    )
    pairs = list(build_preferences(recipe, tokenizer).train)
    assert sorted(p["rejected"][0]["content"] for p in pairs) == ["B", "C"]
    assert {p["chosen"][0]["content"] for p in pairs} == {"A\n\nAn apple grows on a tree."}
    assert pairs[0]["prompt"][0] == {"role": "system", "content": "Be brief."}
    recipe.data.explanations = False
    assert {p["chosen"][0]["content"] for p in build_preferences(recipe, tokenizer).train} == {"A"}


def test_a_malformed_preference_row_is_one_clear_line(tmp_path, tokenizer):
    rows = tmp_path / "pairs.jsonl"
    rows.write_text(json.dumps({"prompt": "Q?", "chosen": "same", "rejected": "same"}) + "\n")
    recipe = Recipe.model_validate(
        {"name": "m", "data": {"sources": [{"path": str(rows), "reader": "preference"}]}, "train": {"method": "dpo"}}
    )
    with pytest.raises(FinetuneError) as error:
        build_preferences(recipe, tokenizer)
    assert str(error.value) == f"{rows}:1: field 'rejected': expected a response different from 'chosen', found 'same'"


def test_dpo_settings_without_dpo_are_an_error():
    with pytest.raises(FinetuneError) as error:
        validate({"name": "m", "data": {"sources": [{"path": "x.jsonl"}]}, "dpo": {"beta": 0.2}}, "m.yaml")
    assert (
        str(error.value)
        == "m.yaml: recipe: the dpo section is only used with train.method: dpo; remove it or set the method"
    )


def test_the_summary_line_of_a_preference_run_shows_no_token_speed(tmp_path, tiny_llama_dir, capsys):
    """TRL tokenizes preference rows itself, so the run knows no token counts: its line says nothing of tokens/s."""
    from finetune import cli
    from finetune.recipe import to_yaml

    path = tmp_path / "dpo.yaml"
    path.write_text(to_yaml(dpo_recipe(tmp_path, tiny_llama_dir, max_steps=2)))
    assert cli.main(["run", str(path), "eval.suite=null", "export.merge=false", "export.gguf=null"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("trained: "))
    assert "tokens/s" not in line and "None" not in line and line.endswith(" MB"), line
