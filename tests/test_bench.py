"""The benchmark keeps working: its smoke version (2 steps of the project's sample) runs both variants and reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runs import benchmark, env
from conftest import PROJECT


def smoke_run(script: str, out: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(PROJECT / "benchmarks" / script), "--smoke", "--out", str(out)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_the_benchmark_smoke_run_reports_both_variants_on_the_same_tokens(tmp_path):
    smoke_run("sft_speed.py", tmp_path)
    (report_file,) = tmp_path.glob("sft-*.json")
    report = json.loads(report_file.read_text())
    baseline, tuned, ours = report["results"]
    assert (baseline["variant"], tuned["variant"], ours["variant"]) == ("baseline", "baseline-tuned", "ours")
    assert report["data"]["rows"] == 4 and report["data"]["steps"] == 2
    assert 0 < report["data"]["trained_tokens"] < report["data"]["real_tokens"]
    for result in (baseline, tuned, ours):
        assert len(result["losses"]) == 2 and result["effective_tokens_per_s"] > 0 and result["peak_rss_mb"] > 0
        assert 0 < result["utilization_pct"] < 100
        # One repeat of two steps: the second step's time, logged loss to logged loss, within the run's.
        ((second,),) = result["step_s"]
        assert 0 < second < result["train_runtime_s"][0], result
    # The same rows in other batches, from the same base (LoRA starts as a no-op): similar loss per token.
    assert ours["mean_loss"] == pytest.approx(baseline["mean_loss"], rel=0.15)
    assert tuned["mean_loss"] == pytest.approx(baseline["mean_loss"], rel=0.15)
    assert report["speedup"] == round(ours["effective_tokens_per_s"] / baseline["effective_tokens_per_s"], 2)
    assert report["speedup_vs_tuned"] == round(ours["effective_tokens_per_s"] / tuned["effective_tokens_per_s"], 2)
    markdown = (tmp_path / report_file.name.replace(".json", ".md")).read_text()
    assert "| baseline |" in markdown and "| baseline-tuned |" in markdown and "| vs tuned |" in markdown
    assert not list(tmp_path.glob("*.jsonl")), "the data rows must not be left in the output folder"


@pytest.mark.slow
@pytest.mark.parametrize("one_process", ["ours", "baseline-tuned"])
def test_the_two_process_lever_trains_the_same_rows_per_step_as_one_process(tmp_path, one_process):
    sft_speed = benchmark("sft_speed")
    rows = tmp_path / "rows.jsonl"
    sft_speed.write_rows(sft_speed.SAMPLE_PUBMEDQA, 8, rows)
    one = sft_speed.spawn(one_process, rows, steps=2, batch_size=4)
    two = sft_speed.spawn(f"{one_process}-ddp2", rows, steps=2, batch_size=4)
    # Each process takes one of a step's two micro-batches of 2, so step 2 starts from the same update; LoRA
    # dropout's masks differ (both processes draw the one process's first masks, each for its own rows), which moves
    # the loss by far less than the tolerance.
    assert len(two["losses"]) == 2
    assert two["losses"] == pytest.approx(one["losses"], abs=2e-3)
    assert two["padding_fraction"] > 0 and len(two["step_s"]) == 1
    # Two processes, each with its own copy of the model: their peaks add up to more than one process's.
    assert two["peak_rss_mb"] > 1.3 * one["peak_rss_mb"]


@pytest.mark.slow
def test_the_scaling_smoke_run_measures_both_variants_at_one_point(tmp_path):
    smoke_run("scaling.py", tmp_path)
    (report_file,) = tmp_path.glob("scaling-*.json")
    (point,) = json.loads(report_file.read_text())["points"]
    assert (point["length"], point["rank"]) == (256, 16)
    for variant in ("baseline-tuned", "ours"):
        assert point[variant]["tokens_per_s"] > 0 and point[variant]["peak_rss_mb"] > 0
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_gpu_benchmark_dry_run_trains_every_variant_on_the_cpu(tmp_path):
    done = subprocess.run(
        ["bash", str(PROJECT / "benchmarks" / "gpu.sh"), "--dry-run", "--out", str(tmp_path)],
        env={**env(), "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (report_file,) = tmp_path.glob("gpu-*.json")
    report = json.loads(report_file.read_text())
    assert report["dry_run"] and report["steps"] == 2
    assert [(r["model"], r["variant"]) for r in report["results"]] == [
        ("tiny-llama3", "trl-lora"),
        ("tiny-llama3", "ours-lora"),
        ("tiny-llama3", "ours-lora-packing"),
    ]
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in report["results"]), report["results"]


def test_the_step_profile_tells_loras_products_from_dense_ones_by_their_shapes():
    matmul_work = benchmark("step_profile").matmul_work
    # LoRA's rank-16 products of 100 tokens: A's and B's forward, B's weight gradient, the input's gradient through A
    assert matmul_work([[100, 576], [576, 16]], 16) == ("lora", 2 * 100 * 576 * 16)
    assert matmul_work([[100, 16], [16, 1536]], 16) == ("lora", 2 * 100 * 16 * 1536)
    assert matmul_work([[1536, 100], [100, 16]], 16) == ("lora", 2 * 1536 * 100 * 16)
    assert matmul_work([[16, 100], [100, 576]], 16) == ("lora", 2 * 16 * 100 * 576)
    # the frozen base's products, addmm's bias first, and a batched product
    assert matmul_work([[100, 576], [576, 1536]], 16) == ("dense", 2 * 100 * 576 * 1536)
    assert matmul_work([[1536], [100, 576], [576, 1536], [], []], 16) == ("dense", 2 * 100 * 576 * 1536)
    assert matmul_work([[9, 100, 64], [9, 64, 100]], 16) == ("dense", 2 * 9 * 100 * 64 * 100)


@pytest.mark.slow
def test_the_step_profile_smoke_run_splits_the_training_time_into_op_groups(tmp_path):
    smoke_run("step_profile.py", tmp_path)
    (report_file,) = tmp_path.glob("profile-*.json")
    report = json.loads(report_file.read_text())
    assert list(report["seconds"]) == ["matmul", "attention", "dropout", "other"]
    # A LoRA step on a frozen base is mostly matmuls, and LoRA dropout draws its masks' random bits on every step.
    total = sum(report["seconds"].values())
    assert 0.3 < report["seconds"]["matmul"] / total < 1 and report["seconds"]["dropout"] > 0
    assert report["data"] == {"rows": 2, "steps": 1, "batch_size": 2}
    assert set(report["matmul_gflops"]) == {"float32", "bfloat16"} and report["matmul_gflops"]["float32"] > 0
    markdown = (tmp_path / report_file.name.replace(".json", ".md")).read_text()
    bound = round(total / report["seconds"]["matmul"], 2)
    assert f"no lever outside them can exceed {bound:.2f}x" in markdown
    # Every matmul is one kind or the other, and both kinds ran: the frozen base's products and the adapters'.
    dense, lora = report["matmuls"]["dense"], report["matmuls"]["lora"]
    assert dense["s"] + lora["s"] == pytest.approx(report["seconds"]["matmul"], abs=2e-3)
    assert dense["gflop_per_s"] > 0 and lora["gflop_per_s"] > 0 and report["lora_rank"] == 16
    assert 0 < len(report["largest_other"]) <= 5 and sum(report["largest_other"].values()) <= report["seconds"]["other"]
    assert f"dense {dense['s']:.1f} s at {dense['gflop_per_s']} GFLOP/s" in markdown
    # transformers' default optimizer, torch's fused AdamW, timed over its steps (the one step of this run)
    assert report["optimizer"]["name"] == "AdamW" and report["optimizer"]["fused"]
    assert 0 < report["optimizer"]["s"] < total
    assert not list(tmp_path.glob("*.jsonl")), "the data rows must not be left in the output folder"
