"""How cost grows: effective tokens/s and peak RSS against sequence length and LoRA rank, the toolkit against a
tuned TRL SFTTrainer (benchmarks/baseline_trl.py --tuned), each point one process, the two interleaved.

Rows are real PubMedQA abstracts (../shared/data, else the project's sample) cut to the exact token length, with a
short answer (the label and the start of the conclusion), so the trained share of each row is the same at every
length. Lengths 256, 512, 1024, 2048 at rank 16; ranks 8, 16, 64 at length 512. Two optimizer steps of 4 rows
(micro-batches of 2) per point.

    .venv/bin/python benchmarks/scaling.py              # writes benchmarks/results/scaling-*.json/.md and
                                                        # benchmarks/scaling.png, appends the table to RESULTS.md
    .venv/bin/python benchmarks/scaling.py --pair ours-bf16,ours-eager-bf16 --ranks 16
                                                        # any two sft_speed variants instead: eager attention
                                                        # against sdpa in bf16 (plot in benchmarks/results/)
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sft_speed  # noqa: E402 - the workers and measurements are sft_speed's

ROOT = sft_speed.ROOT
LENGTHS = (256, 512, 1024, 2048)
RANKS = (8, 16, 64)
ROWS, BATCH = 8, 4
ANSWER_TOKENS = 32
PAIR = ("baseline-tuned", "ours")  # the reference, then the one compared with it


def rows_of_length(length: int, target: Path) -> int:
    """ROWS chat rows of exactly `length` tokens with the training template; returns the trained tokens."""
    from finetune import model as model_lib
    from finetune import recipe as recipe_lib
    from finetune.data.build import IGNORE, read_source, tokenize

    tokenizer = model_lib.load_tokenizer(sft_speed.embedded_dir(), recipe_lib.ModelSection())
    source = sft_speed.SHARED_PUBMEDQA if sft_speed.SHARED_PUBMEDQA.is_file() else sft_speed.SAMPLE_PUBMEDQA
    _, items, _ = read_source(recipe_lib.SourceSection(path=str(source), reader="pubmedqa", split="all"), "error", 0)
    text = "\n".join(item["context"] for item in items)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rows, trained = [], 0
    for i in range(ROWS):
        answer_ids = tokenizer(items[i]["explanation"] or "yes", add_special_tokens=False)["input_ids"]
        answer = f"{items[i]['answer']}\n\n" + tokenizer.decode(answer_ids[:ANSWER_TOKENS])
        overhead = len(
            tokenize(tokenizer, [{"role": "user", "content": ""}, {"role": "assistant", "content": answer}])[
                "input_ids"
            ]
        )
        start = i * length
        prompt = tokenizer.decode(ids[start : start + length - overhead])
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        # Decoding and re-encoding can move a token boundary: trim the prompt until the row fits exactly or under.
        while len(tokenize(tokenizer, messages)["input_ids"]) > length:
            messages[0]["content"] = messages[0]["content"][:-8]
        tokens = tokenize(tokenizer, messages)
        trained += sum(label != IGNORE for label in tokens["labels"])
        rows.append({"messages": messages})
    target.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return trained


def point(variant: str, rows_file: Path, trained: int, rank: int) -> dict:
    try:
        result = sft_speed.spawn(variant, rows_file, ROWS // BATCH, BATCH, rank=rank)
    except SystemExit as failed:  # a point that runs out of memory is a result, not the end of the run
        print(failed, file=sys.stderr)
        return {"failed": str(failed).splitlines()[0].removeprefix(f"{variant} ").rstrip(":")}
    return {
        "tokens_per_s": round(trained / result["train_runtime_s"], 2),
        "peak_rss_mb": result["peak_rss_mb"],
        "mean_loss": round(sum(result["losses"]) / len(result["losses"]), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)))
    parser.add_argument("--pair", default=",".join(PAIR), help="two sft_speed variants: the reference, then the other")
    parser.add_argument("--smoke", action="store_true", help="CI: one point (256 tokens, rank 16), nothing appended")
    a = parser.parse_args()
    pair = tuple(a.pair.split(","))
    scratch = Path(tempfile.mkdtemp(prefix="scaling-"))
    grid = [(length, 16) for length in map(int, a.lengths.split(","))]
    grid += [(512, rank) for rank in map(int, a.ranks.split(",")) if (512, rank) not in grid]
    if a.smoke:
        grid = [(256, 16)]
    points = []
    for i, (length, rank) in enumerate(grid):
        rows_file = scratch / f"rows-{length}.jsonl"
        trained = rows_of_length(length, rows_file)
        order = pair if i % 2 == 0 else pair[::-1]
        measured = {}
        for variant in order:
            print(f"length {length}, rank {rank}: {variant}", file=sys.stderr, flush=True)
            measured[variant] = point(variant, rows_file, trained, rank)
        points.append({"length": length, "rank": rank, **measured})
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": sft_speed.machine(),
        "rows": ROWS,
        "batch": BATCH,
        "pair": list(pair),
        "points": points,
    }
    sft_speed.save_report(report, render(report), a.out, "scaling", append=not a.smoke)
    # The default pair's full run is the README's plot; a smoke run or another pair goes beside its report.
    name = "scaling.png" if pair == PAIR else f"scaling-{'-vs-'.join(pair)}.png"
    plot(report, ROOT / "benchmarks" / name if pair == PAIR and not a.smoke else a.out / name)


def render(report: dict) -> str:
    reference, other = report.get("pair", PAIR)
    pair = "" if (reference, other) == PAIR else f", {other} against {reference}"
    lines = [
        f"## Scaling, {report['date'][:10]}: sequence length and LoRA rank (benchmarks/scaling.py{pair})",
        "",
        f"{report['rows']} rows of exactly the given length, {report['rows'] // report['batch']} steps of "
        f"{report['batch']} (micro-batches of 2); effective tokens/s (tokens that count in the loss) and peak RSS.",
        "",
        f"| length | rank | {reference} tok/s | {other} tok/s | ratio | {reference} RSS MB | {other} RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in report["points"]:
        lines.append(point_row(p, "{:.2f}", "{:.0f}", 1, (reference, other)))
    return "\n".join(lines) + "\n"


def point_row(p: dict, speed: str, memory: str, memory_unit: float, pair: tuple[str, str] = PAIR) -> str:
    """One table row; a variant that failed (killed for memory, say) shows its failure instead of figures."""
    reference, other = p[pair[0]], p[pair[1]]
    cells = [str(p["length"]), str(p["rank"])]
    cells += [speed.format(v["tokens_per_s"]) if "tokens_per_s" in v else v["failed"] for v in (reference, other)]
    both = "tokens_per_s" in reference and "tokens_per_s" in other
    cells.append(f"{other['tokens_per_s'] / reference['tokens_per_s']:.2f}x" if both else "-")
    cells += [memory.format(v["peak_rss_mb"] / memory_unit) if "peak_rss_mb" in v else "-" for v in (reference, other)]
    return "| " + " | ".join(cells) + " |"


def plot(report: dict, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pair = report.get("pair", PAIR)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for ax, key, fixed in ((axes[0], "length", ("rank", 16)), (axes[1], "rank", ("length", 512))):
        points = sorted((p for p in report["points"] if p[fixed[0]] == fixed[1]), key=lambda p: p[key])
        if len(points) < 2:  # a run over lengths only (--ranks 16) has no rank curve to draw
            ax.set_visible(False)
            continue
        xs = [p[key] for p in points]
        for variant, color in zip(pair, ("tab:gray", "tab:blue"), strict=True):
            done = [(x, p[variant]) for x, p in zip(xs, points, strict=True) if "tokens_per_s" in p[variant]]
            ax.plot([x for x, _ in done], [v["tokens_per_s"] for _, v in done], "o-", color=color, label=variant)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"{key} ({fixed[0]} {fixed[1]})")
        ax.set_ylabel("effective tokens/s")
        twin = ax.twinx()
        for variant, color in zip(pair, ("tab:gray", "tab:blue"), strict=True):
            done = [(x, p[variant]) for x, p in zip(xs, points, strict=True) if "peak_rss_mb" in p[variant]]
            twin.plot([x for x, _ in done], [v["peak_rss_mb"] / 1024 for _, v in done], "s--", color=color, alpha=0.5)
        twin.set_ylabel("peak RSS GB (dashed)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("cost against sequence length and LoRA rank")
    fig.tight_layout()
    fig.savefig(target)
    plt.close(fig)


if __name__ == "__main__":
    main()
