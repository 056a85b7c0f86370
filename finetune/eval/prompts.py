"""An eval task's examples: its rows read through the training readers and rendered exactly as training renders them,
with demonstrations (shots) as earlier turns."""

from __future__ import annotations

import glob
import json
import random
from pathlib import Path

from finetune.config import PROJECT_ROOT
from finetune.data import formats
from finetune.data.build import read_source
from finetune.errors import FinetuneError
from finetune.eval.suite import ShotsSource, Task
from finetune.recipe import SourceSection


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
        matches = next(
            (found for root in (Path.cwd(), PROJECT_ROOT) if (found := sorted(str(p) for p in root.glob(task.path)))),
            [],
        )
    if matches:
        return matches
    raise FinetuneError(
        f"eval task ({task.reader}, {task.path}): the pattern matches no file; check the path in the suite"
    )


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
    """The task's scored examples: {id, messages (up to the question), options | answer, row}; documents (text rows):
    {id, text, row}."""
    limit = min(x for x in (task.n, n) if x is not None) if (task.n or n) else None
    files = {path: read_source(_source(task, path), "error", seed)[1] for path in task_files(task)}
    rows = [(path, row) for path, file_rows in files.items() for row in file_rows]
    if not rows:
        raise FinetuneError(
            f"eval task ({task.reader}, {task.path}, split {task.split}): no rows; check the path and split in the "
            "suite"
        )
    if limit is not None and len(rows) > limit:
        rows = random.Random(seed).sample(rows, limit)
    shared = demonstrations(task, [row for _, row in rows], seed) if isinstance(task.shots_from, ShotsSource) else []
    if task.kind == "text":
        return [{"id": row["id"], "text": row["text"], "row": row} for _, row in rows]
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
        raise FinetuneError(
            f"eval task ({task.path}): shots: {task.shots} but shots_from {task.shots_from.path} has only {len(pool)} "
            "rows that are not scored; lower shots or n"
        )
    return pool[: task.shots]


def own_file_shots(task: Task, file_rows: list[dict], row: dict, seed: int) -> list[dict]:
    """`shots` other rows of the example's own file (leave-one-out), drawn by a seed tied to the example."""
    question = _question(row, task.kind)
    pool = [r for r in file_rows if _question(r, task.kind) != question]
    if len(pool) < task.shots:
        raise FinetuneError(
            f"eval task ({task.path}): shots: {task.shots} but {row['id']}'s file has only {len(pool)} other rows; "
            "lower shots"
        )
    return random.Random(f"{seed}-{row['id']}").sample(pool, task.shots)
