"""The baseline: LoRA SFT written the way TRL's documentation shows it, with nothing tuned.

SFTTrainer + LoraConfig on a conversational dataset, `assistant_only_loss` with a chat template that
marks the assistant turns, and TRL's defaults for everything else (padding per batch, no packing,
gradient checkpointing on, linear schedule). The one change CPU forces: `use_cpu=True, bf16=False`,
because TRL's bf16 default refuses to start on a CPU (and bf16 runs ~17x slower there).

    python benchmarks/baseline_trl.py MODEL_DIR ROWS.jsonl CHAT_TEMPLATE OUT_DIR [--steps 4 --batch-size 8]
"""

from __future__ import annotations

import argparse

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
) -> SFTTrainer:
    dataset = load_dataset("json", data_files=rows, split="train")
    args = SFTConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        assistant_only_loss=True,
        chat_template_path=chat_template,
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
    )
    peft_config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(model=model_dir, args=args, train_dataset=dataset, peft_config=peft_config)
    trainer.train()
    return trainer


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
    )


if __name__ == "__main__":
    main()
