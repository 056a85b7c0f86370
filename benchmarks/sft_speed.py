"""SFT speed and memory: the toolkit with its defaults against a plain TRL + PEFT baseline, in one run.

Both train the same LoRA (r16, alpha 32, all-linear) on the same model (the embedded SmolLM2-135M on
CPU) over the same rows of real PubMedQA (PQA-L from ../shared/data, first N training items, our
rendering), one epoch, the same batch size, learning rate and schedule. Each variant runs in its own
process (peak RSS is per process) and the variants are interleaved across repeats, so a noisy
neighbour hurts them alike.

Variants:
    baseline         benchmarks/baseline_trl.py: SFTTrainer as TRL's docs show it (gradient checkpointing
                     on, padding per batch, LM head over every position)
    baseline-tuned   the same, set up as a knowledgeable user would for a CPU (--tuned): no checkpointing,
                     micro-batches of 2 with gradient accumulation, length-grouped sampling
    baseline-tuned-bf16  the tuned baseline with TRL's bf16 autocast (--tuned --bf16)
    baseline-tuned-eager  the tuned baseline with eager attention (--attn-implementation eager)
    baseline-tuned-eager-bf16  the same in bf16
    baseline-tuned-ddp2  the tuned baseline in two processes of one thread each (torchrun, DDP over gloo), as
                     ours-ddp2 below
    ours             `finetune.train.run` with the recipe defaults and the same rows per optimizer step, fed
                     as micro-batches of 2 with gradient accumulation (the gradients equal one batch of 8's:
                     the loss is normalised by the tokens of the whole step, tests/test_sft_trainer.py)
    ours-checkpointing  ours with train.gradient_checkpointing=true: what memory would cost in speed
    ours-bf16        lever: ours with model.compute_dtype=bfloat16 (autocast over float32 adapter weights); fast only
                     on CPUs with AVX512-BF16 or AMX, and a TRL user can turn it on too, so its "vs tuned" is to
                     baseline-tuned-bf16 when that runs
    ours-eager       lever: ours with model.attn_implementation=eager (attention as plain matmuls instead of sdpa's
                     CPU flash kernel), in float32
    ours-eager-bf16  lever: ours-bf16 with model.attn_implementation=eager (matmul attention instead of sdpa's CPU
                     flash kernel); scaling.py --pair ours-bf16,ours-eager-bf16 measures it against row length
    ours-compile     lever: ours with train.compile=true (torch.compile, inductor's C++ kernels on CPU)
    ours-jemalloc    lever: ours with jemalloc as the memory allocator (LD_PRELOAD, Debian's libjemalloc2)
    ours-micro1      lever: micro-batches of 1 (no padding, no attention mask) with the same rows per step
    ours-ddp2        lever: two processes of one thread each instead of one of two threads (torchrun, DDP over gloo:
                     `finetune run --distributed ddp` on a CPU), splitting each step's micro-batches; its peak RSS is
                     the sum of both processes', its padding that of the main process's rows
    ours-torch-dropout  the lever off: ours with adapter.dropout_masks=torch (PEFT's nn.Dropout, one serial random
                     draw per element) instead of the default packed masks; ours-torch-dropout-bf16 the same in bf16
    trl-no-checkpointing, ours-batch8, ours-batch8-torch-dropout  the README's one-change-at-a-time breakdown:
                     TRL and the toolkit with the step's rows in one pass (the latter with PEFT's dropout masks)
    ours-dropout0    not the same training: LoRA without dropout, what LoRA dropout's masks cost on CPU
    ours-packing     not the same steps: train.packing=true, the rows packed padding-free into sequences of the medical
                     recipe's data.max_length, one epoch of as many steps as their packs make (8 packs a step)
    ours-nf4/-int8   the memory section: the same run with a quantized base (fewer steps)

Measured per run: effective tokens/s (tokens that count in the loss, per second of training), real
(non-padding) tokens/s, padding fraction, peak RSS, per-step losses, the seconds each step after the first took
(from the time its loss was logged: what a one-time cost like compiling leaves out); and once per run, the machine's
dense matmul FLOP/s in fp32 (and bf16 when a bf16 variant runs), for the utilization column: each variant
against its own matmul dtype's rate (see `model_flops` for what is counted).

    make bench                                    # full run: JSON + table in benchmarks/results/, appended to
    RESULTS.md
    .venv/bin/python benchmarks/sft_speed.py --smoke --out /tmp/bench   # what CI runs: 2 steps, the project's sample
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import baseline_trl  # noqa: E402 - beside this file

SHARED_PUBMEDQA = ROOT.parent / "shared" / "data" / "medical" / "pubmedqa" / "ori_pqal.json"
SAMPLE_PUBMEDQA = ROOT / "datasets" / "medical" / "pubmedqa" / "ori_pqal.json"
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LEARNING_RATE = 1e-4
# On CPU, small micro-batches waste less on padding and keep activations small; a bigger one buys no speed.
MICRO_BATCH = 2
# Room for scaling.py's longest rows in both: TRL truncates rows beyond its max_length, the toolkit refuses them.
MAX_LENGTH = 2048
# The bf16 lever (ours-bf16, step_profile.py --bf16): autocast over float32 adapter weights on a CPU.
BF16 = ["model.compute_dtype=bfloat16"]
# The packing lever packs into the medical recipe's data.max_length (the rows fit in it, the longest 631 tokens).
PACK_LENGTH = 768
# The data-parallel lever: torchrun gives each of its processes one thread (OMP_NUM_THREADS=1).
DDP = {"ours-ddp2": 2, "baseline-tuned-ddp2": 2}


# ---------------------------------------------------------------- workers (each in its own process)


def embedded_dir() -> str:
    from finetune import model as model_lib
    from finetune import recipe as recipe_lib

    return model_lib.resolve(recipe_lib.ModelSection())[0]


def token_counts(rows_file: Path) -> tuple[int, int, list[int]]:
    """Tokens that count in the loss (assistant turns), real tokens, and each row's length (training template)."""
    from finetune import model as model_lib
    from finetune import recipe as recipe_lib
    from finetune.data.build import IGNORE, tokenize

    tokenizer = model_lib.load_tokenizer(embedded_dir(), recipe_lib.ModelSection())
    rows = [tokenize(tokenizer, json.loads(line)["messages"]) for line in rows_file.read_text().splitlines()]
    trained = sum(label != IGNORE for row in rows for label in row["labels"])
    return trained, sum(len(row["input_ids"]) for row in rows), [len(row["input_ids"]) for row in rows]


