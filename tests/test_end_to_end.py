"""The README's first command, for real: the medical recipe on the embedded model through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent


def finetune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "finetune.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1200
    )


@pytest.mark.slow
def test_medical_recipe_trains_and_answers(tmp_path):
    out = tmp_path / "medical"
    done = finetune(
        "run", str(PROJECT / "recipes" / "medical.yaml"), "train.max_steps=4", f"train.output_dir={out}", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for name in (
        "recipe.yaml",
        "metrics.jsonl",
        "loss.png",
        "run.json",
        "adapter/adapter_model.safetensors",
        "adapter/chat_template.jinja",
    ):
        assert (out / name).is_file(), name
    meta = json.loads((out / "run.json").read_text())
    assert meta["steps"] == 4 and meta["data"]["train_rows"] == 30
    # The recipe goes on: eval suite (base vs adapter), merge with parity check, GGUF + Modelfile.
    evaluation = json.loads((out / "eval.json").read_text())
    assert set(evaluation["tasks"]) == {"pubmedqa", "medmcqa"}
    assert evaluation["tasks"]["pubmedqa"]["n"] == 10
    assert "| pubmedqa |" in done.stdout or "pubmedqa" in done.stdout
    merge = json.loads((out / "merged" / "merge.json").read_text())
    assert merge["max_abs_logit_diff"] < 1e-3
    assert (out / "merged" / "model.safetensors").is_file() and (out / "merged" / "chat_template.jinja").is_file()
    export = json.loads((out / "gguf" / "export.json").read_text())["files"]["medical-f16.gguf"]
    assert export["greedy_text_agreement"] == 1.0 and export["max_abs_logit_diff"] < 0.5
    assert (out / "gguf" / "medical-f16.Modelfile").read_text().startswith("FROM ./medical-f16.gguf")
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 4 and all(0 < loss < 10 for loss in losses)

    prompt = (
        "Context:\nAspirin irreversibly inhibits cyclooxygenase.\n\nQuestion: Does aspirin inhibit "
        "cyclooxygenase?\n\nAnswer with one of: yes, no, maybe."
    )
    answered = finetune("generate", str(out), prompt, "--max-new-tokens", "20", cwd=tmp_path)
    assert answered.returncode == 0, answered.stderr[-2000:]
    assert answered.stdout.strip(), "the trained model gave an empty answer"

    chatted = subprocess.run(
        [sys.executable, "-m", "finetune.cli", "chat", str(out), "--max-new-tokens", "10"],
        input="Is water wet?\n\n",
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert chatted.returncode == 0 and "model> " in chatted.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["run", "medical", "train.lerning_rate=1"],
            "error: recipes/medical.yaml: train.lerning_rate: unknown key (did you mean 'learning_rate'?)\n",
        ),
        (
            ["run", "medical", "data.sources=[{path: nowhere.jsonl}]"],
            "error: nowhere.jsonl: file not found; check data.sources[].path (relative paths start at the project "
            "folder)\n",
        ),
        (
            ["run", "medical", "train.output_dir=/proc/forbidden"],
            "error: train.output_dir: /proc/forbidden: cannot write there (No such file or directory); choose a "
            "writable folder\n",
        ),
        (
            ["run", "medical", "model.base=/no/such/model"],
            "error: model.base: /no/such/model: no such file or folder; give a local model folder, a .gguf file, a "
            "Hub id like org/name, or 'embedded'\n",
        ),
    ],
)
def test_cli_errors_are_one_line_with_exit_2(args, line):
    done = finetune(*args, cwd=PROJECT)
    assert done.returncode == 2
    assert done.stderr.endswith(line), done.stderr[-1000:]
    assert "Traceback" not in done.stderr
