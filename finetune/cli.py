"""The `finetune` command. Every user error becomes one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from finetune import distributed
from finetune.errors import FinetuneError, disk_full

log = logging.getLogger("finetune")

EPILOG = """examples:
  finetune run medical                          train recipes/medical.yaml
  finetune run recipes/medical.yaml train.max_steps=50 adapter.r=8
  finetune run legal --distributed fsdp --processes 4      the same run on 4 GPUs (accelerate)
  finetune recipes list | show medical | schema
  finetune data preview medical -n 2
  finetune generate runs/medical "Is aspirin an NSAID?"
  finetune chat runs/medical
  finetune merge runs/medical && finetune export runs/medical --gguf q8_0
  finetune push runs/medical --repo-id you/medical-smollm2 --dry-run
"""


def _recipe(args):
    from finetune import recipe

    return recipe.load(args.recipe, args.overrides)


def cmd_run(args) -> int:
    from finetune import pipeline

    recipe = _recipe(args)
    if args.distributed and distributed.world_size() == 1:
        pipeline.eval_suite(recipe)  # a wrong suite name fails before any process starts
        return _launch(args)
    outcome = pipeline.run(recipe, overwrite=args.overwrite)
    if outcome is None:
        return 0
    summary = outcome.summary
    print(
        f"trained: {outcome.run_dir}  steps={summary['steps']} final_loss={summary['final_loss']:.4f} "
        f"tokens/s={summary['tokens_per_s']} peak_rss={summary['peak_rss_mb']} MB"
    )
    if outcome.merge:
        print_merge(outcome.merge)
    if outcome.gguf:
        print_export(outcome.gguf)
    print(f'try it: finetune generate {outcome.run_dir} "your question"')
    if outcome.evaluation:
        report_eval(outcome.evaluation)
    return 0


def _launch(args) -> int:
    """Re-run this `finetune run` in every process of `accelerate launch`, with a shipped config."""
    import subprocess

    argv = (
        ["run", args.recipe, *args.overrides]
        + (["--overwrite"] if args.overwrite else [])
        + (["--debug"] if args.debug else [])
    )
    command = distributed.launch_command(args.distributed, args.processes, argv)
    if args.machines > 1:
        if not args.main_address:
            raise FinetuneError(
                "--machines: a multi-machine run needs --main-address HOST:PORT (the machine-rank-0 host)"
            )
        host, _, port = args.main_address.partition(":")
        command[2:2] = [
            "--num_machines",
            str(args.machines),
            "--machine_rank",
            str(args.machine_rank),
            "--main_process_ip",
            host,
            "--main_process_port",
            port or "29500",
        ]
    log.info("launching: %s", " ".join(command))
    return subprocess.run(command).returncode


def cmd_eval(args) -> int:
    from finetune import eval as evaluation

    report_eval(evaluation.run(args.target, suite=args.suite, n=args.n, cache=not args.no_cache))
    return 0


def report_eval(result: dict) -> None:
    """The table, then a warning naming every task the adapter made worse: the last thing the user sees."""
    from finetune.eval import regressions, table

    print(table(result))
    found = regressions(result)
    if found:
        print(f"WARNING: the adapter regresses on {', '.join(found)} (95% CI of the delta below 0)", file=sys.stderr)


def cmd_recipes_list(args) -> int:
    from finetune import config, recipe

    for folder in config.folders(recipe.KIND):
        for path in sorted(folder.glob("*.yaml")):
            try:
                loaded = recipe.load(str(path))
                line = f"{path.stem:<24} {loaded.description}"
            except FinetuneError as e:
                line = f"{path.stem:<24} INVALID: {e}"
            print(line)
    return 0


def cmd_recipes_show(args) -> int:
    from finetune import recipe

    print(recipe.to_yaml(_recipe(args)), end="")
    return 0


def cmd_recipes_schema(args) -> int:
    from finetune import recipe

    print(recipe.schema_reference())
    return 0


def cmd_data_readers(args) -> int:
    from finetune.data.readers import READERS

    for name, reader in sorted(READERS.items()):
        flag = "" if reader.commercial_use else "  [NON-COMMERCIAL]"
        print(f"{name:<20} {reader.kind:<11} {reader.license or '-':<14} {reader.description}{flag}")
    return 0


def cmd_data_info(args) -> int:
    from finetune.data.readers import READERS

    recipe = _recipe(args)
    for source in recipe.data.sources:
        reader = READERS[source.reader]
        where = source.path or source.hub
        print(
            f"{where}\n  reader: {reader.name} ({reader.kind} rows), split: {source.split}, license: "
            f"{reader.license or 'see the source'}"
        )
        if reader.card:
            print(f"  card: datasets/{reader.card}")
        if not reader.commercial_use:
            print("  WARNING: this source's license forbids commercial use")
    return 0


def cmd_data_preview(args) -> int:
    from finetune import model
    from finetune.data import build

    recipe = _recipe(args)
    tokenizer = model.tokenizer_for(recipe.model)
    rows, stats = build.chat_rows(recipe.data, recipe.train.seed)
    color = sys.stdout.isatty()
    for index, row in enumerate(rows[: args.n]):
        tokens = build.tokenize(tokenizer, row["messages"])
        trained = sum(label != build.IGNORE for label in tokens["labels"])
        print(f"── row {index}: {len(tokens['input_ids'])} tokens, {trained} trained " + "─" * 20)
        print(render_spans(tokenizer, tokens, color))
    lengths, dropped = [], 0
    for row in rows:
        n = len(build.tokenize(tokenizer, row["messages"])["input_ids"])
        if n > recipe.data.max_length:
            dropped += 1
        lengths.append(n)
    print(
        f"── {len(rows)} rows, {stats['duplicates']} duplicates removed, {dropped} longer than "
        f"max_length={recipe.data.max_length} (dropped in training)"
    )
    print("trained spans are " + ("green" if color else "between ⟦ and ⟧"))
    print(length_histogram(lengths))
    return 0


def render_spans(tokenizer, tokens: dict, color: bool) -> str:
    """The rendered conversation with trained (assistant) tokens marked."""
    from finetune.data.build import IGNORE

    start, end = ("\033[32m", "\033[0m") if color else ("⟦", "⟧")
    pieces, span, trained = [], [], False
    for token_id, label in zip(tokens["input_ids"], tokens["labels"]):
        is_trained = label != IGNORE
        if is_trained != trained and span:
            text = tokenizer.decode(span)
            pieces.append(f"{start}{text}{end}" if trained else text)
            span = []
        trained = is_trained
        span.append(token_id)
    if span:
        text = tokenizer.decode(span)
        pieces.append(f"{start}{text}{end}" if trained else text)
    return "".join(pieces)


def length_histogram(lengths: list[int], bins: int = 8, width: int = 40) -> str:
    if not lengths:
        return ""
    low, high = min(lengths), max(lengths)
    step = max(1, -(-(high - low + 1) // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min((n - low) // step, bins - 1)] += 1
    top = max(counts)
    lines = ["tokens per row:"]
    for i, count in enumerate(counts):
        lo = low + i * step
        lines.append(f"  {lo:>6}-{lo + step - 1:<6} {'█' * round(width * count / top):<{width}} {count}")
    return "\n".join(lines)


def cmd_data_stats(args) -> int:
    from finetune import model, runs
    from finetune.data import build

    recipe = _recipe(args)
    tokenizer = model.tokenizer_for(recipe.model)
    built = build.build(recipe, tokenizer)
    lengths = built.stats.pop("lengths")
    stats = {
        **built.stats,
        "max_length": recipe.data.max_length,
        "length_min": lengths[0],
        "length_median": lengths[len(lengths) // 2],
        "length_max": lengths[-1],
    }
    text = json.dumps(stats, indent=2)
    if args.output:
        runs.write_text(Path(args.output), text + "\n")
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def cmd_generate(args) -> int:
    from finetune import inference

    model, tokenizer = inference.load_run(Path(args.run_dir))
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}
    ]
    print(inference.generate(model, tokenizer, messages, args.max_new_tokens, args.temperature))
    return 0


def cmd_chat(args) -> int:
    from finetune import inference

    model, tokenizer = inference.load_run(Path(args.run_dir))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chatting with", args.run_dir, "(empty line or Ctrl-D to quit)")
    while True:
        try:
            prompt = input("you> ").strip()
        except EOFError:
            break
        if not prompt:
            break
        messages.append({"role": "user", "content": prompt})
        reply = inference.generate(model, tokenizer, messages, args.max_new_tokens, args.temperature)
        messages.append({"role": "assistant", "content": reply})
        print(f"model> {reply}")
    return 0


def cmd_merge(args) -> int:
    from finetune import merge

    print_merge(merge.merge(args.run_dir, args.output, args.target))
    return 0


def print_merge(report: dict) -> None:
    print(
        f"merged into {report['output']} (target: {report['target']}): max |Δlogit| vs base+adapter "
        f"{report['max_abs_logit_diff']:.3g}, top-1 agreement {report['top1_agreement']:.3f}"
    )
    for name, figures in (report.get("targets") or {}).items():
        print(
            f"  {name:<12} vs the trained nf4 model: max |Δlogit| {figures['vs_trained']['max_abs_logit_diff']:.3g}, "
            f"top-1 agreement {figures['vs_trained']['top1_agreement']:.3f}"
        )


def cmd_export(args) -> int:
    from finetune import gguf

    print_export(gguf.export(args.run_dir, args.gguf, args.output, verify=not args.no_verify))
    return 0


def print_export(path: Path) -> None:
    from finetune import runs

    figures = runs.read_json(path.parent / "export.json")["files"][path.name]
    print(f"wrote {path} and {path.parent / figures['modelfile']}")
    if "max_abs_logit_diff" in figures:
        print(
            f"  read back: max |Δlogit| vs merged {figures['max_abs_logit_diff']:.3g}, "
            f"greedy text agreement {figures['greedy_text_agreement']:.2f}, tokenization agreement "
            f"{figures['tokenization_agreement']:.2f}"
        )
    print(f"  ollama create NAME -f {path.parent / figures['modelfile']}")


def cmd_push(args) -> int:
    from finetune import hub

    result = hub.push(
        args.run_dir,
        args.repo_id,
        "adapter" if args.adapter else "merged",
        private=not args.public,
        dry_run=args.dry_run,
    )
    if args.dry_run:
        print(f"would upload to {result['repo_id']} ({'private' if result['private'] else 'public'}):")
        for name in result["files"]:
            print(f"  {name}")
        print("\n" + result["card"])
    else:
        print(f"pushed {len(result['files'])} files to {result['url']}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="finetune",
        description="LoRA / QLoRA fine-tuning of Llama models from strict recipes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def recipe_args(p):
        p.add_argument("recipe", help="recipe name (recipes/NAME.yaml) or path to a .yaml file")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.max_steps=50")

    run = commands.add_parser("run", help="train a recipe (SFT with LoRA/QLoRA)")
    recipe_args(run)
    run.add_argument("--overwrite", action="store_true", help="replace a finished run in the output folder")
    launch = run.add_argument_group("several processes (accelerate launch; see README, Scaling out)")
    launch.add_argument(
        "--distributed",
        metavar="CONFIG",
        help="ddp, fsdp, deepspeed-zero2 or deepspeed-zero3: start the run under accelerate with that shipped config",
    )
    launch.add_argument(
        "--processes", type=int, default=2, help="processes (GPUs) in all, over every machine (default 2)"
    )
    launch.add_argument("--machines", type=int, default=1, help="machines taking part (default 1)")
    launch.add_argument("--machine-rank", type=int, default=0, help="this machine's rank, 0 on the main one")
    launch.add_argument("--main-address", metavar="HOST:PORT", help="the rank-0 machine's address (multi-machine runs)")
    run.set_defaults(func=cmd_run)

    evaluation = commands.add_parser("eval", help="score base vs base + adapter on an eval suite (evals/NAME.yaml)")
    evaluation.add_argument("target", help="a finished run folder, or a recipe name/path (scores the base model only)")
    evaluation.add_argument("--suite", help="suite name in evals/ or a .yaml path (default: the recipe's domain suite)")
    evaluation.add_argument("-n", type=int, default=None, help="score at most N examples per task")
    evaluation.add_argument(
        "--no-cache",
        action="store_true",
        help="score the base model again instead of reusing its cached scores on the same prompts",
    )
    evaluation.set_defaults(func=cmd_eval)

    recipes = commands.add_parser("recipes", help="list, show or document recipes").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    recipes.add_parser("list", help="shipped recipes with their descriptions").set_defaults(func=cmd_recipes_list)
    show = recipes.add_parser("show", help="print the resolved recipe (extends and overrides applied)")
    recipe_args(show)
    show.set_defaults(func=cmd_recipes_show)
    recipes.add_parser("schema", help="every recipe key with its default and meaning").set_defaults(
        func=cmd_recipes_schema
    )

    data = commands.add_parser("data", help="inspect a recipe's data").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    data.add_parser("readers", help="the source formats the toolkit reads").set_defaults(func=cmd_data_readers)
    info = data.add_parser("info", help="a recipe's sources, readers and licenses")
    recipe_args(info)
    info.set_defaults(func=cmd_data_info)
    preview = data.add_parser("preview", help="rendered rows with trained spans marked, token counts, length histogram")
    recipe_args(preview)
    preview.add_argument("-n", type=int, default=3, help="rows to show (default 3)")
    preview.set_defaults(func=cmd_data_preview)
    stats = data.add_parser("stats", help="row and token statistics as JSON")
    recipe_args(stats)
    stats.add_argument("-o", "--output", help="write the JSON to this file")
    stats.set_defaults(func=cmd_data_stats)

    merge = commands.add_parser("merge", help="merge a run's adapter into a full-precision base, with a parity check")
    merge.add_argument("run_dir", help="the run folder")
    merge.add_argument("-o", "--output", help="where to write the merged model (default RUN_DIR/merged)")
    merge.add_argument(
        "--target",
        choices=("auto", "base", "dequantized"),
        default="auto",
        help="QLoRA runs: merge into the original base or the dequantized nf4 weights (default: whichever reproduces "
        "the trained model)",
    )
    merge.set_defaults(func=cmd_merge)

    export = commands.add_parser("export", help="write a GGUF file and an Ollama Modelfile (merging first if needed)")
    export.add_argument("run_dir", help="a run folder or a merged model folder")
    export.add_argument("--gguf", choices=("f32", "f16", "q8_0"), default="f16", help="GGUF tensor type (default f16)")
    export.add_argument("-o", "--output", help="folder for the GGUF and Modelfile (default RUN_DIR/gguf)")
    export.add_argument("--no-verify", action="store_true", help="skip reading the GGUF back and comparing logits")
    export.set_defaults(func=cmd_export)

    push = commands.add_parser(
        "push", help="upload the merged model (or the adapter) with a model card to the Hugging Face Hub"
    )
    push.add_argument("run_dir", help="the run folder")
    push.add_argument("--repo-id", required=True, help="namespace/name on the Hub")
    what = push.add_mutually_exclusive_group()
    what.add_argument("--merged", action="store_true", help="push RUN_DIR/merged (default)")
    what.add_argument("--adapter", action="store_true", help="push the adapter only")
    visibility = push.add_mutually_exclusive_group()
    visibility.add_argument("--private", action="store_true", help="create the repo private (default)")
    visibility.add_argument("--public", action="store_true", help="create the repo public")
    push.add_argument("--dry-run", action="store_true", help="print the files and the model card; upload nothing")
    push.set_defaults(func=cmd_push)

    for name, helptext, func in (
        ("generate", "answer one prompt with a trained run", cmd_generate),
        ("chat", "chat with a trained run", cmd_chat),
    ):
        p = commands.add_parser(name, help=helptext)
        p.add_argument("run_dir", help="the run folder (train.output_dir)")
        if name == "generate":
            p.add_argument("prompt")
        p.add_argument("--system", help="system message")
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
        p.set_defaults(func=func)
    return top


def _quiet_libraries() -> None:
    """Library chatter (deprecations, MatMul8bitLt casts) hides the lines that matter; --debug shows it."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    transformers.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(message)s")
    logging.getLogger("finetune").setLevel(logging.DEBUG if args.debug else logging.INFO)
    if not args.debug:
        _quiet_libraries()
    try:
        return args.func(args)
    except FinetuneError as e:
        if args.debug:
            raise
        # Under torchrun / accelerate every process hits the same error; one line is enough.
        if distributed.is_main():
            print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        reason = disk_full(e)
        if reason is None or args.debug:
            raise
        # Merge and export write into temp folders first, so nothing half-written is left looking complete.
        print(
            f"error: the disk is full ({reason}) writing {e.filename or 'the output'}; free space or write elsewhere "
            "(--output)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