BASELINES = {
    "baseline": {},
    "baseline-tuned": baseline_trl.TUNED,
    "baseline-tuned-bf16": {**baseline_trl.TUNED, "bf16": True},
    "baseline-tuned-eager": {**baseline_trl.TUNED, "attn_implementation": "eager"},
    "baseline-tuned-eager-bf16": {**baseline_trl.TUNED, "bf16": True, "attn_implementation": "eager"},
    "baseline-tuned-ddp2": baseline_trl.TUNED,  # the processes are spawn()'s
    "trl-no-checkpointing": {"checkpointing": False},  # the step breakdown's first row
}


def step_seconds(stamps: list[float]) -> list[float]:
    """Seconds from one logged loss to the next: every step's time but the first's, whose start is not logged."""
    return [round(later - earlier, 3) for earlier, later in zip(stamps, stamps[1:])]


def run_baseline(rows_file: Path, steps: int, batch_size: int, work: Path, variant: str, rank: int) -> dict:
    from finetune import distributed, runs
    from finetune import model as model_lib
    from finetune.train import MetricsLog, padding_fraction

    model_dir = embedded_dir()
    template = work / "chatml.jinja"
    template.write_text(model_lib.training_chat_template(None, "chatml"))
    # The toolkit's own log, so TRL's steps are timed exactly as the toolkit's are.
    folder = runs.RunFolder(work)
    trainer = baseline_trl.train(
        model_dir,
        str(rows_file),
        str(template),
        str(work / "baseline"),
        steps,
        batch_size,
        LEARNING_RATE,
        rank,
        2 * rank,
        LORA["dropout"],
        max_length=MAX_LENGTH,
        callbacks=[MetricsLog(folder)],
        **BASELINES[variant],
    )
    if not distributed.is_main():
        return {}
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    runtime = next(r["train_runtime"] for r in trainer.state.log_history if "train_runtime" in r)
    return {
        "train_runtime_s": runtime,
        "losses": losses,
        "step_s": step_seconds([r["time"] for r in runs.read_metrics(folder.metrics) if "loss" in r]),
        "padding_fraction": padding_fraction(trainer),
    }


