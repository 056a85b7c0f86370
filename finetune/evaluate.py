"""evaluate.run(): score the base model and base + adapter on the recipe's eval suite, and report the difference.

A suite (evals/NAME.yaml, schema below) names tasks; each task reads rows through the same readers
as training (a reader + path + split, like a recipe's data source) and renders them with the same
prompts (formats.to_sft, the recipe's system prompt), so the model is asked exactly what it was
trained to answer.

- mcq rows (multiple choice and classification) are scored by the log-likelihood of each option
  label as the assistant's reply to the rendered prompt, with no parsing of generated text. The
  headline is `accuracy` (mean log-prob per option token, so a multi-token label is not penalised
  for its length); `accuracy_sum` (the raw sum) is reported beside it.
- qa rows (TAT-QA, ConvFinQA) are answered by greedy decoding and scored by exact match, token F1
  and numeric match (scale words, percent, commas and negatives in parentheses understood).

Base and adapter are scored on the same examples, so the 95% confidence interval of the delta is a
paired bootstrap over examples. A task whose whole interval lies below 0 is a regression.

The base model's scores are kept in the cache (FINETUNE_CACHE/eval) under a key made of everything
that changes them: the base weights' files, quantization and dtype, tokenizer and chat template, the
task, the exact prompts and the library versions. Every later run of the same suite on the same
base then scores the adapter alone, which halves the time of an experiment loop.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import random
import re
import string
import time
from collections import Counter
from contextlib import suppress
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finetune.data import formats
from finetune.data.build import read_source
from finetune.data.readers import READERS
from finetune.errors import FinetuneError
from finetune.recipe import PROJECT_ROOT, Recipe, SourceSection, _suggest, resolve_path

log = logging.getLogger(__name__)

# Bump when a change to scoring or generation changes what a model scores, so cached base scores are not reused.
SCORING_VERSION = 1
MCQ_METRICS = ("accuracy", "accuracy_sum")
QA_METRICS = ("numeric_match", "exact_match", "f1")


# ---------------------------------------------------------------- suite schema


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ShotsSource(Section):
    path: str = Field(..., description="File the demonstrations are read from (relative to the current folder, else the project).")
    reader: str = Field(..., description="Reader of that file (see `finetune data readers`); must yield the task's row kind.")
    split: str = Field("train", description="Split of that file (reader-defined, as in a recipe's data source).")
    columns: dict[str, str] = Field(default_factory=dict, description="Rename source fields: {reader_field: source_field}.")

    @field_validator("reader")
    @classmethod
    def _known_reader(cls, name: str) -> str:
        return _check_reader(name)


class Task(Section):
    reader: str = Field(..., description="Reader of the task's file: see `finetune data readers`.")
    path: str = Field(
        ...,
        description="Local file (relative to the current folder, else the project folder); a glob pattern "
        "(tasks/contract_nli_*/train.tsv) scores the rows of every matching file as one task.",
    )
    split: str = Field("train", description="Which split to read (reader-defined; pubmedqa: test = the official test PMIDs).")
    columns: dict[str, str] = Field(default_factory=dict, description="Rename source fields: {reader_field: source_field}.")
    n: int | None = Field(None, gt=0, description="Score at most this many rows (a seeded sample); all rows when absent.")
    metric: Literal["accuracy", "accuracy_sum", "numeric_match", "exact_match", "f1"] | None = Field(
        None,
        description="Headline metric. mcq rows: accuracy (option log-likelihood per token) or accuracy_sum (summed); "
        "qa rows: numeric_match, exact_match or f1. Default: accuracy for mcq, numeric_match for qa.",
    )
    shots: int = Field(0, ge=0, description="Demonstrations put before each question as earlier user/assistant turns.")
    shots_from: ShotsSource | Literal["same"] | None = Field(
        None,
        description="Where the demonstrations come from (needed when shots > 0); rows equal to a scored row are never used. "
        "`same`: each example's own file, leaving the example out, for files too small to hold out a pool (LegalBench's).",
    )
    max_new_tokens: int = Field(32, gt=0, description="qa rows: longest generated answer.")
    tolerance: float = Field(1e-3, ge=0, description="qa rows: relative tolerance of numeric_match.")

    @field_validator("reader")
    @classmethod
    def _known_reader(cls, name: str) -> str:
        return _check_reader(name)

    @model_validator(mode="after")
    def _consistent(self) -> Task:
        kind = READERS[self.reader].kind
        if kind not in ("mcq", "qa"):
            raise ValueError(f"reader {self.reader!r} yields {kind} rows; a task needs mcq or qa rows (multiple choice, classification or QA)")
        allowed = MCQ_METRICS if kind == "mcq" else QA_METRICS
        if self.metric is None:
            self.metric = allowed[0]
        elif self.metric not in allowed:
            raise ValueError(f"metric {self.metric!r} does not apply to {kind} rows; use one of {', '.join(allowed)}")
        if self.shots and self.shots_from is None:
            raise ValueError("shots > 0 needs shots_from: {path, reader, split} naming where the demonstrations come from")
        if isinstance(self.shots_from, ShotsSource) and READERS[self.shots_from.reader].kind != kind:
            raise ValueError(f"shots_from.reader {self.shots_from.reader!r} does not yield {kind} rows like the task's reader")
        return self

    @property
    def kind(self) -> str:
        return READERS[self.reader].kind


class Suite(Section):
    name: str = Field(..., description="Suite name (defaults to the file name).")
    description: str = Field("", description="One line about what the suite measures.")
    system_prompt: str | None = Field(None, description="System message for every prompt; default: the recipe's data.system_prompt, as in training.")
    seed: int = Field(0, description="Seed of the row sample (n), the demonstrations and the bootstrap.")
    bootstrap: int = Field(1000, ge=100, description="Bootstrap resamples for the 95% confidence interval of the delta.")
    batch_size: int = Field(8, gt=0, description="Sequences per forward pass (option scoring) or per generate call.")
    tasks: dict[str, Task] = Field(..., min_length=1, description="Task name -> task.")


def _check_reader(name: str) -> str:
    if name not in READERS:
        raise ValueError(f"unknown reader {name!r}{_suggest(name, READERS)}; known: {', '.join(sorted(READERS))}")
    return name


def _schema_fields(loc: tuple) -> list[str]:
    """Field names at an error's location, for the did-you-mean of an unknown key."""
    model: type[BaseModel] = Suite
    for part in loc[:-1]:
        if part == "tasks":
            model = Task
        elif part == "shots_from":
            model = ShotsSource
    return list(model.model_fields)


