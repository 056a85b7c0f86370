"""train.run(): SFT, DPO, KTO or ORPO (TRL's trainers, methods.py) of a PEFT adapter, as the recipe says.

It writes the run folder (layout in runs.py): recipe.yaml, checkpoints, metrics.jsonl, loss.png
(rewards.png for the preference methods), the adapter with its tokenizer and training chat template, and run.json last.
Every input (model, data, resume checkpoint, output folder) is checked before the folder is created.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import resource
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from finetune import adapters, distributed, methods, plots, runs, tracking
from finetune import model as model_lib
from finetune.config import resolve_path
from finetune.data.build import build, build_preferences
from finetune.errors import FinetuneError, disk_full
from finetune.recipe import Recipe, to_yaml

log = logging.getLogger(__name__)


class MetricsLog(TrainerCallback):
    """Appends every log record to metrics.jsonl, stamped with the wall-clock time (as TensorBoard stamps its events,
    so step times can be read back), and stops on a non-finite loss."""

    def __init__(self, folder: runs.RunFolder):
        self.folder = folder

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        if state.is_world_process_zero:
            record = {"step": state.global_step, "epoch": state.epoch, "time": round(time.time(), 3), **logs}
            with self.folder.metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")
        # Every process sees the same (gathered) loss, so all of them stop, and none waits for the others forever.
        for key in ("loss", "grad_norm"):
            value = logs.get(key)
            if value is not None and not math.isfinite(value):
                last = runs.last_checkpoint(self.folder.checkpoints)
                kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
                name = "loss" if key == "loss" else "gradient norm"
                raise FinetuneError(
                    f"train: {name} became {value} at step {state.global_step}; lower train.learning_rate or check "
                    f"the data ({kept})"
                )


def init_adapter(recipe: Recipe) -> Path | None:
    """The adapter train.init_from names: a finished run folder's, or the finished run of a recipe name."""
    from finetune import recipe as recipe_lib

    source = recipe.train.init_from
    if source is None:
        return None
    folder = runs.RunFolder(Path(source))
    if (folder.adapter / "adapter_config.json").is_file():
        parent = runs.finished_recipe(folder.root)
    else:
        parent = recipe_lib.load(source)
        folder = runs.RunFolder(parent.output_dir)
        if not folder.finished:
            raise FinetuneError(
                f"train.init_from: {source}: its run {folder.root} is not finished; `finetune run` trains it first"
            )
    if parent.model.base != recipe.model.base:
        raise FinetuneError(
            f"train.init_from: {source} was trained on {parent.model.base}, not {recipe.model.base}; use the same "
            "model.base"
        )
    return folder.adapter


def named_resume(recipe: Recipe) -> Path | None:
    """train.resume, checked: it must name a checkpoint that was saved completely."""
    if recipe.train.resume is None:
        return None
    checkpoint = resolve_path(recipe.train.resume)
    if not runs.is_complete(checkpoint):
        raise FinetuneError(
            f"train.resume: {recipe.train.resume}: not a complete checkpoint (no readable trainer_state.json); "
            "name a checkpoint-N folder, or remove train.resume to use the newest complete one"
        )
    return checkpoint


def trim_metrics(path: Path, step: int) -> None:
    """Forget what was logged after the checkpoint a run resumes from, so no step appears twice."""
    kept = [r for r in runs.read_metrics(path) if r["step"] <= step]
    if kept:
        runs.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    else:
        path.unlink(missing_ok=True)


def run(recipe: Recipe, overwrite: bool = False) -> Path:
    """Train the recipe's adapter (continuing train.init_from's when set); returns the run folder."""
    out = recipe.output_dir
    methods.check(recipe)
    runs.check_writable(out)
    start_adapter = init_adapter(recipe)
    named = named_resume(recipe)
    # The main process converts the model and fills the token cache; the others then read them.
    with distributed.main_first():
        tokenizer = model_lib.tokenizer_for(recipe.model)
        data = build(recipe, tokenizer) if recipe.train.method == "sft" else build_preferences(recipe, tokenizer)
    runs.check_not_finished(out, overwrite)
    with distributed.main_first():
        model, tokenizer = model_lib.load(methods.model_section(recipe), tokenizer=tokenizer)
    fresh = not out.exists()
    with distributed.main_first():
        if distributed.is_main():
            runs.prepare(out, overwrite)
    try:
        resume = named or runs.last_checkpoint(runs.RunFolder(out).checkpoints)
        with runs.exclusive(out), tracking.environment(recipe, out):
            return _train(recipe, out, model, tokenizer, data, start_adapter, resume)
    except BaseException as e:
        # A run that failed before its first logged step leaves no folder behind; one that trained keeps its
        # metrics and checkpoints to resume from (incomplete ones are skipped).
        if fresh and distributed.is_main() and not runs.RunFolder(out).metrics.exists():
            shutil.rmtree(out, ignore_errors=True)
        reason = disk_full(e)
        if reason is not None:
            raise FinetuneError(
                f"{out}: the disk is full ({reason}); free space or set train.output_dir on a bigger disk, "
                "then run the same command again to resume"
            ) from e
        raise


