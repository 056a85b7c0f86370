"""The benchmark keeps working: its smoke version (2 steps of the project's sample) runs both variants and reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runs import env

PROJECT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_benchmark_smoke_run_reports_both_variants_on_the_same_tokens(tmp_path):
    done = subprocess.run(
        [sys.executable, str(PROJECT / "benchmarks" / "sft_speed.py"), "--smoke", "--out", str(tmp_path)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (report_file,) = tmp_path.glob("sft-*.json")
    report = json.loads(report_file.read_text())
    baseline, ours = report["results"]
    assert (baseline["variant"], ours["variant"]) == ("baseline", "ours")
    assert report["data"]["rows"] == 4 and report["data"]["steps"] == 2
    assert 0 < report["data"]["trained_tokens"] < report["data"]["real_tokens"]
    for result in (baseline, ours):
        assert len(result["losses"]) == 2 and result["effective_tokens_per_s"] > 0 and result["peak_rss_mb"] > 0
        assert 0 < result["utilization_pct"] < 100
    # The same rows in other batches, from the same base (LoRA starts as a no-op): similar loss per token.
    assert ours["mean_loss"] == pytest.approx(baseline["mean_loss"], rel=0.15)
    assert report["speedup"] == round(ours["effective_tokens_per_s"] / baseline["effective_tokens_per_s"], 2)
    assert "| baseline |" in (tmp_path / report_file.name.replace(".json", ".md")).read_text()
    assert not list(tmp_path.glob("*.jsonl")), "the data rows must not be left in the output folder"
