"""The evaluation report: eval.json, the Markdown table (eval.md, and what the CLI prints) and eval.png."""

from __future__ import annotations

import logging
from pathlib import Path

from finetune import plots, runs
from finetune.eval.metrics import lower_is_better

log = logging.getLogger(__name__)


def regressions(result: dict) -> list[str]:
    """Tasks whose whole 95% interval of the delta lies below zero."""
    return [name for name, task in result.get("tasks", {}).items() if task.get("regression")]


def ci_text(ci) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "–"


def count(task: dict) -> str:
    """How many examples, and in how many documents when several share one (what the interval resamples)."""
    groups = task.get("groups", task["n"])
    return f"{task['n']} in {groups} docs" if groups < task["n"] else str(task["n"])


def _score(value) -> str:
    return f"{value:.3f}" if value is not None else "–"


def table(result: dict) -> str:
    """The Markdown table of eval.md (the CLI prints it)."""
    has_merged = any("merged" in t for t in result["tasks"].values())
    head = [
        "task",
        "metric",
        "n",
        "base",
        "adapter",
        *(["merged"] if has_merged else []),
        "delta",
        "95% CI of delta",
        "",
    ]
    lines = [
        "| " + " | ".join(head) + " |",
        "|"
        + "|".join(["---", "---", "---:", "---:", "---:", *(["---:"] if has_merged else []), "---:", "---", "---"])
        + "|",
    ]
    for name, t in result["tasks"].items():
        delta = f"{t['delta']:+.3f}" if t["delta"] is not None else "–"
        cells = [
            name,
            f"{t['metric']} (lower is better)" if lower_is_better(t["metric"]) else t["metric"],
            count(t),
            _score(t["base"]),
            _score(t["adapter"]),
            *([_score(t.get("merged"))] if has_merged else []),
            delta,
            ci_text(t["ci95"]),
            "**REGRESSION**" if t["regression"] else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """eval.md: the table, how the interval was computed, options picked per model, reused base scores, warnings."""
    b = result["bootstrap"]
    lines = [
        f"# Evaluation: suite `{result['suite']}` on `{result['target']}`",
        "",
        table(result),
        "",
        f"Scores are fractions of examples (accuracy: option log-likelihood per token; accuracy_sum: summed; "
        f"qa: greedy answers). The 95% interval is a paired bootstrap of the delta "
        f"({b['resamples']} resamples, seed {b['seed']}) over documents where a task asks several questions of one "
        "('n in k docs': examples of one document are resampled together), else over examples; REGRESSION marks an "
        "interval entirely below 0.",
    ]
    if any(lower_is_better(t["metric"]) for t in result["tasks"].values()):
        lines += [
            "",
            "Perplexity is exp of a document's mean next-token loss, averaged over documents; lower is better, so "
            "there REGRESSION marks an interval entirely above 0.",
        ]
    if result.get("note"):
        lines += ["", f"Note: {result['note']}"]
    picks = [
        f"- `{name}`: "
        + "; ".join(
            f"{who} " + ", ".join(f"{option} {count}" for option, count in counts.items())
            for who, counts in t["label_counts"].items()
        )
        for name, t in result["tasks"].items()
        if "label_counts" in t
    ]
    if picks:
        lines += ["", "Options picked (gold = how often each is the answer):", "", *picks]
    reused = [name for name, t in result["tasks"].items() if "base" in t.get("cached", [])]
    if reused:
        lines += [
            "",
            f"Base scores of {', '.join(reused)} were reused from an earlier evaluation of the same base on the same "
            "prompts (`finetune eval --no-cache` scores them again).",
        ]
    found = regressions(result)
    if found:
        lines += ["", f"**Warning: the adapter regresses on {', '.join(found)}.**"]
    return "\n".join(lines) + "\n"


def write_report(result: dict, folder: Path) -> None:
    """eval.json, eval.md and eval.png in the folder."""
    runs.write_report(folder, "eval", result, markdown(result), plots.plot_eval)
