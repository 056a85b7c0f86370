"""A run killed with SIGKILL resumes with the same command and ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from finetune.train import last_checkpoint

ROWS = [[{"role": "user", "content": f"Spell {w}."}, {"role": "assistant", "content": " ".join(w.upper())}]
        for w in ("cat", "dog", "sun", "map", "pen", "cup", "box", "hat")]


def write_recipe(folder, base, out) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rows.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in ROWS))
    recipe = folder / "tiny.yaml"
    recipe.write_text(
        f"model: {{base: {base}}}\nadapter: {{r: 8, alpha: 16, dropout: 0.0}}\n"
        f"data: {{sources: [{{path: {folder / 'rows.jsonl'}}}], max_length: 64}}\n"
        f"train: {{max_steps: 10, learning_rate: 0.005, batch_size: 2, save_steps: 2, warmup_ratio: 0.0, output_dir: {out}}}\n"
        "eval: {suite: null}\n"
    )
    return str(recipe)


def finetune_run(recipe: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "finetune.cli", "run", recipe], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kwargs)


def logged_losses(out) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_sigkill_mid_training_then_the_same_command_resumes_to_the_same_state(tmp_path, tiny_llama_dir):
    reference_out = tmp_path / "reference"
    reference = finetune_run(write_recipe(tmp_path / "a", tiny_llama_dir, reference_out))
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-2000:]

    out = tmp_path / "killed"
    recipe = write_recipe(tmp_path / "b", tiny_llama_dir, out)
    victim = finetune_run(recipe)
    deadline = time.time() + 600
    # Kill once a checkpoint exists and training has gone past it, i.e. in the middle of later steps.
    while time.time() < deadline:
        checkpoint = last_checkpoint(out / "checkpoints")
        if checkpoint and (out / "metrics.jsonl").is_file() and len(logged_losses(out)) > int(checkpoint.name.split("-")[1]) + 1:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (out / "run.json").exists() and not (out / "adapter").exists(), "the kill came too late to test anything"

    resumed = finetune_run(recipe)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-2000:]
    assert "resuming from" in resumed.stderr.read()
    steps, losses = zip(*logged_losses(out))
    reference_steps, reference_losses = zip(*logged_losses(reference_out))
    assert steps == reference_steps == tuple(range(1, 11))
    assert losses == pytest.approx(reference_losses, abs=1e-4)
    expected = load_file(reference_out / "adapter" / "adapter_model.safetensors")
    got = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)


def test_an_incomplete_checkpoint_is_never_picked(tmp_path):
    for step, state in ((2, '{"global_step": 2}'), (4, '{"global_st'), (6, None)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"x")
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    # checkpoint-6 was killed before its state was written, checkpoint-4 while writing it.
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
