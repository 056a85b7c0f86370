"""eval.run(): score the base model and base + adapter on a suite, and report the difference.

Tasks read rows through the same readers as training and render them with the same prompts
(formats.to_sft, the recipe's system prompt), so the model is asked exactly what it was trained
to answer.

- mcq rows (multiple choice and classification) are scored by the log-likelihood of each option
  label as the assistant's reply to the rendered prompt, with no parsing of generated text. The
  headline is `accuracy` (mean log-prob per option token, so a multi-token label is not penalised
  for its length); `accuracy_sum` (the raw sum) is reported beside it.
- qa rows (TAT-QA, ConvFinQA) are answered by greedy decoding and scored by exact match, token F1
  and numeric match (scale words, percent, commas and negatives in parentheses understood).
- text rows (documents) are scored by perplexity, tokenized as continued pretraining tokenizes them:
  the model's own measure of how well it knows held-out text of the domain. Lower is better.

Base and adapter are scored on the same examples, so the 95% confidence interval of the delta is a
paired bootstrap: over documents where a source asks several questions of one (a row's `group`: a ContractNLI
contract, a TAT-QA report), else over examples. A task whose whole interval lies on the worse side of 0 (below it;
above it for perplexity) is a regression. The base model's scores are cached (eval/cache.py), so a
rerun on the same base scores only the adapter.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from finetune import runs
from finetune.errors import FinetuneError
from finetune.eval.cache import score_base
from finetune.eval.metrics import is_regression, mean, paired_bootstrap
from finetune.eval.prompts import examples
from finetune.eval.report import ci_text, regressions, write_report
from finetune.eval.scoring import score_task
from finetune.eval.suite import Task, load_suite, suite_for
from finetune.recipe import Recipe

log = logging.getLogger(__name__)


def _summary(task: Task, items: list[dict], scored: dict[str, dict], resamples: int, seed: int) -> dict:
    """One task's entry in eval.json: headline scores, delta, paired CI, every metric per model."""
    metric = task.metric
    entry = {
        "n": len(items),
        "metric": metric,
        "kind": task.kind,
        "shots": task.shots,
        "reader": task.reader,
        "split": task.split,
    }
    for label, result in scored.items():
        entry[label] = mean(result["per_example"][metric])
    entry["metrics"] = {label: {k: mean(v) for k, v in r["per_example"].items()} for label, r in scored.items()}
    entry["seconds"] = {label: round(r["seconds"], 2) for label, r in scored.items()}
    entry["cached"] = [label for label, r in scored.items() if r.get("cached")]
    entry["seconds_per_example"] = {label: round(r["seconds"] / len(items), 3) for label, r in scored.items()}
    groups = [it["row"].get("group") or it["id"] for it in items]
    entry["groups"] = len(set(groups))
    if "adapter" in scored:
        base, adapter = scored["base"]["per_example"][metric], scored["adapter"]["per_example"][metric]
        entry["delta"] = entry["adapter"] - entry["base"]
        entry["ci95"] = list(paired_bootstrap(base, adapter, resamples, seed, groups))
        entry["regression"] = is_regression(metric, entry["ci95"])
    else:
        entry.update(adapter=None, delta=None, ci95=None, regression=False)
    if task.kind == "mcq":
        # How often each option is the answer and how often each model picks it: a model that
        # scores by always picking one label shows here before it shows anywhere else.
        entry["label_counts"] = {
            "gold": _counts(it["answer"] for it in items),
            **{label: _counts(r["predictions"]) for label, r in scored.items()},
        }
    if task.kind == "text":
        entry["tokens"] = sum(scored["base"]["predictions"])  # tokens scored: the same for every model
    # Each example's score on the headline metric with its group, and its answer and what each model said (the option
    # picked, or the generated answer) or, for a document, the tokens scored: the interval follows from this file alone.
    entry["examples"] = [
        {
            "id": it["id"],
            "group": group,
            **(
                {"tokens": scored["base"]["predictions"][i]}
                if task.kind == "text"
                else {"answer": it["answer"], **{label: r["predictions"][i] for label, r in scored.items()}}
            ),
            "scores": {label: r["per_example"][metric][i] for label, r in scored.items()},
        }
        for i, (it, group) in enumerate(zip(items, groups))
    ]
    return entry