def run_ours(rows_file: Path, steps: int, batch_size: int, work: Path, overrides: list[str], rank: int) -> dict:
    from finetune import distributed, runs, train
    from finetune import recipe as recipe_lib

    # Under torchrun each process takes its share of a step's micro-batches: the same rows per step in all variants.
    micro_batches = max(1, batch_size // (MICRO_BATCH * distributed.world_size()))
    recipe = recipe_lib.load(
        "medical",
        [
            f"data.sources=[{{path: {rows_file}, reader: messages}}]",
            "data.system_prompt=null",
            f"data.max_length={MAX_LENGTH}",
            "data.eval_fraction=0",
            f"adapter.r={rank}",
            f"adapter.alpha={2 * rank}",
            f"adapter.dropout={LORA['dropout']}",
            "adapter.target_modules=all-linear",
            f"train.max_steps={steps}",
            f"train.batch_size={min(MICRO_BATCH, batch_size)}",
            f"train.gradient_accumulation={micro_batches}",
            f"train.learning_rate={LEARNING_RATE}",
            "train.lr_scheduler=linear",
            "train.warmup_ratio=0",
            "train.save_steps=100000",
            f"train.output_dir={work / 'ours'}",
            "eval.suite=null",
            "export.merge=false",
            "export.gguf=null",
            *overrides,
        ],
    )
    out = train.run(recipe)
    if not distributed.is_main():  # only the main process writes the run folder
        return {}
    summary = json.loads((out / "run.json").read_text())
    logged = [r for r in runs.read_metrics(out / "metrics.jsonl") if "loss" in r]
    return {
        "train_runtime_s": summary["train_runtime_s"],
        "losses": [r["loss"] for r in logged],
        "step_s": step_seconds([r["time"] for r in logged]),
        "padding_fraction": summary["padding_fraction"],
    }


def ours_overrides(variant: str, batch_size: int) -> list[str]:
    """The recipe overrides that make a toolkit variant."""
    one_pass = [f"train.batch_size={batch_size}", "train.gradient_accumulation=1"]
    return {
        "ours": [],
        "ours-jemalloc": [],  # the allocator is set by spawn()
        "ours-checkpointing": ["train.gradient_checkpointing=true"],
        "ours-torch-dropout": ["adapter.dropout_masks=torch"],
        "ours-bf16": BF16,
        "ours-torch-dropout-bf16": [*BF16, "adapter.dropout_masks=torch"],
        "ours-eager": ["model.attn_implementation=eager"],
        "ours-eager-bf16": [*BF16, "model.attn_implementation=eager"],
        "ours-batch8": one_pass,
        "ours-batch8-torch-dropout": [*one_pass, "adapter.dropout_masks=torch"],
        "ours-compile": ["train.compile=true"],
        "ours-micro1": ["train.batch_size=1", f"train.gradient_accumulation={batch_size}"],
        "ours-ddp2": [],  # the processes are spawn()'s
        "ours-dropout0": ["adapter.dropout=0"],
        # One epoch: the same rows as every variant, each trained once, in fewer steps of 8 packs.
        "ours-packing": [
            "train.packing=true",
            f"data.max_length={PACK_LENGTH}",
            "train.max_steps=null",
            "train.epochs=1",
        ],
        "ours-nf4": ["model.quantization=nf4"],
        "ours-int8": ["model.quantization=int8"],
    }[variant]


def worker(variant: str, rows_file: Path, steps: int, batch_size: int, rank: int, work: Path) -> None:
    """Train one variant in the folder `work` and print its measurements (under torchrun, each process its peak RSS)
    as one JSON line."""
    import logging

    from finetune.cli import _quiet_libraries

    _quiet_libraries()
    logging.disable(logging.WARNING)
    if variant in BASELINES:
        result = run_baseline(rows_file, steps, batch_size, work, variant, rank)
    else:
        result = run_ours(rows_file, steps, batch_size, work, ours_overrides(variant, batch_size), rank)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- the driver


def write_rows(source: Path, n: int, target: Path) -> None:
    """The first n PubMedQA training items as chat rows, rendered by the toolkit's reader (both variants read it)."""
    from finetune import recipe as recipe_lib
    from finetune.data.build import read_source
    from finetune.data.formats import to_sft

    system = recipe_lib.load("medical", []).data.system_prompt
    section = recipe_lib.SourceSection(path=str(source), reader="pubmedqa", split="train")
    reader, rows, _ = read_source(section, "error", seed=0)
    target.write_text("".join(json.dumps(to_sft(row, reader.kind, system)) + "\n" for row in rows[:n]))


def matmul_flops(seconds: float = 3.0, size: int = 1024, dtype=None) -> float:
    """Dense matmul FLOP/s of this machine with torch's default threads (fp32 unless told): the ceiling for
    utilization."""
    import torch

    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        done += 1
    return 2 * size**3 * done / (time.perf_counter() - started)


def matmul_dtype(variant: str) -> str:
    """The dtype of a variant's matmuls, read from its settings (not its name), for its utilization."""
    bf16 = BASELINES[variant].get("bf16") if variant in BASELINES else BF16[0] in ours_overrides(variant, 1)
    return "bfloat16" if bf16 else "float32"


def matmul_peaks(dtypes: set[str]) -> dict[str, float]:
    import torch

    return {name: matmul_flops(dtype=getattr(torch, name)) for name in sorted(dtypes)}


def model_flops(trained: int, real: int, rows: list[int]) -> float:
    """Useful training FLOPs with a frozen base: 4 x frozen matmul parameters per real token (forward, and the
    backward to the activations; frozen weights get no weight gradient), 6 x LoRA parameters per token, causal
    attention 6 x layers x hidden x s^2 per row of length s (forward half of 4 s^2 d, backward twice that), and the
    LM head only where a token is trained (4 x its parameters); recomputation for checkpointing is not useful work."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(embedded_dir())
    d, layers, ff = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = config.num_key_value_heads * d // config.num_attention_heads
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * ff  # q, o, k, v, gate, up, down
    lora_per_layer = LORA["r"] * ((d + d) * 2 + (d + kv) * 2 + (d + ff) * 3)
    head = d * config.vocab_size
    attention = sum(6 * layers * d * s * s for s in rows) / 2
    return real * (4 * layers * per_layer + 6 * layers * lora_per_layer) + attention + trained * 4 * head


JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")


def spawn(variant: str, rows_file: Path, steps: int, batch_size: int, rank: int = LORA["r"]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if variant == "ours-jemalloc":
        if not JEMALLOC.is_file():
            raise SystemExit(f"ours-jemalloc needs {JEMALLOC}: apt-get install libjemalloc2")
        env["LD_PRELOAD"] = str(JEMALLOC)
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(DDP[variant])] if variant in DDP else []
    )
    with tempfile.TemporaryDirectory() as work:
        done = subprocess.run(
            [
                sys.executable,
                *launcher,
                __file__,
                "--worker",
                variant,
                "--rows",
                str(rows_file),
                "--steps",
                str(steps),
                "--batch-size",
                str(batch_size),
                "--rank",
                str(rank),
                "--work",
                work,
            ],
            env=env,
            capture_output=True,
            text=True,
        )
    processes = [
        json.loads(line.removeprefix("RESULT ")) for line in done.stdout.splitlines() if line.startswith("RESULT ")
    ]
    if done.returncode != 0 or len(processes) != DDP.get(variant, 1):
        raise SystemExit(f"{variant} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    (result,) = (p for p in processes if "losses" in p)
    return {**result, "peak_rss_mb": round(sum(p["peak_rss_mb"] for p in processes), 1)}


def machine() -> dict:
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    ram = next(
        (
            int(line.split()[1]) // 2**20
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        None,
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": ram,
        "torch_threads": torch.get_num_threads(),
        "device": "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
    }


def summarize(variant: str, runs: list[dict], trained: int, real: int, flops: float, peak_flops: float) -> dict:
    runtime = statistics.median(r["train_runtime_s"] for r in runs)
    return {
        "variant": variant,
        "repeats": len(runs),
        "train_runtime_s": [r["train_runtime_s"] for r in runs],
        "effective_tokens_per_s": round(trained / runtime, 2),
        "real_tokens_per_s": round(real / runtime, 1),
        "padding_fraction": runs[0]["padding_fraction"],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "mean_loss": round(statistics.mean(runs[0]["losses"]), 4),
        "final_loss": round(runs[0]["losses"][-1], 4),
        "losses": runs[0]["losses"],
        "step_s": [r["step_s"] for r in runs],
        "utilization_pct": round(100 * flops / runtime / peak_flops, 1),
    }


def mean_step_s(result: dict) -> float | None:
    """Mean seconds of a variant's steps after the first, over every repeat; None when no step was timed."""
    seconds = [step for repeat in result["step_s"] for step in repeat]
    return statistics.mean(seconds) if seconds else None


def table(results: list[dict], baseline: dict, tuned: dict | None = None, tuned_bf16: dict | None = None) -> str:
    tuned = tuned or baseline
    lines = [
        "| variant | effective tok/s | real tok/s | vs baseline | vs tuned | padding | peak RSS MB | mean loss | "
        "final loss | FLOP util | s per step after the first |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = r["effective_tokens_per_s"] / baseline["effective_tokens_per_s"]
        same_dtype = tuned_bf16 if tuned_bf16 and matmul_dtype(r["variant"]) == "bfloat16" else tuned
        versus_tuned = r["effective_tokens_per_s"] / same_dtype["effective_tokens_per_s"]
        per_step = mean_step_s(r)
        lines.append(
            f"| {r['variant']} | {r['effective_tokens_per_s']} | {r['real_tokens_per_s']} | {ratio:.2f}x | "
            f"{versus_tuned:.2f}x | "
            f"{r['padding_fraction']:.1%} | {r['peak_rss_mb']:.0f} | {r['mean_loss']} | {r['final_loss']} | "
            f"{r['utilization_pct']}% | {'-' if per_step is None else f'{per_step:.2f}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=32, help="PubMedQA training items, one epoch (default 32)")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="rows per optimizer step: TRL's default per-device batch (default 8)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of baseline and ours (default 2)")
    parser.add_argument(
        "--memory-steps", type=int, default=2, help="steps for the nf4 / int8 memory runs; 0 skips them"
    )
    parser.add_argument(
        "--variants",
        default="baseline,baseline-tuned,ours,ours-checkpointing,ours-compile,ours-jemalloc",
        help="comma-separated speed variants (ratios are to baseline and, when run, baseline-tuned)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="CI: 4 rows of the project's sample, 2 steps, one repeat, no memory runs"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the JSON and table"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=LORA["r"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        worker(a.worker, a.rows, a.steps, a.batch_size, a.rank, a.work)
        return
    if a.smoke:
        a.examples, a.batch_size, a.repeats, a.memory_steps = 4, 2, 1, 0
    source = SAMPLE_PUBMEDQA if a.smoke or not SHARED_PUBMEDQA.is_file() else SHARED_PUBMEDQA
    a.out.mkdir(parents=True, exist_ok=True)
    # The rows are real data from ../shared: they stay out of the project.
    scratch = Path(tempfile.mkdtemp(prefix="sft-bench-"))
    rows_file = scratch / "rows.jsonl"
    write_rows(source, a.examples, rows_file)
    n_rows = len(rows_file.read_text().splitlines())
    steps = -(-n_rows // a.batch_size)
    trained, real, lengths = token_counts(rows_file)
    flops = model_flops(trained, real, lengths)

    speed_variants = ["baseline", "baseline-tuned", "ours"] if a.smoke else a.variants.split(",")
    dtypes = {matmul_dtype(v) for v in speed_variants} | {"float32"}
    peaks_before = matmul_peaks(dtypes)
    runs: dict[str, list[dict]] = {v: [] for v in speed_variants}
    for repeat in range(a.repeats):
        order = speed_variants if repeat % 2 == 0 else speed_variants[::-1]
        for variant in order:
            print(f"repeat {repeat + 1}/{a.repeats}: {variant}", file=sys.stderr, flush=True)
            runs[variant].append(spawn(variant, rows_file, steps, a.batch_size))
    peaks = {name: max(rate, matmul_peaks({name})[name]) for name, rate in peaks_before.items()}
    peak = peaks["float32"]
    results = [summarize(v, runs[v], trained, real, flops, peaks[matmul_dtype(v)]) for v in speed_variants]

    memory = []
    if a.memory_steps:
        memory_rows = scratch / "rows-memory.jsonl"
        memory_rows.write_text(
            "".join(rows_file.read_text().splitlines(keepends=True)[: a.memory_steps * a.batch_size])
        )
        m_trained, m_real, m_lengths = token_counts(memory_rows)
        for variant in ("ours", "ours-nf4", "ours-int8"):
            print(f"memory: {variant}", file=sys.stderr, flush=True)
            result = spawn(variant, memory_rows, a.memory_steps, a.batch_size)
            memory.append(
                summarize(variant, [result], m_trained, m_real, model_flops(m_trained, m_real, m_lengths), peak)
            )

    by_name = {r["variant"]: r for r in results}
    # Ratios are to TRL's defaults and to the tuned TRL; a run without them (the step breakdown) uses its first variant.
    baseline, ours = by_name.get("baseline", results[0]), by_name.get("ours", results[-1])
    tuned = by_name.get("baseline-tuned", baseline)
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "data": {
            "source": str(source.relative_to(ROOT.parent) if source.is_relative_to(ROOT.parent) else source),
            "rows": n_rows,
            "steps": steps,
            "batch_size": a.batch_size,
            "trained_tokens": trained,
            "real_tokens": real,
        },
        "matmul_gflops": round(peak / 1e9, 1),
        **({"matmul_gflops_bf16": round(peaks["bfloat16"] / 1e9, 1)} if "bfloat16" in peaks else {}),
        "speedup": round(ours["effective_tokens_per_s"] / baseline["effective_tokens_per_s"], 2),
        "memory_ratio": round(ours["peak_rss_mb"] / baseline["peak_rss_mb"], 2),
        "speedup_vs_tuned": round(ours["effective_tokens_per_s"] / tuned["effective_tokens_per_s"], 2),
        "memory_ratio_vs_tuned": round(ours["peak_rss_mb"] / tuned["peak_rss_mb"], 2),
        **(
            {
                "speedup_vs_tuned_bf16": round(
                    by_name["ours-bf16"]["effective_tokens_per_s"]
                    / by_name["baseline-tuned-bf16"]["effective_tokens_per_s"],
                    2,
                )
            }
            if {"ours-bf16", "baseline-tuned-bf16"} <= set(by_name)
            else {}
        ),
        "results": results,
        "memory": memory,
    }
    shutil.rmtree(scratch, ignore_errors=True)
    save_report(report, render(report), a.out, "sft", append=not a.smoke)


def save_report(report: dict, markdown: str, out: Path, kind: str, append: bool) -> None:
    """Write out/KIND-DATE.json and .md, print the table, and append it to RESULTS.md when asked."""
    stamp = report["date"].replace(":", "")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{kind}-{stamp}.json").write_text(json.dumps(report, indent=2))
    (out / f"{kind}-{stamp}.md").write_text(markdown)
    print(markdown)
    if append:
        with (ROOT / "benchmarks" / "RESULTS.md").open("a") as f:
            f.write("\n" + markdown)


def render(report: dict) -> str:
    m, d = report["machine"], report["data"]
    by_name = {r["variant"]: r for r in report["results"]}
    if "baseline-tuned" in by_name:
        defaults = f"{report['speedup']}x TRL's defaults" if "baseline" in by_name else "TRL's defaults not run"
        title = (
            f"SFT speed, {report['date'][:10]}: ours {report['speedup_vs_tuned']}x a tuned TRL's effective tokens/s "
            f"({defaults}), {report['memory_ratio_vs_tuned']}x its peak RSS"
        )
        if "speedup_vs_tuned_bf16" in report:
            title += f"; in bf16, {report['speedup_vs_tuned_bf16']}x the tuned TRL in bf16"
    elif "baseline" in by_name:
        title = f"SFT speed, {report['date'][:10]}: ours {report['speedup']}x TRL's defaults' effective tokens/s"
    else:  # a run of the toolkit's own variants: the ratio columns are to its first variant
        first = report["results"][0]["variant"]
        title = f"SFT variants, {report['date'][:10]}: {', '.join(by_name)} (ratios to {first})"
    text = [
        f"## {title}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), {m['ram_gb']} GB RAM, "
        f"{m['device']}; "
        f"dense fp32 matmul {report['matmul_gflops']} GFLOP/s"
        + (f", bf16 {report['matmul_gflops_bf16']} GFLOP/s" if "matmul_gflops_bf16" in report else "")
        + f". Data: {d['source']}, {d['rows']} rows, {d['steps']} steps of batch {d['batch_size']}, "
        f"{d['real_tokens']} real tokens of which {d['trained_tokens']} count in the loss.",
        "",
        table(
            report["results"],
            by_name.get("baseline", report["results"][0]),
            by_name.get("baseline-tuned"),
            by_name.get("baseline-tuned-bf16"),
        ),
    ]
    if "matmul_gflops_bf16" in report:
        text += [
            "",
            "The -bf16 rows' FLOP util is against the bf16 matmul rate"
            + (", and their 'vs tuned' against baseline-tuned-bf16." if "baseline-tuned-bf16" in by_name else "."),
        ]
    if report["memory"]:
        text += ["", "Memory (the same rows, fewer steps):", "", table(report["memory"], report["memory"][0])]
    return "\n".join(text) + "\n"


if __name__ == "__main__":
    main()