def _describe(error: dict) -> str:
    loc = error["loc"]
    where = ".".join(str(p) for p in loc) or "suite"
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key{_suggest(str(loc[-1]), _schema_fields(loc))}"
    if error["type"] == "missing":
        return f"{where}: required key is missing"
    return f"{where}: {error['msg'].removeprefix('Value error, ')}, got {error.get('input')!r}"


def suite_dirs() -> list[Path]:
    """Where suite names are looked up: ./evals first, then the project's own."""
    dirs = [Path.cwd() / "evals", PROJECT_ROOT / "evals"]
    return [d for i, d in enumerate(dirs) if d.is_dir() and d.resolve() not in [x.resolve() for x in dirs[:i]]]


def suite_names() -> list[str]:
    return sorted({p.stem for d in suite_dirs() for p in d.glob("*.yaml")})


def find_suite(name_or_path: str, given_as: str = "--suite") -> Path:
    """The suite file; `given_as` names where the name came from (the --suite option or a recipe's eval.suite)."""
    path = resolve_path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FinetuneError(f"{given_as} {name_or_path}: suite file not found; give a path to a .yaml file or a name from evals/")
        return path
    for d in suite_dirs():
        if (d / f"{name_or_path}.yaml").is_file():
            return d / f"{name_or_path}.yaml"
    raise FinetuneError(f"{given_as} {name_or_path}: no such eval suite{_suggest(name_or_path, suite_names())}; known: {', '.join(suite_names()) or 'none'} (evals/NAME.yaml)")


