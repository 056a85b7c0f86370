"""train.run(): SFT (TRL SFTTrainer) or DPO (TRL DPOTrainer) of a PEFT adapter, as the recipe says.

The run folder (train.output_dir):
    recipe.yaml     the resolved recipe
    adapter/        the adapter, tokenizer and training chat template (written atomically)
    checkpoints/    resumable trainer checkpoints
    metrics.jsonl   every logged step (loss, learning rate, grad norm, eval loss)
    loss.png        the loss curve (and rewards.png for DPO: chosen / rejected rewards, margin, accuracy)
    run.json        versions, seed, wall time, tokens, tokens/s, peak memory; written last, so its
                    presence means the run is complete
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import logging
import math
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from finetune import adapters, distributed, model as model_lib, report
from finetune.data.build import build
from finetune.errors import FinetuneError, disk_full
from finetune.outputs import replace_dir, write_json_atomic
from finetune.recipe import Recipe, resolve_path, to_yaml

log = logging.getLogger(__name__)
LIBRARIES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "gguf", "huggingface_hub")


class MetricsLog(TrainerCallback):
    """Appends every log record to metrics.jsonl and stops on a non-finite loss."""

    def __init__(self, path: Path, checkpoints: Path):
        self.path = path
        self.checkpoints = checkpoints

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        if state.is_world_process_zero:
            record = {"step": state.global_step, "epoch": state.epoch, **logs}
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        # Every process sees the same (gathered) loss, so all of them stop, and none waits for the others forever.
        for key in ("loss", "grad_norm"):
            value = logs.get(key)
            if value is not None and not math.isfinite(value):
                last = last_checkpoint(self.checkpoints)
                kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
                name = "loss" if key == "loss" else "gradient norm"
                raise FinetuneError(f"train: {name} became {value} at step {state.global_step}; lower train.learning_rate or check the data ({kept})")


def versions() -> dict:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def is_complete(checkpoint: Path) -> bool:
    """transformers writes trainer_state.json after the weights, optimizer, scheduler and RNG state, so a
    readable one marks a finished save."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def last_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint that was saved completely."""
    if not folder.is_dir():
        return None
    steps = sorted((int(p.name.split("-")[-1]), p) for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit())
    for _, checkpoint in reversed(steps):
        if is_complete(checkpoint):
            return checkpoint
        log.warning("ignoring incomplete checkpoint %s", checkpoint)
    return None


def resume_point(recipe: Recipe, out: Path) -> Path | None:
    """train.resume when the recipe names one, else the newest complete checkpoint of this run (or none)."""
    if recipe.train.resume is None:
        return last_checkpoint(out / "checkpoints")
    checkpoint = resolve_path(recipe.train.resume)
    if not is_complete(checkpoint):
        raise FinetuneError(f"train.resume: {recipe.train.resume}: not a complete checkpoint (no readable trainer_state.json); "
                            "name a checkpoint-N folder, or remove train.resume to use the newest complete one")
    return checkpoint


def trim_metrics(path: Path, step: int) -> None:
    """Forget what was logged after the checkpoint a run resumes from, so no step appears twice."""
    kept = [r for r in report.read_metrics(path) if r["step"] <= step]
    if kept:
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    else:
        path.unlink(missing_ok=True)


def prepare_output(out: Path, overwrite: bool) -> None:
    if (out / "run.json").is_file():
        if not overwrite:
            raise FinetuneError(f"{out}: a finished run is already there; pass --overwrite to replace it, or set train.output_dir")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-")
        probe.close()
    except OSError as e:
        raise FinetuneError(f"train.output_dir: {out}: cannot write there ({e.strerror}); choose a writable folder") from None


def common_args(recipe: Recipe, out: Path, has_eval: bool) -> dict:
    """Trainer arguments shared by SFT and DPO."""
    train = recipe.train
    on_cpu = model_lib.device() == "cpu"
    dtype = model_lib.compute_dtype(recipe.model)
    return dict(
        output_dir=str(out / "checkpoints"),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # a float below 1 is a ratio in transformers 5
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation,
        gradient_checkpointing=train.gradient_checkpointing,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        # Non-reentrant checkpointing is the variant that works under DDP and FSDP.
        gradient_checkpointing_kwargs={"use_reentrant": False} if train.gradient_checkpointing else None,
        ddp_find_unused_parameters=False,
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=train.logging_steps,
        save_steps=train.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if has_eval and train.eval_steps else "no",
        eval_steps=train.eval_steps,
        # TRL defaults to bf16, which CPUs run ~17x slower than fp32 (and most refuse); follow the compute dtype.
        bf16=dtype == torch.bfloat16 and not on_cpu,
        fp16=dtype == torch.float16 and not on_cpu,
        use_cpu=on_cpu,
        max_length=recipe.data.max_length,
        report_to="none",
        logging_first_step=True,
        # The default filter logs a NaN loss as 0, which would hide exactly what the guard looks for.
        logging_nan_inf_filter=False,
        disable_tqdm=False,
    )


