"""A run killed with SIGKILL, in a step or in the middle of a checkpoint save, resumes with the same command and
ends where an uninterrupted run ends; a full disk is one line and loses nothing."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_runs import env, finetune_run, logged_losses, write_recipe
from safetensors.torch import load_file

from finetune.runs import last_checkpoint


@pytest.fixture(scope="module")
def reference_out(tmp_path_factory, tiny_llama_dir) -> Path:
    root = tmp_path_factory.mktemp("reference")
    reference = finetune_run(write_recipe(root, tiny_llama_dir, root / "out"))
    _, stderr = reference.communicate(timeout=600)
    assert reference.returncode == 0, stderr[-2000:]
    return root / "out"


def assert_resumes_to_the_reference(recipe: str, out: Path, reference_out: Path, resumed_from: str | None) -> None:
    resumed = finetune_run(recipe)
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-2000:]
    if resumed_from:
        assert f"resuming from {out / 'checkpoints' / resumed_from}" in stderr
    else:
        assert "resuming from" not in stderr
    steps, losses = zip(*logged_losses(out))
    reference_steps, reference_losses = zip(*logged_losses(reference_out))
    assert steps == reference_steps == tuple(range(1, 11))
    assert losses == pytest.approx(reference_losses, abs=1e-4)
    expected = load_file(reference_out / "adapter" / "adapter_model.safetensors")
    got = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)
    # run.json's loss figures come from metrics.jsonl: the resumed run's summary equals the uninterrupted one's.
    summary, reference = (json.loads((o / "run.json").read_text()) for o in (out, reference_out))
    assert summary["last_loss"] == pytest.approx(reference["last_loss"], abs=1e-4)
    assert summary["mean_loss"] == pytest.approx(reference["mean_loss"], abs=1e-4)


@pytest.mark.slow
def test_sigkill_mid_training_then_the_same_command_resumes_to_the_same_state(tmp_path, tiny_llama_dir, reference_out):
    out = tmp_path / "killed"
    recipe = write_recipe(tmp_path / "b", tiny_llama_dir, out)
    victim = finetune_run(recipe)
    deadline = time.time() + 600
    # Kill once a checkpoint exists and training has gone past it, i.e. in the middle of later steps.
    while time.time() < deadline:
        checkpoint = last_checkpoint(out / "checkpoints")
        if (
            checkpoint
            and (out / "metrics.jsonl").is_file()
            and len(logged_losses(out)) > int(checkpoint.name.split("-")[1]) + 1
        ):
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (out / "run.json").exists() and not (out / "adapter").exists(), "the kill came too late to test anything"

    assert_resumes_to_the_reference(recipe, out, reference_out, last_checkpoint(out / "checkpoints").name)


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_checkpoint_save_resumes_from_the_one_before(
    tmp_path, tiny_llama_dir, reference_out
):
    out = tmp_path / "killed"
    recipe = write_recipe(tmp_path, tiny_llama_dir, out)
    killed = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "kill_during_save.py"), "run", recipe],
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    half_saved = out / "checkpoints" / "checkpoint-4"
    assert (half_saved / "optimizer.pt").is_file() and not (half_saved / "trainer_state.json").exists()
    assert last_checkpoint(out / "checkpoints").name == "checkpoint-2"
    assert_resumes_to_the_reference(recipe, out, reference_out, "checkpoint-2")


def _limit_file_size():
    # Files may not grow past 16 KB: the first checkpoint's writes fail as they would on a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_run_resumes_when_there_is_room(tmp_path, tiny_llama_dir, reference_out):
    out = tmp_path / "full"
    recipe = write_recipe(tmp_path, tiny_llama_dir, out)
    full = subprocess.run(
        [sys.executable, "-m", "finetune.cli", "run", recipe],
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_limit_file_size,
    )
    assert full.returncode == 2, full.stderr[-2000:]
    last = full.stderr.strip().splitlines()[-1]
    assert (
        last
        == f"error: {out}: the disk is full (File too large); free space or set train.output_dir on a bigger disk, "
        "then run the same command again to resume"
    ), last
    assert "Traceback" not in full.stderr
    assert not (out / "run.json").exists() and not (out / "adapter").exists()
    assert last_checkpoint(out / "checkpoints") is None
    assert_resumes_to_the_reference(recipe, out, reference_out, None)


def test_an_incomplete_checkpoint_is_never_picked(tmp_path):
    for step, state in ((2, '{"global_step": 2}'), (4, '{"global_st'), (6, None)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"x")
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    # checkpoint-6 was killed before its state was written, checkpoint-4 while writing it.
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