def load_suite(name_or_path: str, given_as: str = "--suite") -> Suite:
    """A suite by name (evals/NAME.yaml) or path, validated strictly."""
    path = find_suite(name_or_path, given_as)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise FinetuneError(f"{path}: invalid YAML: {getattr(e, 'problem', None) or str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise FinetuneError(f"{path}: a suite is a mapping with a 'tasks' section, got {type(data).__name__}")
    data.setdefault("name", path.stem)
    try:
        return Suite.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise FinetuneError(f"{path}: {_describe(errors[0])}{more}") from None


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
    raise FinetuneError(f"recipe {recipe.name}: no eval suite evals/{recipe.name}.yaml; pass --suite NAME (known: {', '.join(names) or 'none'})")


# ---------------------------------------------------------------- examples


def _source(task: Task | ShotsSource, path: str | None = None) -> SourceSection:
    return SourceSection(path=path or task.path, reader=task.reader, split=task.split, columns=task.columns)


def task_files(task: Task) -> list[str]:
    """The task's file, or every file its glob pattern matches (relative to the current folder, else the project)."""
    if not any(ch in task.path for ch in "*?["):
        return [task.path]
    pattern = Path(task.path).expanduser()
    if pattern.is_absolute():
        matches = sorted(glob.glob(str(pattern)))
    else:
        matches = next((found for root in (Path.cwd(), PROJECT_ROOT) if (found := sorted(str(p) for p in root.glob(task.path)))), [])
    if matches:
        return matches
    raise FinetuneError(f"eval task ({task.reader}, {task.path}): the pattern matches no file; check the path in the suite")


def conversation(row: dict, kind: str, system_prompt: str | None, shots: list[dict] = ()) -> list[dict]:
    """The messages before the answer: system, demonstrations as earlier turns, the row's own history and question.

    Built with formats.to_sft, so the prompt is byte-identical to a training row's; the row's
    answer turn is dropped. Demonstrations answer with the bare label (no rationale) because the
    label alone is what gets scored.
    """
    messages = formats.to_sft(row, kind, system_prompt)["messages"][:-1]
    demos = [m for shot in shots for m in formats.to_sft(shot, kind, None, with_explanation=False)["messages"]]
    head = 1 if messages and messages[0]["role"] == "system" else 0
    return messages[:head] + demos + messages[head:]


def examples(task: Task, system_prompt: str | None, seed: int = 0, n: int | None = None) -> list[dict]:
    """The task's scored examples: {id, messages (up to the question), options | answer, row}."""
    limit = min(x for x in (task.n, n) if x is not None) if (task.n or n) else None
    files = {path: read_source(_source(task, path), "error", seed)[1] for path in task_files(task)}
    rows = [(path, row) for path, file_rows in files.items() for row in file_rows]
    if not rows:
        raise FinetuneError(f"eval task ({task.reader}, {task.path}, split {task.split}): no rows; check the path and split in the suite")
    if limit is not None and len(rows) > limit:
        rows = random.Random(seed).sample(rows, limit)
    shared = demonstrations(task, [row for _, row in rows], seed) if isinstance(task.shots_from, ShotsSource) else []
    out = []
    for path, row in rows:
        shots = own_file_shots(task, files[path], row, seed) if task.shots_from == "same" else shared
        messages = conversation(row, task.kind, system_prompt, shots)
        item = {"id": row["id"], "messages": messages, "row": row}
        if task.kind == "mcq":
            item["options"] = list(row["options"])
            item["answer"] = row["answer"]
        else:
            item["answer"] = formats.qa_answer(row)
        out.append(item)
    return out


def _question(row: dict, kind: str) -> str:
    return json.dumps(formats.to_sft(row, kind)["messages"][:-1])


def demonstrations(task: Task, scored: list[dict], seed: int) -> list[dict]:
    """`shots` rows from shots_from, never one whose question is also scored."""
    if not task.shots:
        return []
    _, pool, _ = read_source(_source(task.shots_from), "error", seed)
    taken = {_question(r, task.kind) for r in scored}
    pool = [r for r in pool if _question(r, task.kind) not in taken]
    random.Random(seed).shuffle(pool)
    if len(pool) < task.shots:
        raise FinetuneError(f"eval task ({task.path}): shots: {task.shots} but shots_from {task.shots_from.path} has only {len(pool)} rows that are not scored; lower shots or n")
    return pool[: task.shots]


def own_file_shots(task: Task, file_rows: list[dict], row: dict, seed: int) -> list[dict]:
    """`shots` other rows of the example's own file (leave-one-out), drawn by a seed tied to the example."""
    question = _question(row, task.kind)
    pool = [r for r in file_rows if _question(r, task.kind) != question]
    if len(pool) < task.shots:
        raise FinetuneError(f"eval task ({task.path}): shots: {task.shots} but {row['id']}'s file has only {len(pool)} other rows; lower shots")
    return random.Random(f"{seed}-{row['id']}").sample(pool, task.shots)


# ---------------------------------------------------------------- option log-likelihood


def _encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def option_logprobs(model, tokenizer, prompts: list[list[int]], options: list[list[str]], batch_size: int = 8) -> list[list[tuple[float, int]]]:
    """(summed log-prob, token count) of every option as the continuation of its prompt's token ids.

    Options are tokenized on their own and appended to the prompt ids, so an option's tokens are the
    same whatever the prompt ends with. Each batch of prompts is run once, padded on the right, and
    its key/value cache is reused for every option: option j of every prompt is fed after the cache
    (padding masked out, positions continuing each prompt's own length), then the cache is cropped
    back to the prompts. An example with k options costs one prompt pass plus k passes over a few
    option tokens, instead of k passes over prompt + option.
    """
    from transformers import DynamicCache

    pad = tokenizer.pad_token_id
    option_ids = []
    for labels in options:
        encoded = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels]
        for label, ids in zip(labels, encoded):
            if not ids:
                raise FinetuneError(f"option {label!r} has no tokens; an option label must be non-empty text")
        option_ids.append(encoded)
    # Longest first: batches hold similar lengths (less padding) and an out-of-memory shows at once.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    scores = [[(0.0, 0)] * len(labels) for labels in options]
    device = model.device
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        lengths = torch.tensor([len(prompts[i]) for i in batch])
        width = int(lengths.max())
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(prompts[i])] = torch.tensor(prompts[i])
            mask[row, : len(prompts[i])] = 1
        cache = DynamicCache(config=model.config)
        first = int(lengths.min()) - 1  # earliest logit position any prompt's last token sits at
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), past_key_values=cache, use_cache=True, logits_to_keep=width - first).logits
        last = torch.log_softmax(logits[torch.arange(len(batch)), lengths - 1 - first].float(), dim=-1).cpu()
        for j in range(max(len(option_ids[i]) for i in batch)):
            rows = [(row, option_ids[i][j]) for row, i in enumerate(batch) if j < len(option_ids[i])]
            # The first option token is scored by the prompt's last logit; the rest need the option fed in.
            span = max(len(o) for _, o in rows) - 1
            if span:
                tail = torch.full((len(batch), span), pad, dtype=torch.long)
                tail_mask = torch.zeros((len(batch), span), dtype=torch.long)
                for row, o in rows:
                    tail[row, : len(o) - 1] = torch.tensor(o[:-1])
                    tail_mask[row, : len(o) - 1] = 1
                positions = lengths[:, None] + torch.arange(span)[None, :]
                out = model(
                    input_ids=tail.to(device), attention_mask=torch.cat([mask, tail_mask], dim=1).to(device),
                    position_ids=positions.to(device), past_key_values=cache, use_cache=True,
                )
                following = torch.log_softmax(out.logits.float(), dim=-1).cpu()
                cache.crop(-span)
            for row, o in rows:
                total = last[row, o[0]].item()
                if len(o) > 1:
                    total += following[row, torch.arange(len(o) - 1), torch.tensor(o[1:])].sum().item()
                scores[batch[row]][j] = (total, len(o))
    return scores


