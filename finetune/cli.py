"""The `finetune` command: parses arguments and calls the toolkit's functions. Every user error becomes one line on
stderr and exit code 2."""

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
  finetune sweep real/medical --grid train.learning_rate=1e-4,2e-4   pick on validation, test the winner once
  finetune recipes list | show medical | schema
  finetune data preview medical -n 2
  finetune generate runs/medical "Is aspirin an NSAID?"
  finetune chat runs/medical
  finetune serve runs/medical                    OpenAI-compatible API on http://127.0.0.1:8000/v1
  finetune merge runs/medical && finetune export runs/medical --gguf q8_0
  finetune push runs/medical --repo-id you/medical-smollm2 --dry-run
"""


GGUF_TYPES = ("f32", "f16", "q8_0", "q4_k_m", "q5_k_m", "q6_k")
# action: (help, whether it takes a recipe and overrides)
RECIPES_ACTIONS = {
    "list": ("shipped recipes with their descriptions", False),
    "show": ("print the resolved recipe (extends and overrides applied)", True),
    "schema": ("every recipe key with its default and meaning", False),
}
DATA_ACTIONS = {
    "readers": ("the source formats the toolkit reads", False),
    "info": ("a recipe's sources, readers and licenses", True),
    "preview": ("rendered rows with trained spans marked, token counts, length histogram", True),
    "stats": ("row and token statistics as JSON", True),
}


def _recipe(args):
    from finetune import recipe

    return recipe.load(args.recipe, args.overrides)


def cmd_run(args) -> int:
    from finetune import gguf, merge, pipeline

    recipe = _recipe(args)
    if args.distributed and distributed.world_size() == 1:
        pipeline.eval_suite(recipe)  # a wrong suite name fails before any process starts
        return _launch(args)
    outcome = pipeline.run(recipe, overwrite=args.overwrite)
    if outcome is None:
        return 0
    summary = outcome.summary
    # Preference rows are tokenized by TRL's trainers, so only SFT runs know their token counts.
    speed = (
        f"tokens/s={summary['tokens_per_s']} trained, {summary['processed_tokens_per_s']} in all "
        if summary["tokens_per_s"]
        else ""
    )
    print(
        f"trained: {outcome.run_dir}  steps={summary['steps']} loss={summary['last_loss']:.4f} "
        f"(mean {summary['mean_loss']:.4f}) {speed}peak_rss={summary['peak_rss_mb']} MB"
    )
    if outcome.merge:
        print(merge.describe(outcome.merge))
    if outcome.gguf:
        print(gguf.describe(outcome.gguf))
    print(f'try it: finetune generate {outcome.run_dir} "your question"')
    if outcome.evaluation:
        report_eval(outcome.evaluation)
    return 0


def _launch(args) -> int:
    """Re-run this `finetune run` in every process of `accelerate launch`, with a shipped config."""
    import subprocess

    flags = (["--overwrite"] if args.overwrite else []) + (["--debug"] if args.debug else [])
    command = distributed.launch_command(
        args.distributed, args.processes, ["run", args.recipe, *args.overrides, *flags]
    )
    if args.machines > 1:
        if not args.main_address:
            raise FinetuneError("--machines: a multi-machine run needs --main-address HOST:PORT (the rank-0 host)")
        host, _, port = args.main_address.partition(":")
        command[2:2] = ["--num_machines", str(args.machines), "--machine_rank", str(args.machine_rank)]
        command[2:2] = ["--main_process_ip", host, "--main_process_port", port or "29500"]
    log.info("launching: %s", " ".join(command))
    return subprocess.run(command).returncode


def cmd_sweep(args) -> int:
    from finetune import sweep

    result = sweep.run(args.recipe, args.overrides, args.grid)
    print(sweep.markdown(result), end="")
    if result["test_scores"]:
        report_eval(result["test_scores"], with_table=False)
    return 0


def cmd_eval(args) -> int:
    from finetune import eval as evaluation

    report_eval(evaluation.run(args.target, suite=args.suite, n=args.n, cache=not args.no_cache))
    return 0


def report_eval(result: dict, with_table: bool = True) -> None:
    """The table, then a warning naming every task the adapter made worse: the last thing the user sees."""
    from finetune.eval import regressions, table

    if with_table:
        print(table(result))
    if result.get("note"):
        print(f"note: {result['note']}")
    found = regressions(result)
    if found:
        print(f"WARNING: the adapter regresses on {', '.join(found)} (95% CI of the delta below 0)", file=sys.stderr)


def cmd_recipes(args) -> int:
    from finetune import config, recipe

    if args.action == "show":
        print(recipe.to_yaml(_recipe(args)), end="")
    elif args.action == "schema":
        print(recipe.schema_reference())
    else:
        for folder in config.folders(recipe.KIND):
            for path in sorted(folder.rglob("*.yaml")):
                name = str(path.relative_to(folder).with_suffix(""))  # real/medical: recipes/real/medical.yaml
                try:
                    print(f"{name:<26} {recipe.load(str(path)).description}")
                except FinetuneError as e:
                    print(f"{name:<26} INVALID: {e}")
    return 0


def cmd_data(args) -> int:
    from finetune import model, runs
    from finetune.data import preview

    if args.action == "readers":
        print(preview.readers_table())
        return 0
    recipe = _recipe(args)
    if args.action == "info":
        print(preview.sources_info(recipe))
    elif args.action == "preview":
        print(preview.preview(recipe, model.tokenizer_for(recipe.model), args.n, sys.stdout.isatty()))
    else:
        text = json.dumps(preview.stats(recipe, model.tokenizer_for(recipe.model)), indent=2)
        if args.output:
            runs.write_text(Path(args.output), text + "\n")
            print(f"wrote {args.output}")
        else:
            print(text)
    return 0


def cmd_generate(args) -> int:
    from finetune import inference

    model, tokenizer = inference.load_run(Path(args.run_dir))
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = system + [{"role": "user", "content": args.prompt}]
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

    print(merge.describe(merge.merge(args.run_dir, args.output, args.target)))
    return 0


def cmd_export(args) -> int:
    from finetune import gguf

    print(gguf.describe(gguf.export(args.run_dir, args.gguf, args.output, verify=not args.no_verify)))
    return 0


def cmd_serve(args) -> int:
    import os

    from finetune import serve

    api_key = args.api_key or os.environ.get("FINETUNE_API_KEY")
    return serve.serve(args.target, args.host, args.port, api_key, args.model_name, args.merged, args.vllm)


def cmd_push(args) -> int:
    from finetune import hub

    what = "adapter" if args.adapter else "merged"
    result = hub.push(args.run_dir, args.repo_id, what, private=not args.public, dry_run=args.dry_run)
    if args.dry_run:
        print(f"would upload to {result['repo_id']} ({'private' if result['private'] else 'public'}):")
        print("\n".join(f"  {name}" for name in result["files"]))
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

    def command(name: str, func, helptext: str, recipe: bool = False, run_dir: str | None = None):
        p = commands.add_parser(name, help=helptext)
        if recipe:
            p.add_argument("recipe", help="recipe name (recipes/NAME.yaml) or path to a .yaml file")
            p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides: train.max_steps=50")
        if run_dir:
            p.add_argument("run_dir", help=run_dir)
        p.set_defaults(func=func)
        return p

    def actions(name: str, func, helptext: str, choices: dict[str, tuple[str, bool]]) -> dict:
        group = commands.add_parser(name, help=helptext).add_subparsers(dest="action", required=True, metavar="ACTION")
        made = {}
        for action, (text, takes_recipe) in choices.items():
            made[action] = p = group.add_parser(action, help=text)
            if takes_recipe:
                p.add_argument("recipe", help="recipe name (recipes/NAME.yaml) or path to a .yaml file")
                p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
            p.set_defaults(func=func)
        return made

    run = command("run", cmd_run, "train a recipe (SFT with LoRA/QLoRA), then evaluate, merge and export", recipe=True)
    run.add_argument("--overwrite", action="store_true", help="replace a finished run in the output folder")
    launch = run.add_argument_group("several processes (accelerate launch; see README, Scaling out)")
    launch.add_argument("--distributed", metavar="CONFIG", help="ddp, fsdp, deepspeed-zero2 or deepspeed-zero3")
    launch.add_argument("--processes", type=int, default=2, help="processes (GPUs) over all machines (default 2)")
    launch.add_argument("--machines", type=int, default=1, help="machines taking part (default 1)")
    launch.add_argument("--machine-rank", type=int, default=0, help="this machine's rank, 0 on the main one")
    launch.add_argument("--main-address", metavar="HOST:PORT", help="the rank-0 machine's address (multi-machine)")

    sweep = command("sweep", cmd_sweep, "train variants, pick one on validation, score test once", recipe=True)
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="values to try (repeatable)")

    evaluation = command("eval", cmd_eval, "score base vs base + adapter on an eval suite (evals/NAME.yaml)")
    evaluation.add_argument("target", help="a finished run folder, or a recipe name/path (scores the base only)")
    evaluation.add_argument("--suite", help="suite name in evals/ or a .yaml path (default: the recipe's suite)")
    evaluation.add_argument("-n", type=int, default=None, help="score at most N examples per task")
    evaluation.add_argument("--no-cache", action="store_true", help="score the base again instead of reusing its cache")

    actions("recipes", cmd_recipes, "list, show or document recipes", RECIPES_ACTIONS)
    data = actions("data", cmd_data, "inspect a recipe's data", DATA_ACTIONS)
    data["preview"].add_argument("-n", type=int, default=3, help="rows to show (default 3)")
    data["stats"].add_argument("-o", "--output", help="write the JSON to this file")

    merge = command("merge", cmd_merge, "merge a run's adapter into a full-precision base, checked", run_dir="the run")
    merge.add_argument("-o", "--output", help="where to write the merged model (default RUN_DIR/merged)")
    merge.add_argument(
        "--target",
        choices=("auto", "base", "dequantized"),
        default="auto",
        help="QLoRA runs: merge into the original base or the dequantized nf4 weights (default: the one that "
        "reproduces the trained model)",
    )
    export = command("export", cmd_export, "write GGUF + Ollama Modelfile", run_dir="a run or merged model folder")
    export.add_argument(
        "--gguf", choices=GGUF_TYPES, default="f16", help="GGUF type (default f16; K-quants: llama.cpp)"
    )
    export.add_argument("-o", "--output", help="folder for the GGUF and Modelfile (default RUN_DIR/gguf)")
    export.add_argument("--no-verify", action="store_true", help="skip reading the GGUF back and comparing logits")

    serve = command("serve", cmd_serve, "an OpenAI-compatible server for a run (or a .gguf file)")
    serve.add_argument("target", help="a finished run folder (base + adapter), or a .gguf file (served by llama.cpp)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--api-key", help="require Authorization: Bearer KEY (or set FINETUNE_API_KEY)")
    serve.add_argument("--model-name", help="the model id clients name (default: the recipe's name)")
    serve.add_argument("--merged", action="store_true", help="serve RUN_DIR/merged instead of base + adapter")
    serve.add_argument("--vllm", action="store_true", help="start vLLM's server with the adapter (GPU, vLLM installed)")

    push = command("push", cmd_push, "upload the merged model (or adapter) with a model card", run_dir="the run")
    push.add_argument("--repo-id", required=True, help="namespace/name on the Hub")
    what = push.add_mutually_exclusive_group()
    what.add_argument("--merged", action="store_true", help="push RUN_DIR/merged (default)")
    what.add_argument("--adapter", action="store_true", help="push the adapter only")
    visibility = push.add_mutually_exclusive_group()
    visibility.add_argument("--private", action="store_true", help="create the repo private (default)")
    visibility.add_argument("--public", action="store_true", help="create the repo public")
    push.add_argument("--dry-run", action="store_true", help="print the files and the model card; upload nothing")

    for name, helptext, func in (("generate", "answer one prompt", cmd_generate), ("chat", "chat", cmd_chat)):
        p = command(name, func, f"{helptext} with a trained run", run_dir="the run folder (train.output_dir)")
        if name == "generate":
            p.add_argument("prompt")
        p.add_argument("--system", help="system message")
        p.add_argument("--max-new-tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    return top


def _quiet_libraries() -> None:
    """Library chatter (deprecations, MatMul8bitLt casts) hides the lines that matter; --debug shows it."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # per-file loading bars; the training progress bar stays


def main(argv: list[str] | None = None) -> int:
    """Run one `finetune` command; returns the exit code (2 for a user error, reported as one line)."""
    top = parser()
    args, extra = top.parse_known_args(argv)
    # Overrides may follow options too (finetune sweep medical --grid K=V1,V2 train.max_steps=2).
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        top.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(message)s")
    logging.getLogger("finetune").setLevel(logging.DEBUG if args.debug else logging.INFO)
    if args.debug:
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.NOTSET)
    else:
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
        # Every output is staged and renamed into place, so nothing half-written is left looking complete.
        where = e.filename or "the output"
        print(
            f"error: the disk is full ({reason}) writing {where}; free space or write elsewhere (--output)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
