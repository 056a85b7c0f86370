"""`finetune run` under torchrun and accelerate: 2-process DDP on CPU (gloo) equals one process with the same
global batch, only the main process writes, and a DDP run resumes from its checkpoint."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
from cli_runs import finetune_run, logged_losses, write_recipe
from safetensors.torch import load_file

from finetune import distributed
from finetune.errors import FinetuneError

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
# Two processes of batch 2 take the same 4 rows per step as one process of batch 4: accelerate hands rank r the r-th
# of every 2 consecutive batches, and length grouping (on, as users run it) groups by the global batch.
STEPS = {"max_steps": 6, "group_by_length": True}
# Dropout off: each rank draws masks for its own rows, so its masks cannot equal one process drawing for all rows.
NO_DROPOUT = {"dropout": 0.0}


def finished(process) -> str:
    stdout, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr[-3000:]
    return stdout


def adapter_weights(out):
    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("single")
    finished(
        finetune_run(write_recipe(root, tiny_llama_dir, root / "out", rows=16, batch_size=4, **STEPS, **NO_DROPOUT))
    )
    return root / "out"


def assert_same_training(out, reference):
    steps, losses = zip(*logged_losses(out))
    reference_steps, reference_losses = zip(*logged_losses(reference))
    assert steps == reference_steps == tuple(range(1, 7))  # each step logged once: only the main process writes
    assert losses == pytest.approx(reference_losses, abs=2e-4)
    expected, got = adapter_weights(reference), adapter_weights(out)
    assert expected.keys() == got.keys()
    assert all(torch.allclose(expected[k], got[k], atol=1e-4) for k in expected)


def assert_one_output(out, stdout):
    assert stdout.count("trained: ") == 1
    names = {p.name for p in out.iterdir()}
    assert names == {"recipe.yaml", "adapter", "checkpoints", "metrics.jsonl", "loss.png", "run.json", ".lock"}, names


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, tiny_llama_dir, single_process):
    out = tmp_path / "out"
    stdout = finished(
        finetune_run(
            write_recipe(tmp_path, tiny_llama_dir, out, rows=16, batch_size=2, **STEPS, **NO_DROPOUT), launcher=TORCHRUN
        )
    )
    assert_same_training(out, single_process)
    assert_one_output(out, stdout)


@pytest.mark.slow
def test_finetune_run_distributed_ddp_launches_accelerate_with_the_shipped_config(
    tmp_path, tiny_llama_dir, single_process
):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, tiny_llama_dir, out, rows=16, batch_size=2, **STEPS, **NO_DROPOUT)
    stdout = finished(finetune_run(recipe, "--distributed", "ddp", "--processes", "2"))
    assert_same_training(out, single_process)
    assert_one_output(out, stdout)

    # Resume under DDP: forget everything after the step-4 checkpoint, as a kill after it would, and run again.
    shutil.rmtree(out / "checkpoints" / "checkpoint-6")
    (out / "run.json").unlink()
    shutil.rmtree(out / "adapter")
    resumed = finetune_run(recipe, "--distributed", "ddp", "--processes", "2")
    stdout, stderr = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, stderr[-3000:]
    assert "resuming from" in stderr and "checkpoint-4" in stderr
    assert_same_training(out, single_process)


def test_deepspeed_without_the_extra_is_one_line_naming_it(monkeypatch):
    monkeypatch.setattr(distributed.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        FinetuneError,
        match=r"^--distributed deepspeed-zero2: DeepSpeed is not installed; pip install -e '\.\[deepspeed\]'",
    ):
        distributed.launch_command("deepspeed-zero2", 2, ["run", "medical"])


def test_an_unknown_config_names_the_shipped_ones():
    with pytest.raises(
        FinetuneError,
        match=r"^--distributed: unknown config 'fsdp2'; choose one of ddp, deepspeed-zero2, deepspeed-zero3, fsdp$",
    ):
        distributed.launch_command("fsdp2", 2, ["run", "medical"])


def test_the_launch_command_is_accelerate_with_the_config_and_the_same_arguments():
    command = distributed.launch_command("fsdp", 4, ["run", "medical", "train.max_steps=5"])
    assert command[1:4] == ["launch", "--config_file", str(distributed.CONFIGS / "fsdp.yaml")]
    assert command[4:] == ["--num_processes", "4", "-m", "finetune.cli", "run", "medical", "train.max_steps=5"]