def _counts(labels) -> dict[str, int]:
    return dict(sorted(Counter(labels).items(), key=lambda kv: (-kv[1], kv[0])))


def _target(target) -> tuple[Recipe, Path | None, Path]:
    """(recipe, run folder or None for a bare recipe, folder the report goes to)."""
    from finetune import recipe as recipe_lib

    path = Path(target)
    if path.is_dir() and runs.RunFolder(path).recipe.is_file():
        return runs.finished_recipe(path), path, path
    if path.is_dir():
        raise FinetuneError(
            f"{target}: not a run folder (no recipe.yaml) and not a recipe; give a finished run folder or a recipe name"
        )
    recipe = recipe_lib.load(str(target))
    # A bare recipe scores the base model only; its report goes beside (not into) the run's own eval.json.
    return recipe, None, recipe.output_dir / "base-eval"


def run(target, suite: str | None = None, n: int | None = None, cache: bool = True, output: Path | None = None) -> dict:
    """Score base (and base + adapter, and RUN_DIR/merged when present) on a suite; write eval.json/.md/.png.

    `target` is a finished run folder (recipe.yaml + adapter/) or a recipe name/path (base only).
    `suite` defaults to the suite named like the recipe; `n` caps every task's example count.
    `cache` reuses the base model's scores from an earlier evaluation of the same prompts (see above).
    `output` is where eval.json/.md/.png go (default: the run folder, or RUN_DIR/base-eval for a bare recipe).
    """
    from finetune import inference
    from finetune import model as model_lib

    recipe, run_dir, out = _target(target)
    chosen = load_suite(suite or suite_for(recipe))
    system_prompt = chosen.system_prompt or recipe.data.system_prompt
    tasks = {name: (task, examples(task, system_prompt, chosen.seed, n)) for name, task in chosen.tasks.items()}
    log.info(
        "eval suite %s: %s", chosen.name, ", ".join(f"{name} ({len(items)})" for name, (_, items) in tasks.items())
    )

    scored: dict[str, dict[str, dict]] = {name: {} for name in tasks}
    if run_dir is not None:
        model, tokenizer = inference.load_run(run_dir)
        with model.disable_adapter():
            for name, (task, items) in tasks.items():
                scored[name]["base"] = score_base(model, tokenizer, recipe, name, task, items, chosen.batch_size, cache)
        for name, (task, items) in tasks.items():
            log.info("scoring adapter on %s (%d examples)", name, len(items))
            scored[name]["adapter"] = score_task(model, tokenizer, items, task, chosen.batch_size)
        del model
        merged = runs.RunFolder(run_dir).merged
        if (merged / "config.json").is_file():
            model, tokenizer = inference.load_merged(merged, model_lib.compute_dtype(recipe.model))
            for name, (task, items) in tasks.items():
                log.info("scoring merged on %s (%d examples)", name, len(items))
                scored[name]["merged"] = score_task(model, tokenizer, items, task, chosen.batch_size)
            del model
    else:
        model, tokenizer = model_lib.load(recipe.model, for_training=False)
        model.eval()
        for name, (task, items) in tasks.items():
            scored[name]["base"] = score_base(model, tokenizer, recipe, name, task, items, chosen.batch_size, cache)
        del model

    result = {
        "suite": chosen.name,
        "note": chosen.note,
        "target": str(target),
        "recipe": recipe.name,
        "model": recipe.model.base,
        "system_prompt": system_prompt,
        "device": model_lib.device(),
        "bootstrap": {"resamples": chosen.bootstrap, "seed": chosen.seed},
        "tasks": {
            name: _summary(task, items, scored[name], chosen.bootstrap, chosen.seed)
            for name, (task, items) in tasks.items()
        },
    }
    write_report(result, Path(output) if output is not None else out)
    for name in regressions(result):
        log.warning(
            "REGRESSION on %s: the adapter scores below the base (95%% CI of the delta %s)",
            name,
            ci_text(result["tasks"][name]["ci95"]),
        )
    return result
