"""finetune sweep: train each variant of a recipe, pick one by its validation score, score the test suite once.

Variants are the combinations of a grid of recipe keys (the recipe's `sweep:` section, plus --grid on the
command line). Each trains in its own run folder under the sweep folder and is scored on the validation suite
(its report in VARIANT/validation/), so nothing is chosen by looking at the test set. While selecting, the
`select_with` overrides may train on a subset; the winner is then trained again without them (final/) and scored on
the validation suite too, so the model that is reported has a validation score of its own. Only that one model is
scored on the test suite. A rerun skips what is finished and resumes what is not.

    SWEEP_DIR/sweep.json   every variant's overrides, validation score and CI, steps, wall time, peak memory;
                           the winner, its final run's validation score, and its test scores
    SWEEP_DIR/sweep.md     the same as tables; SWEEP_DIR/sweep.png the validation scores with their intervals
"""

from __future__ import annotations

import itertools
import logging
import re
from pathlib import Path

import yaml

from finetune import config, pipeline, plots, runs, train
from finetune.errors import FinetuneError
from finetune.eval.metrics import lower_is_better
from finetune.recipe import KIND as RECIPE
from finetune.recipe import Recipe

log = logging.getLogger(__name__)


def parse_grid(items: list[str]) -> dict[str, list]:
    """--grid KEY=V1,V2 arguments as {key: [values]}; each value is read as YAML (1e-4 is a number, true a bool)."""
    grid = {}
    for item in items:
        key, sep, raw = item.partition("=")
        values = [v.strip() for v in raw.split(",")] if sep else []
        if not key or not all(values):
            raise FinetuneError(f"--grid {item!r}: expected KEY=V1,V2 (e.g. train.learning_rate=1e-4,2e-4)")
        try:
            grid[key] = [yaml.safe_load(v) for v in values]
        except yaml.YAMLError:
            raise FinetuneError(f"--grid {item!r}: a value is not valid YAML; quote text values") from None
    return grid


def _override(key: str, value) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def variants(grid: dict[str, list]) -> list[tuple[str, list[str]]]:
    """Every combination of the grid as (name, overrides), in grid order (the first key varies slowest)."""
    return [
        (variant_name(grid, combo), [_override(k, v) for k, v in zip(grid, combo)])
        for combo in itertools.product(*grid.values())
    ]


def variant_name(grid: dict[str, list], combo: tuple) -> str:
    """A folder name that says what the variant is: learning_rate=0.0001,epochs=3; a list or mapping value (a set of
    data sources) is named by its place in the grid: sources=2."""
    parts = []
    for (key, values), value in zip(grid.items(), combo):
        shown = f"{values.index(value) + 1}" if isinstance(value, (list, dict)) else str(value)
        parts.append(f"{key.rsplit('.', 1)[-1]}={shown}")
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts))[:120]


def _variant_recipe(data: dict, origin: str, overrides: list[str], name: str, output_dir: Path) -> Recipe:
    """The base recipe's mapping with overrides applied, validated, writing into output_dir (no merge, no GGUF)."""
    extra = [f"train.output_dir={output_dir}", "export.merge=false", "export.gguf=null"]
    recipe = config.validate(RECIPE.schema, config.apply_overrides(data, [*overrides, *extra]), f"{origin} ({name})")
    return recipe


def plan(name_or_path: str, overrides: list[str], grid_args: list[str]) -> dict:
    """Everything a sweep will do, checked before anything is trained: a bad grid, key, value or suite is one line."""
    from finetune.eval import load_suite

    path = config.find(RECIPE, name_or_path)
    data = config.load_tree(RECIPE, path)
    data.setdefault("name", path.stem)
    data = config.apply_overrides(data, overrides)
    base = config.validate(RECIPE.schema, data, config.shown(path))
    section = base.sweep
    grid = {**(section.grid if section else {}), **parse_grid(grid_args)}
    if not grid:
        raise FinetuneError(f"sweep {base.name}: the grid is empty; give --grid KEY=V1,V2 or a sweep.grid section")
    empty = [key for key, values in grid.items() if not values]
    if empty:
        raise FinetuneError(f"sweep.grid.{empty[0]}: no values to try; give a list such as [1e-4, 2e-4]")
    if section is None or section.validation is None:
        raise FinetuneError(f"sweep {base.name}: sweep.validation is not set; name the suite that picks the winner")
    validation = load_suite(section.validation, given_as="sweep.validation")
    task = section.task or next(iter(validation.tasks))
    if task not in validation.tasks:
        known = ", ".join(validation.tasks)
        raise FinetuneError(
            f"sweep.task: {task!r} is not a task of {validation.name}{config.suggest(task, validation.tasks)}; "
            f"known: {known}"
        )
    test = section.test or (base.eval.suite if base.eval.suite not in (None, "auto") else None)
    if test is not None:
        load_suite(test, given_as="sweep.test")
    root = Path(section.output_dir.format(name=base.name))
    data.pop("sweep", None)
    items = []
    for name, variant in variants(grid):
        recipe = _variant_recipe(data, config.shown(path), [*section.select_with, *variant], name, root / name)
        items.append({"name": name, "overrides": variant, "recipe": recipe})
    final = None
    if section.select_with:
        final = {"data": data, "origin": config.shown(path), "folder": root / "final"}
    runs.check_writable(root)
    return {
        "base": base,
        "root": root,
        "variants": items,
        "validation": section.validation,
        "task": task,
        "n": section.n,
        "test": test,
        "final": final,
        "select_with": section.select_with,
    }


