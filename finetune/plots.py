"""Plots of a run: the training loss, preference rewards, and base vs adapter per eval task."""

from __future__ import annotations

from pathlib import Path

from finetune.runs import read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, and no GUI backend to start
    import matplotlib.pyplot as plt

    return plt


def plot_loss(metrics: Path, target: Path, title: str = "") -> Path | None:
    """loss.png: training loss per step, and eval loss where it was measured."""
    plt = _pyplot()
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
    return _save(plt, fig, target)


# The right-hand panel of rewards.png: the first of these a method logs (KTO logs no accuracy).
SECOND_PANEL = (("rewards/accuracies", "reward accuracy (chosen > rejected)"), ("kl", "KL estimate to the reference"))


def plot_rewards(metrics: Path, target: Path, title: str = "") -> Path | None:
    """rewards.png for DPO, KTO and ORPO: implicit rewards of chosen (desirable) and rejected (undesirable) answers,
    their margin, and the reward accuracy (KTO: its KL estimate)."""
    plt = _pyplot()
    records = [r for r in read_metrics(metrics) if "rewards/chosen" in r or "rewards/rejected" in r]
    if not records:
        return None
    steps = [r["step"] for r in records]
    fig, (rewards, second) = plt.subplots(1, 2, figsize=(10, 4.0), dpi=100)
    for key, color in (
        ("rewards/chosen", "tab:green"),
        ("rewards/rejected", "tab:red"),
        ("rewards/margins", "tab:blue"),
    ):
        # A KTO batch without desirable (or undesirable) rows logs no reward for them.
        rewards.plot(steps, [r.get(key, float("nan")) for r in records], label=key.split("/")[1], color=color)
    rewards.axhline(0, color="gray", lw=0.8)
    rewards.set_xlabel("optimizer step")
    rewards.set_ylabel("implicit reward")
    rewards.legend()
    key, label = next(((k, text) for k, text in SECOND_PANEL if k in records[0]), SECOND_PANEL[0])
    second.plot(steps, [r.get(key, float("nan")) for r in records], color="tab:purple")
    if key == "rewards/accuracies":
        second.set_ylim(-0.05, 1.05)
    second.set_xlabel("optimizer step")
    second.set_ylabel(label)
    fig.suptitle(title or "preference rewards")
    return _save(plt, fig, target)


def plot_eval(result: dict, target: Path) -> Path:
    """eval.png: base vs adapter per task, the adapter bar carrying the 95% interval of the delta."""
    plt = _pyplot()
    names = list(result["tasks"])
    rows = [result["tasks"][n] for n in names]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(names) + 2), 4.0), dpi=100)
    ax.bar([i - 0.2 for i in x], [r["base"] for r in rows], width=0.4, label="base", color="tab:gray")
    if all(r["adapter"] is not None for r in rows):
        low = [r["delta"] - r["ci95"][0] for r in rows]
        high = [r["ci95"][1] - r["delta"] for r in rows]
        colors = ["tab:red" if r["regression"] else "tab:blue" for r in rows]
        ax.bar(
            [i + 0.2 for i in x],
            [r["adapter"] for r in rows],
            width=0.4,
            yerr=[low, high],
            capsize=4,
            label="adapter (95% CI of delta)",
            color=colors,
        )
    ax.set_xticks(list(x), [f"{n}\n({r['metric']}, n={r['n']})" for n, r in zip(names, rows)], fontsize=8)
    if all(0 <= r["base"] <= 1 for r in rows):  # fractions of examples; perplexity has no upper bound
        ax.set_ylim(0, 1.05)
    return _finish(plt, fig, ax, target, "score", f"eval suite {result['suite']}")


def _finish(plt, fig, ax, target: Path, ylabel: str, title: str) -> Path:
    """Labels, legend and grid of a bar chart, then the PNG."""
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, target)


def plot_sweep(result: dict, target: Path) -> Path:
    """sweep.png: each variant's validation score, with the 95% interval of its delta over the base."""
    plt = _pyplot()
    rows = result["variants"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2), 4.2), dpi=100)
    low = [r["delta"] - r["ci95"][0] for r in rows]
    high = [r["ci95"][1] - r["delta"] for r in rows]
    colors = ["tab:green" if r["variant"] == result["winner"] else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), [r["score"] for r in rows], yerr=[low, high], capsize=4, color=colors)
    ax.axhline(rows[0]["base"], color="tab:gray", lw=1, ls="--", label=f"base ({rows[0]['base']:.3f})")
    ax.set_xticks(range(len(rows)), [r["variant"].replace(",", "\n") for r in rows], fontsize=7)
    ylabel = f"validation {rows[0]['metric']} ({result['task']})"
    return _finish(plt, fig, ax, target, ylabel, f"sweep of {result['recipe']}: the winner in green")


def _save(plt, fig, target: Path) -> Path:
    fig.tight_layout()
    fig.savefig(target, format="png")  # staged outputs have no .png suffix to go by
    plt.close(fig)
    return target
