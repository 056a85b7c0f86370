"""Cached base-model scores: kept under FINETUNE_CACHE/eval, keyed by everything that changes them, so an
experiment loop on the same base scores only the adapter."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

from finetune import runs
from finetune.eval.scoring import score_task
from finetune.eval.suite import Task
from finetune.recipe import Recipe

log = logging.getLogger(__name__)

# Bump when a change to scoring or generation changes what a model scores, so cached base scores are not reused.
SCORING_VERSION = 1


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
        json.dumps(runs.versions(), sort_keys=True),
        tokenizer_fingerprint(tokenizer),
        tokenizer.chat_template,
        task.model_dump_json(),
        str(batch_size),
        json.dumps(
            [{k: it[k] for k in ("messages", "options", "answer", "text") if k in it} for it in items], sort_keys=True
        ),
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    return model_lib.cache_dir() / "eval" / f"base-{digest.hexdigest()[:24]}.json"


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
    try:
        with runs.staged(path) as tmp:
            tmp.write_text(json.dumps(scored))
    except OSError as e:  # a cache that cannot be written costs the next run time, never this run's report
        log.warning(
            "could not cache the base scores in %s (%s); the next evaluation scores the base again",
            path.parent,
            e.strerror or e,
        )


def score_base(
    model, tokenizer, recipe: Recipe, name: str, task: Task, items: list[dict], batch_size: int, cache: bool
) -> dict:
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