def sft_trainer(recipe: Recipe, model, tokenizer, data, peft_config, callbacks, out: Path):
    from trl import SFTConfig

    from finetune.batching import LeftPaddingCollator
    from finetune.sft_trainer import SFTTrainer, TrainedPositionsSFTTrainer

    args = SFTConfig(
        **common_args(recipe, out, data.eval is not None),
        train_sampling_strategy="group_by_length" if recipe.train.group_by_length else "random",
        # Rows arrive tokenized with assistant-only labels from data.build.
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
    )
    if model_lib.device() == "cpu":
        # TRL's fused LM head scores every position where Triton does not run: project only the trained ones.
        return TrainedPositionsSFTTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                                          processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks,
                                          data_collator=LeftPaddingCollator(tokenizer.pad_token_id))
    return SFTTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                      processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)


def dpo_trainer(recipe: Recipe, model, tokenizer, data, peft_config, callbacks, out: Path):
    """DPO with no second copy of the weights: the reference is the base with the adapter disabled, or,
    when continuing an adapter (init_from), TRL's frozen copy of that adapter."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        **common_args(recipe, out, data.eval is not None),
        beta=recipe.dpo.beta,
        loss_type=[recipe.dpo.loss_type],
        label_smoothing=recipe.dpo.label_smoothing,
        precompute_ref_log_probs=recipe.dpo.precompute_ref_log_probs,
    )
    return DPOTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                      processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)


def initial_adapter(recipe: Recipe) -> Path | None:
    """The adapter train.init_from names; a recipe name whose run is not finished is trained first."""
    from finetune import recipe as recipe_lib
    from finetune.inference import run_recipe

    source = recipe.train.init_from
    if source is None:
        return None
    folder = Path(source)
    if (folder / "adapter" / "adapter_config.json").is_file():
        parent = run_recipe(folder)
    else:
        parent = recipe_lib.load(source)
        folder = parent.output_dir
        if not (folder / "run.json").is_file():
            log.info("train.init_from: %s is not trained yet; training it first", parent.name)
            run(parent)
    if parent.model.base != recipe.model.base:
        raise FinetuneError(f"train.init_from: {source} was trained on {parent.model.base}, not {recipe.model.base}; use the same model.base")
    return folder / "adapter"


@contextlib.contextmanager
def exclusive(out: Path):
    """Hold out/.lock for the whole run, so a second run into the same folder refuses instead of interleaving.
    Under torchrun / accelerate only the main process takes it: the others are the same run."""
    if not distributed.is_main():
        yield
        return
    with (out / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FinetuneError(f"{out}: another run is writing there right now; wait for it or set train.output_dir") from None
        yield


def run(recipe: Recipe, overwrite: bool = False) -> Path:
    """Train the recipe's adapter; returns the run folder."""
    start_adapter = initial_adapter(recipe)
    out = recipe.output_dir
    fresh = not out.exists()
    with distributed.main_first():
        if distributed.is_main():
            prepare_output(out, overwrite)
    try:
        resume = resume_point(recipe, out)
        with exclusive(out):
            return _train(recipe, out, start_adapter, resume)
    except BaseException as e:
        # A run that failed before its first logged step (bad model, bad data) leaves no folder behind;
        # one that trained keeps its metrics and checkpoints to resume from (incomplete ones are skipped).
        if fresh and distributed.is_main() and not (out / "metrics.jsonl").exists():
            shutil.rmtree(out, ignore_errors=True)
        reason = disk_full(e)
        if reason is not None:
            raise FinetuneError(f"{out}: the disk is full ({reason}); free space or set train.output_dir on a bigger disk, "
                                "then run the same command again to resume") from e
        raise


