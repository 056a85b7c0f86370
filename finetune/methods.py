"""The TRL trainer of each train.method, configured from the recipe (SFT, packed or not; DPO, KTO, ORPO), and what
the recipe asks of the machine (trackers installed, Liger on a GPU, the attention kernel packed rows use)."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from finetune import adapters, runs, tracking
from finetune import model as model_lib
from finetune.errors import FinetuneError
from finetune.recipe import ModelSection, Recipe

log = logging.getLogger(__name__)


def check(recipe: Recipe) -> None:
    """What the recipe asks of this machine, checked before anything is read or written."""
    tracking.check(recipe)
    if recipe.train.liger:
        from transformers.utils import is_liger_kernel_available

        if model_lib.device() != "cuda":
            raise FinetuneError(
                "train.liger: Liger's kernels are Triton kernels and need a CUDA GPU, which this machine does not "
                "have; remove train.liger"
            )
        if not is_liger_kernel_available():
            raise FinetuneError("train.liger: liger-kernel is not installed; pip install -e '.[liger]'")


def model_section(recipe: Recipe) -> ModelSection:
    """The model section training loads. Packed rows on CUDA use flash-attention's varlen kernel when flash_attn is
    installed and the recipe names no kernel: it attends within each packed row from the position ids, where sdpa
    builds a block-diagonal mask over the whole row."""
    section = recipe.model
    if (
        recipe.packed
        and "attn_implementation" not in section.model_fields_set
        and model_lib.device() == "cuda"
        and importlib.util.find_spec("flash_attn") is not None
    ):
        log.info("packed rows on CUDA: attention by flash_attention_2 (varlen)")
        return section.model_copy(update={"attn_implementation": "flash_attention_2"})
    return section


def common_args(recipe: Recipe, out: Path, has_eval: bool) -> dict:
    """Trainer arguments every method shares."""
    train = recipe.train
    on_cpu = model_lib.device() == "cpu"
    dtype = model_lib.compute_dtype(recipe.model)
    return dict(
        output_dir=str(runs.RunFolder(out).checkpoints),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # a float below 1 is a ratio in transformers 5
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation,
        activation_checkpointing=train.gradient_checkpointing,
        weight_decay=train.weight_decay,
        torch_compile=train.compile,
        max_grad_norm=train.max_grad_norm,
        # Non-reentrant checkpointing is the variant that works under DDP and FSDP.
        activation_checkpointing_kwargs={"use_reentrant": False} if train.gradient_checkpointing else None,
        ddp_find_unused_parameters=False,
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=train.logging_steps,
        save_steps=train.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if has_eval and train.eval_steps else "no",
        eval_steps=train.eval_steps,
        # Follow the compute dtype, not TRL's bf16 default: bf16 autocast is ~2x fp32 on CPUs with AVX512-BF16 or
        # AMX and far slower on those without (README 'Speed'), so on a CPU it is the recipe's choice.
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16 and not on_cpu,
        use_cpu=on_cpu,
        max_length=recipe.data.max_length,
        report_to=list(train.report_to) or "none",
        use_liger_kernel=train.liger,
        run_name=tracking.run_name(out),
        project=recipe.name,  # trackio's project
        logging_first_step=True,
        # The default filter logs a NaN loss as 0, which would hide exactly what the guard looks for.
        logging_nan_inf_filter=False,
        disable_tqdm=False,
    )


def trainer_inputs(model, tokenizer, data, peft_config, callbacks) -> dict:
    """What every TRL trainer is given besides its config."""
    return dict(
        model=model,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )


def sft_trainer(recipe: Recipe, model, tokenizer, data, peft_config, callbacks, out: Path):
    """SFT on rows tokenized by data.build (labels on assistant tokens, or on every token of raw text). Packed rows
    go through TRL's own preparation, which packs them, and its padding-free collator, which restarts the position
    ids per row and masks the label of each row's first token; unpacked rows are batched by the toolkit."""
    from trl import SFTConfig

    from finetune.batching import LeftPaddingCollator
    from finetune.trainers import EpochSeededSFTTrainer, TrainedPositionsSFTTrainer

    inputs = trainer_inputs(model, tokenizer, data, peft_config, callbacks)
    common = common_args(recipe, out, data.eval is not None)
    if recipe.packed:
        args = SFTConfig(
            **common,
            packing=True,
            # A document longer than a pack is split across packs; a conversation never is (build drops it).
            packing_strategy="bfd_split" if recipe.raw_text else "bfd",
            train_sampling_strategy="random",  # packs are all about max_length long: nothing to group
            remove_unused_columns=False,  # the collator reads each pack's seq_lengths
        )
        return EpochSeededSFTTrainer(args=args, **inputs)
    args = SFTConfig(
        **common,
        train_sampling_strategy="group_by_length" if recipe.train.group_by_length else "random",
        # Rows arrive tokenized with assistant-only labels from data.build.
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
    )
    trainer_class, collator = EpochSeededSFTTrainer, None
    if model_lib.device() == "cpu":
        # TRL's fused LM head scores every position where Triton does not run: project only the trained ones.
        trainer_class, collator = TrainedPositionsSFTTrainer, LeftPaddingCollator(tokenizer.pad_token_id)
    return trainer_class(args=args, data_collator=collator, **inputs)


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
    return DPOTrainer(args=args, **trainer_inputs(model, tokenizer, data, peft_config, callbacks))


def kto_trainer(recipe: Recipe, model, tokenizer, data, peft_config, callbacks, out: Path):
    """KTO on unpaired rows. The reference is the base with the adapter disabled, or, when continuing an adapter, TRL's
    frozen copy of it. Its KL term compares each answer with another row's prompt in the same batch, so TRL samples
    the rows in order: data.build has shuffled them by seed."""
    from trl import KTOConfig, KTOTrainer

    args = KTOConfig(
        **common_args(recipe, out, data.eval is not None),
        beta=recipe.kto.beta,
        desirable_weight=recipe.kto.desirable_weight,
        undesirable_weight=recipe.kto.undesirable_weight,
        loss_type=recipe.kto.loss_type,
        precompute_ref_log_probs=recipe.kto.precompute_ref_log_probs,
    )
    return KTOTrainer(args=args, **trainer_inputs(model, tokenizer, data, peft_config, callbacks))


def orpo_trainer(recipe: Recipe, model, tokenizer, data, peft_config, callbacks, out: Path):
    """ORPO on preference pairs: the chosen answer's NLL plus an odds-ratio term against the rejected one; no
    reference model, so one copy of the weights and one forward pass per answer."""
    # ORPO lives in trl.experimental, which warns on import that its API may change; the version is pinned.
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = ORPOConfig(**common_args(recipe, out, data.eval is not None), beta=recipe.orpo.beta)
    return ORPOTrainer(args=args, **trainer_inputs(model, tokenizer, data, peft_config, callbacks))


TRAINERS = {"sft": sft_trainer, "dpo": dpo_trainer, "kto": kto_trainer, "orpo": orpo_trainer}


def trainer(recipe: Recipe, model, tokenizer, data, peft_config, callbacks, out: Path):
    """The recipe's trainer, ready to train."""
    built = TRAINERS[recipe.train.method](recipe, model, tokenizer, data, peft_config, callbacks, out)
    if recipe.adapter.loraplus_lr_ratio is not None:
        # Only SFTTrainer takes optimizer_cls_and_kwargs as an argument; every Trainer reads the attribute when it
        # builds the optimizer, after TRL has wrapped the PEFT model.
        built.optimizer_cls_and_kwargs = adapters.loraplus_optimizer(recipe.adapter, built.args)
    return built
