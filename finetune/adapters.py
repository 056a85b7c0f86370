"""PEFT adapter configuration from the recipe's `adapter` section."""

from __future__ import annotations

import torch
from peft import LoraConfig
from torch import nn

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


class PackedDropout(nn.Module):
    """LoRA dropout with masks cut from 64-bit random draws, four 16-bit lanes each, every lane kept when it clears
    p (p rounded to a multiple of 1/65536). On a CPU torch's `bernoulli_` draws one random number per element in
    one thread, and PEFT draws a mask for every adapted module: a fifth of a bf16 training step. Four lanes per
    draw take a quarter of those draws; the comparison and the product run vectorised on every core."""

    def __init__(self, p: float):
        super().__init__()
        self.dropped = round(p * 2**16)
        self.scale = 2**16 / (2**16 - self.dropped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        # random_() alone leaves the sign bit 0 (and the top lane always kept); from int64's minimum it fills all 64.
        draws = torch.empty(-(-x.numel() // 4), dtype=torch.int64, device=x.device).random_(-(2**63), None)
        lanes = draws.view(torch.int16)[: x.numel()].view(x.shape)
        # where() keeps only the boolean mask for the backward pass, as torch's dropout does.
        return torch.where(lanes >= self.dropped - 2**15, x, 0) * self.scale


def pack_dropout_masks(model) -> None:
    """Put PackedDropout, with the same p, in place of PEFT's nn.Dropout in every LoRA layer."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, dropout in module.lora_dropout.items():
                if type(dropout) is nn.Dropout:
                    module.lora_dropout[name] = PackedDropout(dropout.p)
