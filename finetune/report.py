"""Plots and tables made from a run's logs."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(metrics: Path, target: Path, title: str = "") -> Path | None:
    """loss.png: training loss per step, and eval loss where it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evaluation = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evaluation:
        ax.plot(*zip(*evaluation), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(target)
    plt.close(fig)
    return target


def plot_rewards(metrics: Path, target: Path, title: str = "") -> Path | None:
    """rewards.png for DPO: implicit rewards of chosen and rejected answers, their margin, and the accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(metrics) if "rewards/chosen" in r]
    if not records:
        return None
    steps = [r["step"] for r in records]
    fig, (rewards, accuracy) = plt.subplots(1, 2, figsize=(10, 4.0), dpi=100)
    for key, color in (("rewards/chosen", "tab:green"), ("rewards/rejected", "tab:red"), ("rewards/margins", "tab:blue")):
        rewards.plot(steps, [r[key] for r in records], label=key.split("/")[1], color=color)
    rewards.axhline(0, color="gray", lw=0.8)
    rewards.set_xlabel("optimizer step")
    rewards.set_ylabel("implicit reward")
    rewards.legend()
    accuracy.plot(steps, [r["rewards/accuracies"] for r in records], color="tab:purple")
    accuracy.set_ylim(-0.05, 1.05)
    accuracy.set_xlabel("optimizer step")
    accuracy.set_ylabel("reward accuracy (chosen > rejected)")
    fig.suptitle(title or "DPO rewards")
    fig.tight_layout()
    fig.savefig(target)
    plt.close(fig)
    return target