def _train(recipe: Recipe, out: Path, start_adapter: Path | None, resume: Path | None) -> Path:
    from peft import PeftModel

    from finetune.data.build import build_preferences

    started = time.time()
    dpo = recipe.train.method == "dpo"
    # The main process converts the model and fills the token cache; the others then read them.
    with distributed.main_first():
        model, tokenizer = model_lib.load(recipe.model)
        data = build_preferences(recipe, tokenizer) if dpo else build(recipe, tokenizer)
    if start_adapter is not None:
        model = PeftModel.from_pretrained(model, start_adapter, is_trainable=True)
        peft_config = None
    else:
        peft_config = adapters.peft_config(recipe.adapter)
    log.info("training rows: %d, eval rows: %d, dropped as too long: %d",
             data.stats["train_rows"], data.stats["eval_rows"], data.stats["dropped_too_long"])
    if distributed.is_main():
        (out / "recipe.yaml").write_text(to_yaml(recipe))
        trim_metrics(out / "metrics.jsonl", int(resume.name.split("-")[-1]) if resume else 0)
    if resume:
        log.info("resuming from %s", resume)

    callbacks = [MetricsLog(out / "metrics.jsonl", out / "checkpoints")]
    trainer = (dpo_trainer if dpo else sft_trainer)(recipe, model, tokenizer, data, peft_config, callbacks, out)
    # TRL casts adapter weights of quantized models to bf16; on CPU that makes every step ~13x slower,
    # so keep trainable weights in the compute dtype.
    dtype = model_lib.compute_dtype(recipe.model)
    for parameter in trainer.model.parameters():
        if parameter.requires_grad and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        # A run that fails mid-step would leave its progress bar open, redrawn below the error line at exit.
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, ProgressCallback) and callback.training_bar is not None:
                callback.training_bar.close()

    save_adapter(trainer, tokenizer, out / "adapter")
    if not distributed.is_main():
        return out
    report.plot_loss(out / "metrics.jsonl", out / "loss.png", title=recipe.name)
    if dpo:
        report.plot_rewards(out / "metrics.jsonl", out / "rewards.png", title=recipe.name)
    wall = time.time() - started
    epochs_done = trainer.state.epoch or 0.0
    trained_tokens = int(data.stats["trained_tokens"] * epochs_done) if "trained_tokens" in data.stats else None
    metadata = {
        "recipe": recipe.name,
        "method": recipe.train.method,
        "init_from": str(start_adapter) if start_adapter else None,
        "seed": recipe.train.seed,
        "steps": trainer.state.global_step,
        "epochs": epochs_done,
        "final_loss": result.training_loss,
        "wall_time_s": round(wall, 1),
        "train_runtime_s": round(result.metrics["train_runtime"], 1),
        "tokens_trained": trained_tokens,
        "tokens_per_s": round(trained_tokens / max(result.metrics["train_runtime"], 1e-9), 1) if trained_tokens else None,
        "padding_fraction": padding_fraction(trainer) if not dpo else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "device": model_lib.device(),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "data": {k: v for k, v in data.stats.items() if k != "lengths"},
        "versions": versions(),
        "python": platform.python_version(),
    }
    write_json_atomic(out / "run.json", metadata)
    return out


def padding_fraction(trainer) -> float:
    """Share of the tokens in one epoch of the trainer's batches that are padding (its sampler, a fresh draw)."""
    real = padded = 0
    for batch in trainer.get_train_dataloader():
        padded += batch["input_ids"].numel()
        real += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    return round(1 - real / padded, 4)


def save_adapter(trainer, tokenizer, target: Path) -> None:
    """Save adapter + tokenizer + training chat template into a temp folder, then rename it into place.
    Sharded weights (FSDP, ZeRO-3) are gathered by the Trainer, which needs every process; otherwise the
    main process alone writes."""
    tmp = target.parent / f".{target.name}-partial"
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    distributed.barrier()
    try:
        # Only the trained adapter ships: DPO adds a frozen "ref" copy, which the Trainer's gathering save writes too.
        if distributed.sharded():
            trainer.save_model(str(tmp))
            shutil.rmtree(tmp / "ref", ignore_errors=True)
        elif distributed.is_main():
            trainer.model.save_pretrained(tmp, safe_serialization=True, selected_adapters=["default"])
        if distributed.is_main():
            tokenizer.save_pretrained(tmp)
            replace_dir(tmp, target)
    finally:
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
