"""Where the toolkit's SFT training time goes on CPU, and what that leaves for any speed lever.

Trains exactly what `make bench` trains as "ours" (sft_speed.run_ours: the same PubMedQA rows, LoRA r16 on
all linear layers with dropout 0.05, micro-batches of 2, the LM head over trained positions only) under
torch.profiler, and groups the aten ops' self time:

    matmul      dense matrix products (forward, and the backward to the activations, through every frozen
                layer, plus the LoRA products): the same work in TRL and here, and what fp32 cannot avoid
    attention   scaled-dot-product attention, forward and backward
    dropout     the random draws of LoRA dropout's masks (one mask per adapted module, also for q, k and v, which
                share their input); applying a packed mask (adapter.dropout_masks=packed) counts as other
    other       elementwise ops, norms, the optimizer (timed on its own too), copies

The matmul share bounds every lever that leaves the matmuls as they are (compile, fusion, allocators): with all
other ops free the training would run 1 / share times faster. The matmuls are split by their input shapes into the
dense products and LoRA's rank-r ones (a side of r), each with its FLOP/s, and the largest ops in "other" are named.
It also measures the one lever that would make the matmuls themselves cheaper, bf16 compute: dense bf16 against fp32
matmul FLOP/s on this machine.

    .venv/bin/python benchmarks/step_profile.py                      # appends its table to RESULTS.md
    .venv/bin/python benchmarks/step_profile.py --bf16               # the same with model.compute_dtype=bfloat16
    .venv/bin/python benchmarks/step_profile.py --smoke --out /tmp/p  # CI: the project's sample, 2 rows, 1 step
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import sft_speed  # noqa: E402 - beside this file

GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "attention": ("scaled_dot_product",),
    "dropout": ("aten::bernoulli", "aten::native_dropout", "aten::random_"),
}


def group_of(op: str) -> str:
    for group, names in GROUPS.items():
        if any(name in op for name in names):
            return group
    return "other"


def matmul_work(input_shapes: list[list[int]], rank: int) -> tuple[str, int]:
    """Whether a matmul op is one of LoRA's rank-r products or a dense one, and its FLOPs, from its input shapes
    (mm and bmm take the two matrices; addmm and baddbmm a bias first)."""
    a, b = [shape for shape in input_shapes if len(shape) >= 2][-2:]
    flops = 2 * b[-1] * math.prod(a)
    return ("lora" if rank in (a[-2], a[-1], b[-1]) else "dense"), flops


def profile_training(rows_file: Path, steps: int, batch_size: int, overrides: list[str]) -> tuple[dict, dict]:
    """Self CPU seconds per group over one `finetune` training run, the matmuls' seconds and FLOPs by kind, the
    largest ops in "other", the optimizer's steps, and that run's own summary."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    rank = sft_speed.LORA["r"]
    with tempfile.TemporaryDirectory() as tmp, profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        result = sft_speed.run_ours(rows_file, steps, batch_size, Path(tmp), overrides, rank)
    averages = prof.key_averages()
    seconds = dict.fromkeys([*GROUPS, "other"], 0.0)
    other = {}
    for event in averages:
        group = group_of(event.key)
        seconds[group] += event.self_cpu_time_total / 1e6
        if group == "other":
            other[event.key] = event.self_cpu_time_total / 1e6
    matmuls = {kind: {"s": 0.0, "flops": 0} for kind in ("dense", "lora")}
    for event in prof.key_averages(group_by_input_shape=True):
        if group_of(event.key) == "matmul":
            kind, flops = matmul_work(event.input_shapes, rank)
            matmuls[kind]["s"] += event.self_cpu_time_total / 1e6
            matmuls[kind]["flops"] += flops * event.count
    # The Trainer's optimizer steps, fused or not: a bound on what any other optimizer implementation could save.
    optimizer = [e for e in averages if e.key.startswith("Optimizer.step#")]
    breakdown = {
        "seconds": seconds,
        "optimizer": {
            "name": optimizer[0].key.removeprefix("Optimizer.step#").removesuffix(".step"),
            "fused": any(e.key.startswith("aten::_fused_adam") for e in averages),
            "s": round(sum(e.cpu_time_total for e in optimizer) / 1e6, 3),
        },
        "matmuls": {
            kind: {"s": round(m["s"], 3), "gflop_per_s": round(m["flops"] / m["s"] / 1e9, 1)}
            for kind, m in matmuls.items()
        },
        "largest_other": {op: round(s, 3) for op, s in sorted(other.items(), key=lambda item: -item[1])[:5]},
    }
    result["torch_threads"] = torch.get_num_threads()
    return breakdown, result


