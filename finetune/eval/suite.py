"""Eval suites: the schema of evals/NAME.yaml (tasks that read rows through the training readers) and finding one."""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field, model_validator

from finetune import config
from finetune.config import Section
from finetune.data.readers import READERS
from finetune.errors import FinetuneError
from finetune.recipe import ReaderInput, Recipe

log = logging.getLogger(__name__)

MCQ_METRICS = ("accuracy", "accuracy_sum")
QA_METRICS = ("numeric_match", "exact_match", "f1")
TEXT_METRICS = ("perplexity",)
METRICS = {"mcq": MCQ_METRICS, "qa": QA_METRICS, "text": TEXT_METRICS}


class ShotsSource(ReaderInput):
    """Where a task's demonstrations come from (path: relative to the current folder, else the project)."""

    reader: str = Field(..., description="Reader of that file; it must yield the task's row kind.")

    @model_validator(mode="after")
    def _has_path(self) -> ShotsSource:
        if self.path is None:
            raise ValueError("shots_from needs a path: the file the demonstrations are read from")
        return self


class Task(ReaderInput):
    """A scored task: `path` may be a glob pattern (tasks/contract_nli_*/train.tsv), whose files count as one task."""

    reader: str = Field(..., description="Reader of the task's file: see `finetune data readers`.")
    n: int | None = Field(
        None, gt=0, description="Score at most this many rows (a seeded sample); all rows when absent."
    )
    metric: Literal["accuracy", "accuracy_sum", "numeric_match", "exact_match", "f1", "perplexity"] | None = Field(
        None,
        description="Headline metric. mcq rows: accuracy (option log-likelihood per token) or accuracy_sum (summed); "
        "qa rows: numeric_match, exact_match or f1; text rows (documents): perplexity, lower is better. Default: "
        "accuracy for mcq, numeric_match for qa, perplexity for text.",
    )
    shots: int = Field(0, ge=0, description="Demonstrations put before each question as earlier user/assistant turns.")
    shots_from: ShotsSource | Literal["same"] | None = Field(
        None,
        description="Where the demonstrations come from (needed when shots > 0); rows equal to a scored row are never "
        "used. "
        "`same`: each example's own file, leaving the example out, for files too small to hold out a pool "
        "(LegalBench's).",
    )
    max_new_tokens: int = Field(32, gt=0, description="qa rows: longest generated answer.")
    tolerance: float = Field(1e-3, ge=0, description="qa rows: relative tolerance of numeric_match.")
    max_length: int = Field(
        1024, gt=1, description="text rows: a document longer than this many tokens is scored in windows this long."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Task:
        if self.path is None:
            raise ValueError("a task needs a path: the file (or glob pattern) its rows are read from")
        kind = READERS[self.reader].kind
        if kind not in METRICS:
            raise ValueError(
                f"reader {self.reader!r} yields {kind} rows; a task needs mcq, qa or text rows (multiple choice, "
                "classification, QA, or documents scored by perplexity)"
            )
        allowed = METRICS[kind]
        if self.metric is None:
            self.metric = allowed[0]
        elif self.metric not in allowed:
            raise ValueError(f"metric {self.metric!r} does not apply to {kind} rows; use one of {', '.join(allowed)}")
        if self.shots and kind == "text":
            raise ValueError("shots do not apply to text rows: a document is scored on its own; remove shots")
        if self.shots and self.shots_from is None:
            raise ValueError(
                "shots > 0 needs shots_from: {path, reader, split} naming where the demonstrations come from"
            )
        if isinstance(self.shots_from, ShotsSource) and READERS[self.shots_from.reader].kind != kind:
            raise ValueError(
                f"shots_from.reader {self.shots_from.reader!r} does not yield {kind} rows like the task's reader"
            )
        return self

    @property
    def kind(self) -> str:
        return READERS[self.reader].kind


class Suite(Section):
    name: str = Field(..., description="Suite name (defaults to the file name).")
    description: str = Field("", description="One line about what the suite measures.")
    note: str = Field("", description="Printed under the results table: what these scores can and cannot show.")
    system_prompt: str | None = Field(
        None, description="System message for every prompt; default: the recipe's data.system_prompt, as in training."
    )
    seed: int = Field(0, description="Seed of the row sample (n), the demonstrations and the bootstrap.")
    bootstrap: int = Field(
        1000, ge=100, description="Bootstrap resamples for the 95% confidence interval of the delta."
    )
    batch_size: int = Field(8, gt=0, description="Sequences per forward pass (option scoring) or per generate call.")
    tasks: dict[str, Task] = Field(..., min_length=1, description="Task name -> task.")


KIND = config.Kind(noun="eval suite", folder="evals", schema=Suite, needs="a 'tasks' section")


def suite_names() -> list[str]:
    return config.names(KIND)


def load_suite(name_or_path: str, given_as: str = "--suite", overrides: list[str] = ()) -> Suite:
    """A suite by name (evals/NAME.yaml) or path, `extends:` resolved, validated strictly."""
    return config.load(KIND, name_or_path, overrides, given_as)


def suite_for(recipe: Recipe) -> str:
    """The suite named like the recipe, else the one suite whose name is a dash-separated word of it
    (llama-3.2-1b-medical-lora -> medical), so GPU variants of a domain recipe find its suite."""
    names = suite_names()
    if recipe.name in names:
        return recipe.name
    words = [n for n in names if n in recipe.name.split("-")]
    if len(words) == 1:
        log.info("recipe %s: using eval suite %s", recipe.name, words[0])
        return words[0]
    raise FinetuneError(
        f"recipe {recipe.name}: no eval suite evals/{recipe.name}.yaml; pass --suite NAME (known: "
        f"{', '.join(names) or 'none'})"
    )
