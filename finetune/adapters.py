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
