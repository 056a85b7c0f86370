"""The baselines: LoRA SFT written with TRL's SFTTrainer, as its documentation shows it and as a knowledgeable user
would tune it for a CPU.

SFTTrainer + LoraConfig on a conversational dataset, `assistant_only_loss` with a chat template that
marks the assistant turns, and TRL's defaults for everything else (padding per batch, no packing,
gradient checkpointing on, linear schedule). On a CPU, `use_cpu=True` (without it TRL's bf16 default refuses to
start) and `bf16=False`, the float32 the toolkit trains in by default: bf16 autocast is ~2x fp32 on CPUs with
AVX512-BF16 or AMX and far slower on those without. `--bf16` turns it back on; on a GPU it stays bf16.

--tuned sets what any TRL user can set: no gradient checkpointing (memory is not the limit here), micro-batches
of 2 with gradient accumulation to the same rows per optimizer step, and length-grouped sampling (transformers 5:
`train_sampling_strategy="group_by_length"`), so little compute goes to padding.

Under torchrun (DDP) each process takes its share of a step's micro-batches: the same rows per optimizer step.

    python benchmarks/baseline_trl.py MODEL_DIR ROWS.jsonl CHAT_TEMPLATE OUT_DIR [--steps 4 --batch-size 8] [--tuned]
        [--bf16] [--attn-implementation eager]
"""

from __future__ import annotations

import argparse
import os

import torch
from datasets import load_dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer


def train(
    model_dir: str,
    rows: str,
    chat_template: str,
    output_dir: str,
    steps: int,
    batch_size: int,
    learning_rate: float,
    r: int,
    alpha: int,
    dropout: float,
    seed: int = 42,
    checkpointing: bool = True,
    micro_batch: int | None = None,
    group_by_length: bool = False,
    max_length: int = 1024,
    bf16: bool | None = None,
    attn_implementation: str | None = None,
    callbacks: list | None = None,
) -> SFTTrainer:
    """Train and return the trainer; the defaults are TRL's (checkpointing on, the whole batch per forward pass)."""
    dataset = load_dataset("json", data_files=rows, split="train")
    micro = min(micro_batch or batch_size, batch_size)
    settings = dict(
        output_dir=output_dir,
        max_steps=steps,
        max_length=max_length,  # TRL's default is 1024; longer rows are truncated, so callers pass their longest
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=max(1, batch_size // (micro * int(os.environ.get("WORLD_SIZE", "1")))),
        learning_rate=learning_rate,
        seed=seed,
        assistant_only_loss=True,
        chat_template_path=chat_template,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported() if bf16 is None else bf16,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
    )
    if not checkpointing:  # TRL's default is on; only an explicit False turns it off
        settings["activation_checkpointing"] = False
    if group_by_length:
        settings["train_sampling_strategy"] = "group_by_length"
    if attn_implementation:
        settings["model_init_kwargs"] = {"attn_implementation": attn_implementation}
    args = SFTConfig(**settings)
    peft_config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(
        model=model_dir, args=args, train_dataset=dataset, peft_config=peft_config, callbacks=callbacks
    )
    trainer.train()
    return trainer


# What a knowledgeable user sets for a CPU (see the module docstring).
TUNED = {"checkpointing": False, "micro_batch": 2, "group_by_length": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("model_dir", "rows", "chat_template", "output_dir"):
        parser.add_argument(name)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("-r", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=32)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--tuned", action="store_true", help="no checkpointing, micro-batches of 2, length grouping")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on a CPU too")
    parser.add_argument("--attn-implementation", help="transformers' attention kernel (default: its sdpa)")
    a = parser.parse_args()
    train(
        a.model_dir,
        a.rows,
        a.chat_template,
        a.output_dir,
        a.steps,
        a.batch_size,
        a.learning_rate,
        a.r,
        a.alpha,
        a.dropout,
        **(TUNED if a.tuned else {}),
        bf16=True if a.bf16 else None,
        attn_implementation=a.attn_implementation,
    )


if __name__ == "__main__":
    main()