def choose(scores: list[tuple[float, int]], normalise: bool = True) -> int:
    """Index of the best option: by mean log-prob per token (normalise) or by the summed log-prob; first wins ties."""
    values = [total / count if normalise else total for total, count in scores]
    return max(range(len(values)), key=lambda k: values[k])


def score_mcq(model, tokenizer, items: list[dict], task: Task, batch_size: int) -> tuple[dict[str, list[float]], list[str]]:
    """Per-example accuracy (normalised and summed) and the option each example picks by the task's metric."""
    prompts = [_encode_prompt(tokenizer, it["messages"]) for it in items]
    scores = option_logprobs(model, tokenizer, prompts, [it["options"] for it in items], batch_size)
    per_example, picked = {"accuracy": [], "accuracy_sum": []}, []
    for it, option_scores in zip(items, scores):
        gold = it["options"].index(it["answer"])
        per_example["accuracy"].append(float(choose(option_scores, True) == gold))
        per_example["accuracy_sum"].append(float(choose(option_scores, False) == gold))
        picked.append(it["options"][choose(option_scores, task.metric == "accuracy")])
    return per_example, picked


# ---------------------------------------------------------------- generation


@torch.inference_mode()
def generate_batch(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy answers, batched with left padding so every prompt ends where generation starts.

    Prompts are batched longest first, so a batch holds similar lengths and little of the prefill
    is spent on padding; the answers come back in the order of `conversations`."""
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    answers = [""] * len(texts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            inputs = tokenizer([texts[i] for i in batch], add_special_tokens=False, padding=True, return_tensors="pt").to(model.device)
            output = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )
            new = output[:, inputs["input_ids"].shape[1] :]
            for i, text in zip(batch, tokenizer.batch_decode(new, skip_special_tokens=True)):
                answers[i] = text.strip()
    finally:
        tokenizer.padding_side = side
    return answers


def score_qa(model, tokenizer, items: list[dict], task: Task, batch_size: int) -> tuple[dict[str, list[float]], list[str]]:
    predictions = generate_batch(model, tokenizer, [it["messages"] for it in items], task.max_new_tokens, batch_size)
    per_example = {"numeric_match": [], "exact_match": [], "f1": []}
    for it, prediction in zip(items, predictions):
        per_example["exact_match"].append(exact_match(prediction, it["answer"]))
        per_example["f1"].append(token_f1(prediction, it["answer"]))
        per_example["numeric_match"].append(numeric_match(prediction, it["answer"], task.tolerance))
    return per_example, predictions


# ---------------------------------------------------------------- text metrics


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not wanted:
        return float(predicted == wanted)
    common = sum((Counter(predicted) & Counter(wanted)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


SCALES = {"thousand": 1e3, "thousands": 1e3, "k": 1e3, "million": 1e6, "millions": 1e6, "mn": 1e6, "m": 1e6,
          "billion": 1e9, "billions": 1e9, "bn": 1e9}
NUMBER = re.compile(
    r"(?P<open>\()?\s*(?P<sign>[-\u2212\u2013])?\s*[$\u20ac\u00a3]?\s*"
    r"(?P<digits>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"\s*(?P<close>\))?\s*(?P<scale>%|per\s?cent\b|percent\b|thousands?\b|millions?\b|billions?\b|bn\b|mn\b|k\b|m\b)?",
    re.IGNORECASE,
)


def parse_numbers(text: str) -> list[tuple[float, str, float]]:
    """Every number in the text as (value, unit, face value).

    unit is '%' for a percentage, 'scaled' when a scale word was multiplied in ('1.2 million' ->
    1200000, face 1.2), '' for a bare number; '(1,234)' and '-1,234' are negative; commas are dropped.
    """
    found = []
    for m in NUMBER.finditer(text):
        face = float(m["digits"].replace(",", ""))
        if m["sign"] or (m["open"] and m["close"]):
            face = -face
        scale = re.sub(r"\s", "", (m["scale"] or "").lower())
        if scale in ("%", "percent"):
            found.append((face, "%", face))
        elif scale:
            found.append((face * SCALES[scale], "scaled", face))
        else:
            found.append((face, "", face))
    return found


def _close(a: float, b: float, tolerance: float) -> bool:
    return math.isclose(a, b, rel_tol=tolerance, abs_tol=1e-9)


def numeric_match(prediction: str, gold: str, tolerance: float = 1e-3) -> float:
    """1.0 when the prediction's first number equals the gold's single number within the relative tolerance.

    Scale words are multiplied out on both sides ('1.2 million' == '1,200 thousand'); a percentage
    never matches a plain or scaled amount. A prediction with no scale word or % is also read in the
    gold's own unit ('48,210' for '48,210 thousand', '-15.61' for '-15.61%'), because the question
    usually leaves the table's unit implicit.
    Gold answers that are not one number (spans, several numbers) fall back to exact match.
    """
    wanted = parse_numbers(gold)
    if len(wanted) != 1:
        return exact_match(prediction, gold)
    gold_value, gold_unit, gold_face = wanted[0]
    got = parse_numbers(prediction)
    if not got:
        return 0.0
    value, unit, _ = got[0]
    if gold_unit == "%" or unit == "%":
        return float(unit in (gold_unit, "") and gold_unit == "%" and _close(value, gold_value, tolerance))
    if unit == "" and gold_unit == "scaled":
        return float(_close(value, gold_face, tolerance) or _close(value, gold_value, tolerance))
    return float(_close(value, gold_value, tolerance))


# ---------------------------------------------------------------- statistics


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def paired_bootstrap(base: list[float], adapter: list[float], resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of mean(adapter - base) over examples resampled with replacement."""
    if len(base) != len(adapter) or not base:
        raise ValueError("paired bootstrap needs two equally long, non-empty score lists")
    deltas = [a - b for a, b in zip(adapter, base)]
    rng = random.Random(seed)
    n = len(deltas)
    means = sorted(sum(deltas[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    low = means[int(math.floor(0.025 * (resamples - 1)))]
    high = means[int(math.ceil(0.975 * (resamples - 1)))]
    return low, high


def regressions(result: dict) -> list[str]:
    """Tasks whose whole 95% interval of the delta lies below zero."""
    return [name for name, task in result.get("tasks", {}).items() if task.get("regression")]


# ---------------------------------------------------------------- cached base scores


def _weights_fingerprint(source: str, recipe: Recipe) -> str | None:
    """What pins the base weights: a local folder's files (name, size, mtime), or a Hub id at a full commit hash.
    None for a Hub branch or tag, whose weights can change under the same name."""
    folder = Path(source)
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.is_file())
        return json.dumps([str(folder.resolve())] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files])
    revision = recipe.model.revision or ""
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return f"{source}@{revision}"
    return None


def base_cache_file(recipe: Recipe, tokenizer, task: Task, items: list[dict], batch_size: int) -> Path | None:
    """The file holding the base model's scores on exactly these prompts, or None when the base cannot be pinned."""
    from finetune import model as model_lib
    from finetune.data.build import tokenizer_fingerprint

    source, _ = model_lib.resolve(recipe.model)
    weights = _weights_fingerprint(source, recipe)
    if weights is None:
        return None
    digest = hashlib.sha256()
    for part in (
        str(SCORING_VERSION),
        weights,
        recipe.model.model_dump_json(include={"quantization", "double_quant", "attn_implementation"}),
        str(model_lib.compute_dtype(recipe.model)),
        model_lib.device(),
        json.dumps({name: _version(name) for name in ("torch", "transformers", "bitsandbytes")}, sort_keys=True),
        tokenizer_fingerprint(tokenizer),
        tokenizer.chat_template,
        task.model_dump_json(),
        str(batch_size),
        json.dumps([{k: it[k] for k in ("messages", "options", "answer") if k in it} for it in items], sort_keys=True),
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    return model_lib.cache_dir() / "eval" / f"base-{digest.hexdigest()[:24]}.json"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _read_cached(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a damaged entry is scored again and overwritten


def _write_cached(path: Path | None, scored: dict) -> None:
    if path is None:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(scored))
        tmp.replace(path)
    except OSError as e:  # a cache that cannot be written costs the next run time, never this run's report
        with suppress(OSError):
            tmp.unlink()
        log.warning("could not cache the base scores in %s (%s); the next evaluation scores the base again", path.parent, e.strerror or e)


def score_base(model, tokenizer, recipe: Recipe, name: str, task: Task, items: list[dict], batch_size: int, cache: bool) -> dict:
    """The base model's scores on a task, from the cache when the same base already scored the same prompts."""
    path = base_cache_file(recipe, tokenizer, task, items, batch_size) if cache else None
    cached = _read_cached(path)
    if cached is not None:
        log.info("base scores on %s reused from %s (same base weights, tokenizer, task and prompts)", name, path)
        return {**cached, "cached": True}
    log.info("scoring base on %s (%d examples)", name, len(items))
    scored = score_task(model, tokenizer, items, task, batch_size)
    _write_cached(path, scored)
    return scored


# ---------------------------------------------------------------- models and the run


def score_task(model, tokenizer, items: list[dict], task: Task, batch_size: int) -> dict:
    """Per-example scores of every metric for one model, plus its predictions (the picked option, or the answer)."""
    started = time.perf_counter()
    if task.kind == "mcq":
        per_example, predictions = score_mcq(model, tokenizer, items, task, batch_size)
    else:
        per_example, predictions = score_qa(model, tokenizer, items, task, batch_size)
    return {"per_example": per_example, "predictions": predictions, "seconds": time.perf_counter() - started}


def _summary(task: Task, items: list[dict], scored: dict[str, dict], resamples: int, seed: int) -> dict:
    """One task's entry in eval.json: headline scores, delta, paired CI, every metric per model."""
    metric = task.metric
    entry = {"n": len(items), "metric": metric, "kind": task.kind, "shots": task.shots}
    for label, result in scored.items():
        entry[label] = mean(result["per_example"][metric])
    entry["metrics"] = {label: {k: mean(v) for k, v in r["per_example"].items()} for label, r in scored.items()}
    entry["seconds"] = {label: round(r["seconds"], 2) for label, r in scored.items()}
    entry["cached"] = [label for label, r in scored.items() if r.get("cached")]
    entry["seconds_per_example"] = {label: round(r["seconds"] / len(items), 3) for label, r in scored.items()}
    if "adapter" in scored:
        base, adapter = scored["base"]["per_example"][metric], scored["adapter"]["per_example"][metric]
        entry["delta"] = entry["adapter"] - entry["base"]
        entry["ci95"] = list(paired_bootstrap(base, adapter, resamples, seed))
        entry["regression"] = entry["ci95"][1] < 0
    else:
        entry.update(adapter=None, delta=None, ci95=None, regression=False)
    if task.kind == "mcq":
        # How often each option is the answer and how often each model picks it: a model that
        # scores by always picking one label shows here before it shows anywhere else.
        entry["label_counts"] = {"gold": _counts(it["answer"] for it in items), **{label: _counts(r["predictions"]) for label, r in scored.items()}}
    else:
        entry["examples"] = [
            {"id": it["id"], "answer": it["answer"], **{label: r["predictions"][i] for label, r in scored.items()}}
            for i, it in enumerate(items)
        ]
    return entry


def _counts(labels) -> dict[str, int]:
    return dict(sorted(Counter(labels).items(), key=lambda kv: (-kv[1], kv[0])))


def _load_merged(folder: Path, recipe: Recipe):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune import model as model_lib

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=model_lib.compute_dtype(recipe.model), use_safetensors=True)
    model.to(model_lib.device())
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model_lib.ensure_pad_token(tokenizer)
    return model, tokenizer


def _target(target) -> tuple[Recipe, Path | None, Path]:
    """(recipe, run folder or None for a bare recipe, folder the report goes to)."""
    from finetune import inference, recipe as recipe_lib

    path = Path(target)
    if path.is_dir() and (path / "recipe.yaml").is_file():
        return inference.run_recipe(path), path, path
    if path.is_dir():
        raise FinetuneError(f"{target}: not a run folder (no recipe.yaml) and not a recipe; give a finished run folder or a recipe name")
    recipe = recipe_lib.load(str(target))
    # A bare recipe scores the base model only; its report goes beside (not into) the run's own eval.json.
    return recipe, None, recipe.output_dir / "base-eval"


def run(target, suite: str | None = None, n: int | None = None, cache: bool = True) -> dict:
    """Score base (and base + adapter, and RUN_DIR/merged when present) on a suite; write eval.json/.md/.png.

    `target` is a finished run folder (recipe.yaml + adapter/) or a recipe name/path (base only).
    `suite` defaults to the suite named like the recipe; `n` caps every task's example count.
    `cache` reuses the base model's scores from an earlier evaluation of the same prompts (see above).
    """
    from finetune import inference, model as model_lib

    recipe, run_dir, out = _target(target)
    chosen = load_suite(suite or suite_for(recipe))
    system_prompt = chosen.system_prompt or recipe.data.system_prompt
    tasks = {name: (task, examples(task, system_prompt, chosen.seed, n)) for name, task in chosen.tasks.items()}
    log.info("eval suite %s: %s", chosen.name, ", ".join(f"{name} ({len(items)})" for name, (_, items) in tasks.items()))

    scored: dict[str, dict[str, dict]] = {name: {} for name in tasks}
    if run_dir is not None:
        if not (run_dir / "adapter" / "adapter_config.json").is_file():
            raise FinetuneError(f"{run_dir}: the run has no finished adapter (adapter/ is missing); finish it with `finetune run`, or evaluate the recipe for the base only")
        model, tokenizer = inference.load_run(run_dir)
        with model.disable_adapter():
            for name, (task, items) in tasks.items():
                scored[name]["base"] = score_base(model, tokenizer, recipe, name, task, items, chosen.batch_size, cache)
        for name, (task, items) in tasks.items():
            log.info("scoring adapter on %s (%d examples)", name, len(items))
            scored[name]["adapter"] = score_task(model, tokenizer, items, task, chosen.batch_size)
        del model
        merged = run_dir / "merged"
        if (merged / "config.json").is_file():
            model, tokenizer = _load_merged(merged, recipe)
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
        "target": str(target),
        "recipe": recipe.name,
        "model": recipe.model.base,
        "system_prompt": system_prompt,
        "device": model_lib.device(),
        "bootstrap": {"resamples": chosen.bootstrap, "seed": chosen.seed},
        "tasks": {name: _summary(task, items, scored[name], chosen.bootstrap, chosen.seed) for name, (task, items) in tasks.items()},
    }
    write_report(result, out)
    for name in regressions(result):
        log.warning("REGRESSION on %s: the adapter scores below the base (95%% CI of the delta %s)", name, _ci(result["tasks"][name]["ci95"]))
    return result


# ---------------------------------------------------------------- report


def _ci(ci) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "–"


def _score(value) -> str:
    return f"{value:.3f}" if value is not None else "–"


def table(result: dict) -> str:
    """The Markdown table of eval.md (the CLI prints it)."""
    has_merged = any("merged" in t for t in result["tasks"].values())
    head = ["task", "metric", "n", "base", "adapter", *(["merged"] if has_merged else []), "delta", "95% CI of delta", ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---", "---:", "---:", "---:", *(["---:"] if has_merged else []), "---:", "---", "---"]) + "|"]
    for name, t in result["tasks"].items():
        delta = f"{t['delta']:+.3f}" if t["delta"] is not None else "–"
        cells = [name, t["metric"], str(t["n"]), _score(t["base"]), _score(t["adapter"]), *([_score(t.get("merged"))] if has_merged else []),
                 delta, _ci(t["ci95"]), "**REGRESSION**" if t["regression"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    b = result["bootstrap"]
    lines = [
        f"# Evaluation: suite `{result['suite']}` on `{result['target']}`",
        "",
        table(result),
        "",
        f"Scores are fractions of examples (accuracy: option log-likelihood per token; accuracy_sum: summed; "
        f"qa: greedy answers). The 95% interval is a paired bootstrap of the delta over examples "
        f"({b['resamples']} resamples, seed {b['seed']}); REGRESSION marks an interval entirely below 0.",
    ]
    picks = [
        f"- `{name}`: " + "; ".join(f"{who} " + ", ".join(f"{option} {count}" for option, count in counts.items()) for who, counts in t["label_counts"].items())
        for name, t in result["tasks"].items() if "label_counts" in t
    ]
    if picks:
        lines += ["", "Options picked (gold = how often each is the answer):", "", *picks]
    reused = [name for name, t in result["tasks"].items() if "base" in t.get("cached", [])]
    if reused:
        lines += ["", f"Base scores of {', '.join(reused)} were reused from an earlier evaluation of the same base on the same prompts (`finetune eval --no-cache` scores them again)."]
    found = regressions(result)
    if found:
        lines += ["", f"**Warning: the adapter regresses on {', '.join(found)}.**"]
    return "\n".join(lines) + "\n"


def plot(result: dict, target: Path) -> Path:
    """eval.png: base vs adapter per task, the adapter bar carrying the 95% interval of the delta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["tasks"])
    rows = [result["tasks"][n] for n in names]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(names) + 2), 4.0), dpi=100)
    ax.bar([i - 0.2 for i in x], [r["base"] for r in rows], width=0.4, label="base", color="tab:gray")
    if all(r["adapter"] is not None for r in rows):
        low = [r["delta"] - r["ci95"][0] for r in rows]
        high = [r["ci95"][1] - r["delta"] for r in rows]
        colors = ["tab:red" if r["regression"] else "tab:blue" for r in rows]
        ax.bar([i + 0.2 for i in x], [r["adapter"] for r in rows], width=0.4, yerr=[low, high], capsize=4, label="adapter (95% CI of delta)", color=colors)
    ax.set_xticks(list(x), [f"{n}\n({r['metric']}, n={r['n']})" for n, r in zip(names, rows)], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title(f"eval suite {result['suite']}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(target)
    plt.close(fig)
    return target


def write_report(result: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(folder / "eval.json")
    (folder / "eval.md").write_text(markdown(result))
    plot(result, folder / "eval.png")
    log.info("wrote %s, eval.md, eval.png", folder / "eval.json")
