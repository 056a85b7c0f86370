"""PEFT adapter configuration from the recipe's `adapter` section."""

from __future__ import annotations

from peft import LoraConfig

from finetune.recipe import AdapterSection

INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


def peft_config(section: AdapterSection) -> LoraConfig:
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=section.target_modules,
        use_dora=section.type == "dora",
        use_rslora=section.type == "rslora",
        init_lora_weights=INIT[section.init],
        modules_to_save=section.modules_to_save or None,
    )


def loraplus_optimizer(section: AdapterSection, args) -> tuple:
    """The (factory, kwargs) pair a Trainer builds its optimizer from (its `optimizer_cls_and_kwargs`), for LoRA+:
    PEFT's parameter groups around the optimizer the training arguments name (AdamW, fused where it runs), B matrices
    at learning_rate x adapter.loraplus_lr_ratio. The Trainer calls it with the PEFT-wrapped model, where the lora_B
    names are, and a resumed run restores the groups' state from the checkpoint like any optimizer's."""
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)

    def build(model, lr: float, **optimizer_kwargs):
        return create_loraplus_optimizer(
            model,
            optimizer_cls,
            lr=lr,
            loraplus_lr_ratio=section.loraplus_lr_ratio,
            # PEFT's own default is no decay at all; train.weight_decay applies as it does without LoRA+.
            loraplus_weight_decay=args.weight_decay,
            **optimizer_kwargs,
        )

    return (lambda: build), kwargs
