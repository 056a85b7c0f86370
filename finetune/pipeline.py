"""One run end to end, as the recipe asks: train.init_from's run first when it is not finished, then train,
evaluate base vs adapter, merge, and export GGUF."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from finetune import distributed, methods, runs, tracking, train
from finetune.errors import FinetuneError
from finetune.recipe import Recipe

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    run_dir: Path
    summary: dict  # run.json
    evaluation: dict | None  # eval.json
    merge: dict | None  # merge.json
    gguf: Path | None  # the GGUF file (its figures are in export.json beside it)


def eval_suite(recipe: Recipe) -> str | None:
    """The suite a run ends with, or None when the recipe asks for none (or 'auto' finds none); bad names fail now."""
    from finetune.eval import load_suite, suite_for

    if recipe.eval.suite != "auto":
        if recipe.eval.suite is not None:
            load_suite(recipe.eval.suite, given_as="eval.suite")
        return recipe.eval.suite
    try:
        return suite_for(recipe)
    except FinetuneError:
        log.info("no eval suite for recipe %s; skipping evaluation (set eval.suite to choose one)", recipe.name)
        return None


def train_parent_first(recipe: Recipe) -> None:
    """A recipe named by train.init_from is run (whole, as `finetune run` would) when its run is not finished."""
    from finetune import recipe as recipe_lib

    source = recipe.train.init_from
    if source is None or (runs.RunFolder(Path(source)).adapter / "adapter_config.json").is_file():
        return
    parent = recipe_lib.load(source)
    if not runs.RunFolder(parent.output_dir).finished:
        log.info("train.init_from: %s is not trained yet; running it first", parent.name)
        run(parent)


def run(recipe: Recipe, overwrite: bool = False) -> Outcome | None:
    """Run the recipe; returns what it wrote (None on the processes other than the main one)."""
    from finetune import eval as evaluation
    from finetune import gguf, merge

    methods.check(recipe)
    suite = eval_suite(recipe)
    train_parent_first(recipe)
    out = train.run(recipe, overwrite=overwrite)
    if not distributed.is_main():
        return None
    # Scored before merging: the merge's own parity check shows the merged model equals base + adapter.
    scores = evaluation.run(out, suite=suite, n=recipe.eval.n) if suite else None
    summary = runs.read_json(runs.RunFolder(out).summary)
    if scores and recipe.train.report_to:
        tracking.log_evaluation(recipe, out, scores, summary["steps"])
    merged = merge.merge(out, target=recipe.export.merge_target) if recipe.export.merge else None
    exported = gguf.export(out, recipe.export.gguf) if recipe.export.gguf else None
    return Outcome(out, summary, scores, merged, exported)