def _train(recipe: Recipe, out: Path, model, tokenizer, data, start_adapter: Path | None, resume: Path | None) -> Path:
    from peft import PeftModel
    from peft.helpers import disable_input_dtype_casting

    started = time.time()
    folder = runs.RunFolder(out)
    preference = recipe.train.method != "sft"
    if start_adapter is not None:
        model = PeftModel.from_pretrained(model, start_adapter, is_trainable=True)
        peft_config = None
    else:
        peft_config = adapters.peft_config(recipe.adapter)
    log.info(
        "training rows: %d, eval rows: %d, dropped as too long: %d",
        data.stats["train_rows"],
        data.stats["eval_rows"],
        data.stats["dropped_too_long"],
    )
    if distributed.is_main():
        runs.write_text(folder.recipe, to_yaml(recipe))
        trim_metrics(folder.metrics, int(resume.name.split("-")[-1]) if resume else 0)
    if resume:
        log.info("resuming from %s", resume)

    trainer = methods.trainer(recipe, model, tokenizer, data, peft_config, [MetricsLog(folder)], out)
    # TRL casts adapter weights of quantized models to bf16; keep trainable weights in the compute dtype, except
    # bf16 on a CPU: that is autocast over float32 master weights, whose small updates bf16 would round away.
    dtype = model_lib.compute_dtype(recipe.model)
    autocast_on_cpu = dtype == torch.bfloat16 and model_lib.device() == "cpu"
    if autocast_on_cpu:
        dtype = torch.float32
    for parameter in trainer.model.parameters():
        if parameter.requires_grad and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
    if model_lib.device() == "cpu" and recipe.adapter.dropout_masks == "packed":
        adapters.pack_dropout_masks(trainer.model)
    try:
        # PEFT casts each adapter's input to its float32 weights, and autocast casts it back to bf16 for the
        # product: two copies of every adapted activation (and their gradients) for nothing.
        with disable_input_dtype_casting(trainer.model, active=autocast_on_cpu):
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        # A run that fails mid-step would leave its progress bar open, redrawn below the error line at exit.
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, ProgressCallback) and callback.training_bar is not None:
                callback.training_bar.close()

    save_adapter(trainer, tokenizer, folder.adapter)
    if not distributed.is_main():
        return out
    with runs.staged(out / "loss.png") as tmp:
        plots.plot_loss(folder.metrics, tmp, title=recipe.name)
    if preference:
        with runs.staged(out / "rewards.png") as tmp:
            plots.plot_rewards(folder.metrics, tmp, title=recipe.name)
    wall = time.time() - started
    epochs_done = trainer.state.epoch or 0.0
    # Both counts: a classification recipe trains a few label tokens per row but computes over whole prompts.
    trained_tokens = int(data.stats["trained_tokens"] * epochs_done) if "trained_tokens" in data.stats else None
    all_tokens = int(data.stats["train_tokens"] * epochs_done) if "train_tokens" in data.stats else None
    runtime = max(result.metrics["train_runtime"], 1e-9)
    metadata = {
        "recipe": recipe.name,
        "method": recipe.train.method,
        "init_from": str(start_adapter) if start_adapter else None,
        "seed": recipe.train.seed,
        "steps": trainer.state.global_step,
        "epochs": epochs_done,
        **loss_summary(folder.metrics),
        "wall_time_s": round(wall, 1),
        "train_runtime_s": round(result.metrics["train_runtime"], 1),
        "tokens_trained": trained_tokens,
        "tokens_per_s": round(trained_tokens / runtime, 1) if trained_tokens else None,
        "tokens_processed": all_tokens,
        "processed_tokens_per_s": round(all_tokens / runtime, 1) if all_tokens else None,
        "padding_fraction": padding_fraction(trainer) if not preference else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "device": model_lib.device(),
        "attention": trainer.model.config._attn_implementation,
        "packed": recipe.packed,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "data": {k: v for k, v in data.stats.items() if k != "lengths"},
        "versions": runs.versions(),
        "python": platform.python_version(),
    }
    runs.write_json(folder.summary, metadata)
    return out


def loss_summary(metrics: Path) -> dict:
    """The last logged training loss and the mean over every logged step, from metrics.jsonl: the same for a run
    that was resumed as for one that was not (TRL's training_loss covers only the steps the last process ran)."""
    losses = [r["loss"] for r in runs.read_metrics(metrics) if "loss" in r]
    return {"last_loss": losses[-1], "mean_loss": sum(losses) / len(losses)} if losses else {}


def padding_fraction(trainer) -> float:
    """Share of the tokens in one epoch of the trainer's batches that are padding (its sampler, a fresh draw)."""
    real = padded = 0
    for batch in trainer.get_train_dataloader():
        padded += batch["input_ids"].numel()
        real += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    return round(1 - real / padded, 4)


def save_adapter(trainer, tokenizer, target: Path) -> None:
    """Save adapter + tokenizer + training chat template into a staged folder, renamed into place at the end.
    Sharded weights (FSDP, ZeRO-3) are gathered by the Trainer, which needs every process; otherwise the
    main process alone writes."""
    if not distributed.sharded():
        if distributed.is_main():
            with runs.staged(target, folder=True) as tmp:
                trainer.model.save_pretrained(tmp, safe_serialization=True, selected_adapters=["default"])
                tokenizer.save_pretrained(tmp)
        distributed.barrier()
        return
    # The gathering save needs every process writing into one agreed folder: the main process names it.
    partial = target.with_name(f".{target.name}.partial-sharded")
    if distributed.is_main():
        shutil.rmtree(partial, ignore_errors=True)
    distributed.barrier()
    trainer.save_model(str(partial))
    if distributed.is_main():
        # Only the trained adapter ships: DPO and KTO add a frozen "ref" copy, which the gathering save writes too.
        shutil.rmtree(partial / "ref", ignore_errors=True)
        with runs.staged(target, folder=True) as tmp:
            for item in partial.iterdir():
                shutil.move(str(item), tmp / item.name)
            tokenizer.save_pretrained(tmp)
        shutil.rmtree(partial, ignore_errors=True)
