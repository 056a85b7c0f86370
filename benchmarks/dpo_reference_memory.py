"""Peak memory of DPO with the reference as 'adapter disabled' (what finetune does) vs an explicit reference copy.

Each variant runs in its own process (peak RSS is per process), on the embedded model, with the
medical recipe's preference pairs, for a few steps.

    .venv/bin/python benchmarks/dpo_reference_memory.py [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time


def one(variant: str, steps: int) -> dict:
    import torch
    from peft import get_peft_model
    from trl import DPOConfig, DPOTrainer

    from finetune import adapters
    from finetune import model as model_lib
    from finetune import recipe as recipe_lib
    from finetune.data.build import build_preferences

    recipe = recipe_lib.load("medical-dpo", [f"train.max_steps={steps}", "train.init_from=null"])
    model, tokenizer = model_lib.load(recipe.model)
    data = build_preferences(recipe, tokenizer)
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps,
        per_device_train_batch_size=2,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        report_to="none",
        max_length=recipe.data.max_length,
        save_strategy="no",
        disable_tqdm=True,
    )
    if variant == "adapter-disabled":
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=data.train,
            processing_class=tokenizer,
            peft_config=adapters.peft_config(recipe.adapter),
        )
    else:
        reference, _ = model_lib.load(recipe.model, for_training=False)
        trainer = DPOTrainer(
            model=get_peft_model(model, adapters.peft_config(recipe.adapter)),
            ref_model=reference,
            args=args,
            train_dataset=data.train,
            processing_class=tokenizer,
        )
    started = time.time()
    trainer.train()
    return {
        "variant": variant,
        "steps": steps,
        "seconds_per_step": round((time.time() - started) / steps, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variant", choices=("adapter-disabled", "explicit-copy"))
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(one(args.variant, args.steps)))
        return
    rows = []
    for variant in ("adapter-disabled", "explicit-copy"):
        done = subprocess.run(
            [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("| reference | peak RSS (MB) | s/step |\n|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['peak_rss_mb']} | {row['seconds_per_step']} |")


if __name__ == "__main__":
    main()
