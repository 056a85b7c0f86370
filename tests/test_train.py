"""Training for real on a tiny random Llama: loss goes down with LoRA and with nf4 QLoRA; outputs are complete."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

from finetune import train
from finetune.adapters import PackedDropout
from finetune.errors import FinetuneError
from finetune.recipe import Recipe

ROWS = [
    [
        {"role": "user", "content": f"What is {a} plus {b}?"},
        {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
    ]
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 1), (2, 2), (9, 0), (4, 4), (6, 3)]
]


def tiny_recipe(tmp_path, base, dropout: float = 0.05, **train_overrides) -> Recipe:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in ROWS))
    return Recipe.model_validate(
        {
            "name": "tiny",
            "model": {"base": str(base)},
            "adapter": {"r": 8, "alpha": 16, "dropout": dropout},
            "data": {"sources": [{"path": str(data)}], "max_length": 128},
            "train": {
                "max_steps": 24,
                "learning_rate": 5e-3,
                "batch_size": 4,
                "warmup_ratio": 0.0,
                "lr_scheduler": "constant",
                "save_steps": 12,
                "output_dir": str(tmp_path / "run"),
                **train_overrides,
            },
        }
    )


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_lora_training_lowers_the_loss_and_writes_every_output(tmp_path, tiny_llama_dir):
    started = time.time()
    out = train.run(tiny_recipe(tmp_path, tiny_llama_dir))
    curve = losses(out)
    assert len(curve) == 24
    stamps = [r["time"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert started < stamps[0] and stamps == sorted(stamps) and stamps[-1] <= time.time(), stamps
    assert sum(curve[-4:]) / 4 < 0.7 * sum(curve[:4]) / 4, curve
    for name in (
        "recipe.yaml",
        "metrics.jsonl",
        "loss.png",
        "run.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/chat_template.jinja",
        "adapter/tokenizer.json",
    ):
        assert (out / name).is_file(), name
    assert "generation" in (out / "adapter" / "chat_template.jinja").read_text()
    # What a user shares has the modes a plain write gives (under umask 022), not a temp file's owner-only ones.
    assert {p.stat().st_mode & 0o777 for p in (out / "adapter").iterdir()} == {0o644}
    assert (out / "adapter").stat().st_mode & 0o777 == 0o755
    meta = json.loads((out / "run.json").read_text())
    assert meta["steps"] == 24 and meta["seed"] == 42
    assert meta["tokens_trained"] == int(meta["data"]["trained_tokens"] * meta["epochs"]) > 0
    assert meta["tokens_processed"] == int(meta["data"]["train_tokens"] * meta["epochs"]) > meta["tokens_trained"]
    # the same training time divides both counts (run.json rounds it to 0.1 s, and this run is short)
    assert meta["tokens_per_s"] == pytest.approx(meta["tokens_trained"] / meta["train_runtime_s"], rel=0.1)
    ratio = meta["tokens_processed"] / meta["tokens_trained"]
    assert meta["processed_tokens_per_s"] / meta["tokens_per_s"] == pytest.approx(ratio, rel=1e-3)
    assert meta["peak_rss_mb"] > 0
    assert set(meta["versions"]) >= {"torch", "transformers", "peft", "trl"}
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert weights and all(".lora_" in name for name in weights)
    assert any(name.endswith("lora_B.weight") and w.abs().max() > 0 for name, w in weights.items())


def test_qlora_nf4_training_lowers_the_loss(tmp_path, tiny_llama_dir):
    recipe = tiny_recipe(tmp_path, tiny_llama_dir)
    recipe.model.quantization = "nf4"
    out = train.run(recipe)
    curve = losses(out)
    assert sum(curve[-4:]) / 4 < 0.7 * sum(curve[:4]) / 4, curve
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    # Trainable weights stay in the CPU compute dtype (TRL would cast them to bf16).
    assert {str(w.dtype) for w in weights.values()} == {"torch.float32"}


# Per-step losses of the first 6 steps on the tiny seeded Llama (tests/conftest.py), LoRA dropout 0.05, recorded once:
# any change to the data order, the loss, the optimizer, LoRA's initialisation, dropout or nf4 loading shows here.
# "torch masks" is the same run with PEFT's own nn.Dropout (adapter.dropout_masks=torch), recorded before packed
# masks existed; the first step is the same in both because LoRA's B starts at zero.
PINNED_LOSSES = {
    "none": [11.3806725, 10.8913841, 9.9224110, 9.3888645, 8.6526403, 8.1197767],
    "nf4": [11.2829800, 10.7806978, 9.7647333, 9.3861809, 8.6050634, 8.2025461],
    "torch masks": [11.3806734, 10.8812141, 9.9286804, 9.3919029, 8.6319981, 8.1207695],
}


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_lora_losses_are_pinned(tmp_path, tiny_llama_dir, quantization):
    recipe = tiny_recipe(tmp_path, tiny_llama_dir, max_steps=6)
    recipe.model.quantization = quantization
    curve = torch.tensor(losses(train.run(recipe)))
    # Tolerances leave room for float rounding across CPUs (AVX2 vs AVX-512 kernels), nothing more.
    torch.testing.assert_close(curve, torch.tensor(PINNED_LOSSES[quantization]), rtol=1e-4, atol=1e-4)


def test_torch_dropout_masks_train_exactly_as_peft_does(tmp_path, tiny_llama_dir):
    recipe = tiny_recipe(tmp_path, tiny_llama_dir, max_steps=6)
    recipe.adapter.dropout_masks = "torch"
    curve = torch.tensor(losses(train.run(recipe)))
    torch.testing.assert_close(curve, torch.tensor(PINNED_LOSSES["torch masks"]), rtol=1e-4, atol=1e-4)
    # Packed masks are the default: other masks, so another curve from the second step on.
    assert not torch.allclose(curve[1:], torch.tensor(PINNED_LOSSES["none"][1:]), rtol=1e-4, atol=1e-4)


def test_packed_dropout_drops_p_in_every_lane_and_scales_what_it_keeps():
    torch.manual_seed(0)
    dropout = PackedDropout(0.05)
    x = torch.randn(4, 1000, 576, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    assert dropout.dropped == 3277  # p = 3277 / 65536 = 0.0500031
    # Each of a draw's four 16-bit lanes drops at p: the top one too, whose sign bit random_() alone leaves at 0.
    # 576,000 elements per lane: five standard deviations of the dropped fraction are 1.4e-3.
    for lane in range(4):
        assert abs(1 - kept.flatten()[lane::4].float().mean().item() - 3277 / 65536) < 1.4e-3
    assert torch.equal(y[kept], x[kept] * dropout.scale)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, kept * dropout.scale)
    assert dropout.eval()(x) is x


def test_bf16_on_a_cpu_is_autocast_over_float32_adapter_weights(tmp_path, tiny_llama_dir):
    recipe = tiny_recipe(tmp_path, tiny_llama_dir, max_steps=6)
    recipe.model.compute_dtype = "bfloat16"
    adapter_inputs = set()

    def record_adapter_input(module, args):
        if isinstance(module, torch.nn.Linear) and module.weight.requires_grad:
            adapter_inputs.add(args[0].dtype)

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record_adapter_input)
    try:
        curve = torch.tensor(losses(train.run(recipe)))
    finally:
        hook.remove()
    # The adapters take the bf16 activations as they are, without a float32 copy for PEFT's cast.
    assert adapter_inputs == {torch.bfloat16}
    # bf16 matmuls round: the curve follows the float32 one closely but not to float32's tolerance.
    torch.testing.assert_close(curve, torch.tensor(PINNED_LOSSES["none"]), rtol=2e-3, atol=0)
    assert not torch.allclose(curve, torch.tensor(PINNED_LOSSES["none"]), rtol=1e-4, atol=1e-4)
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert {str(w.dtype) for w in weights.values()} == {"torch.float32"}


def test_a_finished_run_is_not_overwritten_without_asking(tmp_path, tiny_llama_dir):
    recipe = tiny_recipe(tmp_path, tiny_llama_dir, max_steps=2)
    train.run(recipe)
    with pytest.raises(FinetuneError, match="a finished run is already there; pass --overwrite"):
        train.run(recipe)
    assert train.run(recipe, overwrite=True) == recipe.output_dir


def test_non_finite_loss_stops_with_the_step(tmp_path, tiny_llama_dir):
    recipe = tiny_recipe(tmp_path, tiny_llama_dir, learning_rate=1e30, max_steps=6)
    with pytest.raises(
        FinetuneError, match=r"train: (loss|gradient norm) became nan at step 2; lower train.learning_rate"
    ):
        train.run(recipe)
    assert not (recipe.output_dir / "run.json").exists()
    assert not (recipe.output_dir / "adapter").exists()


def capture_trainers(monkeypatch) -> list:
    """The trainers train.run builds from now on, kept for the test to inspect after the run."""
    trainers, save = [], train.save_adapter
    monkeypatch.setattr(train, "save_adapter", lambda trainer, *a: (trainers.append(trainer), save(trainer, *a)))
    return trainers


def resumed_after_a_kill(recipe: Recipe):
    """Train 6 steps with a checkpoint at step 3, leave what a kill after that checkpoint leaves (no final adapter,
    no run.json, no later checkpoint, metrics logged past the checkpoint), and run the same recipe again."""
    out = train.run(recipe)
    for name in ("run.json", "loss.png"):
        (out / name).unlink()
    shutil.rmtree(out / "adapter")
    shutil.rmtree(out / "checkpoints" / "checkpoint-6")
    train.run(recipe)
    return out


def assert_same_weights_and_losses(reference, resumed) -> None:
    first = load_file(reference / "adapter" / "adapter_model.safetensors")
    second = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.allclose(first[name], second[name], atol=1e-6), name
    assert losses(resumed) == pytest.approx(losses(reference), abs=1e-4)


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, tiny_llama_dir):
    uninterrupted = train.run(tiny_recipe(tmp_path / "a", tiny_llama_dir, max_steps=6, save_steps=3))
    resumed = resumed_after_a_kill(tiny_recipe(tmp_path / "b", tiny_llama_dir, max_steps=6, save_steps=3))
    assert_same_weights_and_losses(uninterrupted, resumed)


def test_train_resume_picks_the_named_checkpoint_over_the_newest(tmp_path, tiny_llama_dir, caplog):
    reference = train.run(tiny_recipe(tmp_path / "a", tiny_llama_dir, max_steps=6, save_steps=2))
    out = train.run(tiny_recipe(tmp_path / "b", tiny_llama_dir, max_steps=6, save_steps=2))
    (out / "run.json").unlink()
    shutil.rmtree(out / "adapter")
    named = out / "checkpoints" / "checkpoint-4"
    assert (out / "checkpoints" / "checkpoint-6").is_dir()  # the newest, which train.resume overrides
    with caplog.at_level("INFO", logger="finetune.train"):
        train.run(tiny_recipe(tmp_path / "b", tiny_llama_dir, max_steps=6, save_steps=2, resume=str(named)))
    assert f"resuming from {named}" in caplog.text
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, 7))
    assert losses(out) == pytest.approx(losses(reference), abs=1e-4)
    first = load_file(reference / "adapter" / "adapter_model.safetensors")
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(first[k], resumed[k], atol=1e-6) for k in first)


def test_a_second_run_into_the_same_folder_refuses(tmp_path, tiny_llama_dir):
    import fcntl

    recipe = tiny_recipe(tmp_path, tiny_llama_dir, max_steps=1)
    recipe.output_dir.mkdir(parents=True)
    with (recipe.output_dir / ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(FinetuneError, match="another run is writing there right now"):
            train.run(recipe)
    assert not (recipe.output_dir / "run.json").exists()


def test_loraplus_trains_b_matrices_at_lr_times_ratio_and_resumes_to_the_same_weights(
    tmp_path, tiny_llama_dir, monkeypatch
):
    trainers = capture_trainers(monkeypatch)
    recipe = tiny_recipe(tmp_path / "a", tiny_llama_dir, max_steps=6, save_steps=3)
    recipe.adapter.loraplus_lr_ratio = 16
    uninterrupted = train.run(recipe)
    names = {id(p): n for n, p in trainers[0].model.named_parameters()}
    rates = {names[id(p)]: group["lr"] for group in trainers[0].optimizer.param_groups for p in group["params"]}
    assert rates and {n for n in rates if "lora_" not in n} == set()
    assert [lr for n, lr in rates.items() if "lora_B" in n] == pytest.approx([5e-3 * 16] * 14)  # 7 modules x 2 layers
    assert [lr for n, lr in rates.items() if "lora_A" in n] == pytest.approx([5e-3] * 14)

    # The optimizer state a checkpoint saves has LoRA+'s groups, and a resumed run continues them exactly.
    interrupted = tiny_recipe(tmp_path / "b", tiny_llama_dir, max_steps=6, save_steps=3)
    interrupted.adapter.loraplus_lr_ratio = 16
    assert_same_weights_and_losses(uninterrupted, resumed_after_a_kill(interrupted))


def test_packed_rows_give_the_unpacked_loss_per_token(tmp_path, tiny_llama_dir, monkeypatch):
    """The first logged loss is computed before any update, on all 8 rows in one step: packing them padding-free
    (position ids restarting per row, no attention across rows) is the same computation as padded batches."""
    trainers = capture_trainers(monkeypatch)
    unpacked = train.run(tiny_recipe(tmp_path / "a", tiny_llama_dir, dropout=0.0, max_steps=1, batch_size=8))
    packed = train.run(
        tiny_recipe(tmp_path / "b", tiny_llama_dir, dropout=0.0, max_steps=1, batch_size=8, packing=True)
    )
    assert losses(packed) == pytest.approx(losses(unpacked), rel=1e-5)
    dataset = trainers[1].train_dataset
    assert len(dataset) < len(ROWS) and sum(len(s) for s in dataset["seq_lengths"]) == len(ROWS)
    batch = next(iter(trainers[1].get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    assert int((batch["position_ids"] == 0).sum()) == len(ROWS)  # one start per conversation
    meta = json.loads((packed / "run.json").read_text())
    assert meta["packed"] and meta["padding_fraction"] == 0.0 and meta["attention"] == "sdpa"


def test_liger_is_refused_on_cpu_before_anything_is_written(tmp_path, tiny_llama_dir, monkeypatch):
    from finetune import model as model_lib

    monkeypatch.setattr(model_lib, "device", lambda: "cpu")
    recipe = tiny_recipe(tmp_path, tiny_llama_dir, liger=True)
    with pytest.raises(FinetuneError) as error:
        train.run(recipe)
    assert str(error.value) == (
        "train.liger: Liger's kernels are Triton kernels and need a CUDA GPU, which this machine does not have; "
        "remove train.liger"
    )
    assert not recipe.output_dir.exists()