def render(report: dict) -> str:
    total = sum(report["seconds"].values())
    share = {group: s / total for group, s in report["seconds"].items()}
    d = report["data"]
    dense, lora, optimizer = report["matmuls"]["dense"], report["matmuls"]["lora"], report["optimizer"]
    lines = [
        f"## Where a training step's time goes, {report['date'][:10]}: matmuls {100 * share['matmul']:.0f}%, so no "
        f"lever outside them can exceed {1 / share['matmul']:.2f}x",
        "",
        f"`benchmarks/step_profile.py{' --bf16' if report.get('bf16') else ''}`: ours (as in `make bench`"
        f"{' with model.compute_dtype=bfloat16' if report.get('bf16') else ''}) under torch.profiler, {d['rows']} "
        "PubMedQA rows, "
        f"{d['steps']} steps of {d['batch_size']}, {report['torch_threads']} torch threads; training ran "
        f"{report['train_runtime_s']:.1f} s under the profiler.",
        "",
        "| ops | self CPU s | share |",
        "|---|---:|---:|",
        *(f"| {group} | {s:.1f} | {100 * share[group]:.1f}% |" for group, s in report["seconds"].items()),
        "",
        f"Matmuls by kind: dense {dense['s']:.1f} s at {dense['gflop_per_s']} GFLOP/s, "
        f"LoRA's rank-{report['lora_rank']} products {lora['s']:.1f} s at {lora['gflop_per_s']} GFLOP/s. "
        "Largest other ops: " + ", ".join(f"{op} {s:.1f} s" for op, s in report["largest_other"].items()) + ".",
        "",
        f"Optimizer steps ({optimizer['name']}{', fused' if optimizer['fused'] else ''}): {optimizer['s']:.2f} s, "
        f"{100 * optimizer['s'] / total:.2f}% of the time.",
        "",
        f"Dense matmul on this machine: fp32 {report['matmul_gflops']['float32']} GFLOP/s, bf16 "
        f"{report['matmul_gflops']['bfloat16']} GFLOP/s (torch CPU capability {report['cpu_capability']}).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=16, help="PubMedQA training items (default 16)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per optimizer step (default 8)")
    parser.add_argument("--smoke", action="store_true", help="CI: 2 rows of the project's sample, one step")
    parser.add_argument("--bf16", action="store_true", help="train with model.compute_dtype=bfloat16")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the JSON and table"
    )
    a = parser.parse_args()
    if a.smoke:
        a.examples, a.batch_size = 2, 2
    source = sft_speed.SHARED_PUBMEDQA
    if a.smoke or not source.is_file():
        source = sft_speed.SAMPLE_PUBMEDQA
    with tempfile.TemporaryDirectory(prefix="step-profile-") as scratch:
        # The rows are real data from ../shared: they stay out of the project.
        rows_file = Path(scratch) / "rows.jsonl"
        sft_speed.write_rows(source, a.examples, rows_file)
        n_rows = len(rows_file.read_text().splitlines())
        steps = -(-n_rows // a.batch_size)
        breakdown, run = profile_training(rows_file, steps, a.batch_size, sft_speed.BF16 if a.bf16 else [])
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "data": {"rows": n_rows, "steps": steps, "batch_size": a.batch_size},
        "bf16": a.bf16,
        "torch_threads": run["torch_threads"],
        "train_runtime_s": run["train_runtime_s"],
        "seconds": {group: round(s, 3) for group, s in breakdown["seconds"].items()},
        "matmuls": breakdown["matmuls"],
        "lora_rank": sft_speed.LORA["r"],
        "largest_other": breakdown["largest_other"],
        "optimizer": breakdown["optimizer"],
        "matmul_gflops": {
            str(dtype).removeprefix("torch."): round(sft_speed.matmul_flops(dtype=dtype) / 1e9, 1)
            for dtype in (torch.float32, torch.bfloat16)
        },
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    sft_speed.save_report(report, render(report), a.out, "profile", append=not a.smoke)


if __name__ == "__main__":
    main()