def _validated(recipe: Recipe, suite: str, n: int | None) -> dict:
    """The variant trained (or resumed, or found finished) and scored on the validation suite (reused when done)."""
    from finetune import eval as evaluation

    folder = runs.RunFolder(recipe.output_dir)
    if not folder.finished:
        train.run(recipe)
    report = runs.read_json(folder.root / "validation" / "eval.json")
    if report is None or report.get("suite_file") != suite or report.get("n_cap") != n:
        report = evaluation.run(folder.root, suite=suite, n=n, output=folder.root / "validation")
        report.update(suite_file=suite, n_cap=n)
        runs.write_json(folder.root / "validation" / "eval.json", report)
    return report


def _scored(recipe: Recipe, report: dict, chosen: dict) -> dict:
    """One trained model's row: its validation score on the sweep's task, and what its training cost."""
    summary = runs.read_json(runs.RunFolder(recipe.output_dir).summary)
    task = report["tasks"][chosen["task"]]
    return {
        "run_dir": str(recipe.output_dir),
        "metric": task["metric"],
        "n": task["n"],
        "groups": task.get("groups", task["n"]),
        "base": task["base"],
        "score": task["adapter"],
        "delta": task["delta"],
        "ci95": task["ci95"],
        "steps": summary["steps"],
        "wall_time_s": summary["wall_time_s"],
        "peak_rss_mb": summary["peak_rss_mb"],
        "validation": {name: t["adapter"] for name, t in report["tasks"].items()},
    }


def run(name_or_path: str, overrides: list[str] = (), grid_args: list[str] = ()) -> dict:
    """Run the sweep; returns what sweep.json holds."""
    from finetune import eval as evaluation

    chosen = plan(name_or_path, list(overrides), list(grid_args))
    rows = []
    for item in chosen["variants"]:
        log.info("sweep: variant %s", item["name"])
        report = _validated(item["recipe"], chosen["validation"], chosen["n"])
        rows.append(
            {"variant": item["name"], "overrides": item["overrides"], **_scored(item["recipe"], report, chosen)}
        )
    # The first of equals wins: grid order.
    winner = (min if lower_is_better(rows[0]["metric"]) else max)(rows, key=lambda r: r["score"])
    log.info("sweep: %s wins on validation (%s %.3f)", winner["variant"], winner["metric"], winner["score"])
    if chosen["final"]:
        final = chosen["final"]
        recipe = _variant_recipe(final["data"], final["origin"], winner["overrides"], "final", final["folder"])
        recipe.eval.suite = chosen["test"]
        final_dir = recipe.output_dir
        if not runs.RunFolder(final_dir).finished:
            pipeline.run(recipe)
        elif chosen["test"] and not runs.RunFolder(final_dir).eval_json.is_file():
            evaluation.run(final_dir, suite=chosen["test"])
        final_validation = _scored(recipe, _validated(recipe, chosen["validation"], chosen["n"]), chosen)
    else:
        final_validation = None
        final_dir = Path(winner["run_dir"])
        if chosen["test"] and not runs.RunFolder(final_dir).eval_json.is_file():
            evaluation.run(final_dir, suite=chosen["test"])
    result = {
        "recipe": chosen["base"].name,
        "validation": chosen["validation"],
        "task": chosen["task"],
        "select_with": chosen["select_with"],
        "variants": rows,
        "winner": winner["variant"],
        "final_run": str(final_dir),
        "final_validation": final_validation,
        "test": chosen["test"],
        "test_scores": runs.read_json(runs.RunFolder(final_dir).eval_json) if chosen["test"] else None,
    }
    write_report(result, chosen["root"])
    return result


def markdown(result: dict) -> str:
    """sweep.md: the validation table (winner marked), then the winner's test table."""
    from finetune.eval import table
    from finetune.eval.report import count

    lines = [
        f"# Sweep of `{result['recipe']}`",
        "",
        f"Variants scored on `{result['validation']}`, task `{result['task']}`; the winner (**bold**) alone is "
        "scored on the test suite.",
        "",
    ]
    if result["select_with"]:
        lines += [
            f"While selecting, every variant trained with `{' '.join(result['select_with'])}`; the winner was "
            "then trained again without it, and that final model scored on validation too (last row).",
            "",
        ]
    lines += [
        "| variant | metric | n | base | adapter | delta | 95% CI of delta | steps | wall time | peak RSS |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    final = result.get("final_validation")
    named = [
        (f"**{r['variant']}**" if r["variant"] == result["winner"] else r["variant"], r) for r in result["variants"]
    ]
    for name, r in named + ([(f"{result['winner']}, trained without the subset (final)", final)] if final else []):
        ci = f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]"
        lines.append(
            f"| {name} | {r['metric']} | {count(r)} | {r['base']:.3f} | {r['score']:.3f} | {r['delta']:+.3f} | "
            f"{ci} | {r['steps']} | {r['wall_time_s'] / 60:.0f} min | {r['peak_rss_mb'] / 1024:.1f} GB |"
        )
    if result["test_scores"]:
        lines += [
            "",
            f"Test (`{result['test']}`), the winner only ({result['final_run']}):",
            "",
            table(result["test_scores"]),
        ]
    return "\n".join(lines) + "\n"


def write_report(result: dict, root: Path) -> None:
    runs.write_report(root, "sweep", result, markdown(result), plots.plot_sweep)
