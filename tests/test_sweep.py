"""finetune sweep end to end on a tiny random Llama: every variant trains on the selection subset and is scored on
validation, the winner alone is trained in full and scored on test, and a rerun redoes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import PROJECT

from finetune.cli import main

PUBMEDQA_SAMPLE = PROJECT / "datasets" / "medical" / "pubmedqa" / "ori_pqal.json"


def write_sweep_recipe(folder: Path, base: Path) -> Path:
    recipe = {
        "name": "tiny-sweep",
        "model": {"base": str(base)},
        "adapter": {"r": 8, "alpha": 16},
        "data": {
            "sources": [{"path": str(PUBMEDQA_SAMPLE), "reader": "pubmedqa", "split": "train"}],
            "max_length": 768,
        },
        "train": {"epochs": 1, "batch_size": 4, "gradient_accumulation": 1, "save_steps": 50},
        "export": {"merge": False, "gguf": None},
        "sweep": {
            "grid": {"train.learning_rate": [1e-3, 5e-3]},
            "select_with": ["data.sources.0.limit=8"],
            "validation": str(PROJECT / "evals" / "medical-validation.yaml"),
            "test": str(PROJECT / "evals" / "medical.yaml"),
            "output_dir": str(folder / "sweep"),
        },
    }
    path = folder / "tiny-sweep.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def files_with_times(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_a_sweep_picks_on_validation_scores_only_the_winner_on_test_and_a_rerun_redoes_nothing(
    tmp_path, tiny_llama_dir
):
    from finetune.data.build import read_source
    from finetune.recipe import SourceSection

    recipe = write_sweep_recipe(tmp_path, tiny_llama_dir)
    assert main(["sweep", str(recipe)]) == 0
    root = tmp_path / "sweep"
    result = json.loads((root / "sweep.json").read_text())

    names = ["learning_rate=0.001", "learning_rate=0.005"]
    assert [v["variant"] for v in result["variants"]] == names
    # The 8-row subset in batches of 4: two steps each; the 7 validation questions of the sample, one per abstract.
    assert [(v["steps"], v["n"], v["groups"], v["metric"]) for v in result["variants"]] == [(2, 7, 7, "accuracy")] * 2
    scores = [v["score"] for v in result["variants"]]
    assert result["winner"] == names[scores.index(max(scores))]
    for name in names:
        assert (root / name / "validation" / "eval.json").is_file()
        assert not (root / name / "eval.json").exists(), "a variant other than the final run was scored on test"

    # The winner again without the subset: every training row of the sample, in batches of 4.
    source = SourceSection(path=str(PUBMEDQA_SAMPLE), reader="pubmedqa", split="train")
    train_rows = len(read_source(source, "error", 0)[1])
    final = json.loads((root / "final" / "run.json").read_text())
    assert train_rows > 8 and final["steps"] == -(-train_rows // 4)
    assert yaml.safe_load((root / "final" / "recipe.yaml").read_text())["train"]["learning_rate"] == float(
        result["winner"].split("=")[1]
    )
    # ... and scored on validation too: the reported model has a validation score of its own
    final_validation = json.loads((root / "final" / "validation" / "eval.json").read_text())["tasks"]["pubmedqa"]
    assert result["final_validation"]["score"] == final_validation["adapter"]
    assert (result["final_validation"]["steps"], result["final_validation"]["n"]) == (final["steps"], 7)
    assert result["final_validation"]["base"] == result["variants"][0]["base"]
    assert (
        f"| {result['winner']}, trained without the subset (final) | accuracy | 7 |" in (root / "sweep.md").read_text()
    )
    assert set(result["test_scores"]["tasks"]) == {"pubmedqa", "medmcqa"}
    assert result["test_scores"] == json.loads((root / "final" / "eval.json").read_text())
    assert f"| **{result['winner']}** |" in (root / "sweep.md").read_text()
    assert (root / "sweep.png").stat().st_size > 0

    trained_and_scored = {k: v for k, v in files_with_times(root).items() if not k.startswith("sweep.")}
    assert main(["sweep", str(recipe)]) == 0
    assert {k: v for k, v in files_with_times(root).items() if not k.startswith("sweep.")} == trained_and_scored
    assert json.loads((root / "sweep.json").read_text()) == result
