"""The README's first command, for real: the medical recipe on the embedded model through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT


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
    assert meta["steps"] == 4 and meta["data"]["train_rows"] == 23
    # The recipe goes on: eval suite (base vs adapter), merge with parity check, GGUF + Modelfile.
    evaluation = json.loads((out / "eval.json").read_text())
    assert set(evaluation["tasks"]) == {"pubmedqa", "medmcqa"}
    assert evaluation["tasks"]["pubmedqa"]["n"] == 10
    pubmedqa = evaluation["tasks"]["pubmedqa"]
    row = f"| pubmedqa | accuracy | 10 | {pubmedqa['base']:.3f} | {pubmedqa['adapter']:.3f} |"
    assert row in done.stdout, done.stdout[-2000:]
    # The sample's verdict says what it is: 10 questions cannot show a difference.
    assert "note: The sample holds 10 test questions" in done.stdout
    speed = f"tokens/s={meta['tokens_per_s']} trained, {meta['processed_tokens_per_s']} in all peak_rss="
    assert speed in next(x for x in done.stdout.splitlines() if x.startswith("trained: "))
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert meta["last_loss"] == losses[-1] and meta["mean_loss"] == pytest.approx(sum(losses) / len(losses))
    merge = json.loads((out / "merged" / "merge.json").read_text())
    assert merge["max_abs_logit_diff"] < 1e-3
    assert (out / "merged" / "model.safetensors").is_file() and (out / "merged" / "chat_template.jinja").is_file()
    export = json.loads((out / "gguf" / "export.json").read_text())["files"]["medical-f16.gguf"]
    assert export["greedy_text_agreement"] == 1.0 and export["max_abs_logit_diff"] < 0.5
    assert (out / "gguf" / "medical-f16.Modelfile").read_text().startswith("FROM ./medical-f16.gguf")
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
            "error: {recipe}: train.lerning_rate: unknown key (did you mean 'learning_rate'?)\n",
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
def test_cli_errors_are_one_line_with_exit_2(tmp_path, args, line):
    """Run where `make recipe=medical` has left a finished runs/medical: the bad input is still what is reported,
    on exactly one line (no library warning before it), and nothing new is written."""
    finished = tmp_path / "runs" / "medical"
    finished.mkdir(parents=True)
    (finished / "run.json").write_text("{}")
    done = finetune(*args, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == line.format(recipe=PROJECT / "recipes" / "medical.yaml")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "runs",
        "runs/medical",
        "runs/medical/run.json",
    ]


def test_a_bitsandbytes_kernel_warning_is_kept_out_of_normal_output():
    """On AVX512-BF16 CPUs, importing bitsandbytes logs that it cannot fetch a Hub kernel (offline, always)."""
    code = (
        "import logging, finetune; logging.basicConfig(); "
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('Failed to load CPU gemm_4bit_forward')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == ""
