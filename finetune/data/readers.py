"""The reader registry: each reader turns one source format into common rows (see formats.py).

A reader has two parts: `records(source)` yields the source's raw records as (where, record),
and `convert(record, where, source)` turns one record into a row of the reader's `kind`, raising
FinetuneError (via formats.bad_row) when the record is malformed, so `data.on_bad_row: skip`
can skip exactly that record. Bump `version` whenever a reader's output changes: it is part of
the tokenized-cache key.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from finetune.config import suggest
from finetune.data import files
from finetune.errors import FinetuneError


@dataclass(frozen=True)
class RawSource:
    """Where a reader's raw records come from: a recipe's data.sources[] entry (or an eval task), path resolved."""

    path: Path | None
    hub: str | None = None
    config: str | None = None
    split: str = "train"
    columns: dict[str, str] = field(default_factory=dict)

    def records(self, header: bool = True) -> Iterator[tuple[str, dict]]:
        raw = files.hub_records(self.hub, self.config, self.split) if self.hub else files.records(self.path, header)
        for where, record in raw:
            yield where, files.rename(record, self.columns, where) if isinstance(record, dict) else record

    @property
    def name(self) -> str:
        return self.hub or str(self.path)


@dataclass(frozen=True)
class Reader:
    name: str
    kind: str  # the row kind it yields: sft | mcq | qa | preference
    records: Callable[[RawSource], Iterator[tuple[str, dict]]]
    convert: Callable[[dict, str, RawSource], dict]
    description: str
    card: str = ""  # datasets/<card>, the source's origin, license and schema
    license: str = ""
    commercial_use: bool = True
    version: int = 1
    hub: str = ""  # the data set's Hugging Face Hub id, for model cards' model-index


def default_records(source: RawSource) -> Iterator[tuple[str, dict]]:
    yield from source.records()


READERS: dict[str, Reader] = {}


def reader(name: str, kind: str, records=default_records, card: str = "", license: str = "", **flags):
    """Register the decorated convert function as reader `name`; the first paragraph of its docstring is the
    description `finetune data readers` shows."""

    def register(convert: Callable[[dict, str, RawSource], dict]):
        description = " ".join(inspect.getdoc(convert).split("\n\n")[0].split())
        READERS[name] = Reader(name, kind, records, convert, description, card, license, **flags)
        return convert

    return register


FILE_SPLITS = ("train", "validation", "all")


def in_validation(key: str) -> bool:
    """Whether a record belongs to its file's validation part: a fixed fifth of the records, chosen by the hash of a
    stable key (a PMID, a contract, a report), so the part never moves with the file's order or a seed."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 5 == 0


def check_split(source: RawSource, reader: str, splits: tuple[str, ...] = FILE_SPLITS) -> None:
    """An unknown split name is an error naming the ones the reader has."""
    if source.split not in splits:
        raise FinetuneError(f"data.sources[].split: {reader} has splits {', '.join(splits)}, got {source.split!r}")


def in_split(split: str, key: str) -> bool:
    """Whether the record with this key is in a split of its file: train (the file less its validation part),
    validation, or all."""
    return split == "all" or in_validation(key) == (split == "validation")


def check_reader(name: str) -> str:
    """A schema validator's check of a reader name: a ValueError with a did-you-mean for an unknown one."""
    if name not in READERS:
        raise ValueError(f"unknown reader {name!r}{suggest(name, READERS)}; known: {', '.join(sorted(READERS))}")
    return name


@reader("messages", "sft", card="formats.md")
def _messages(record: dict, where: str, source: RawSource) -> dict:
    """Chat rows: {messages: [{role, content}, ...]} in JSONL, JSON, parquet or a Hub data set."""
    return {"messages": record.get("messages")}


# Domain readers register themselves on import.
from finetune.data import (  # noqa: E402,F401
    finance,
    general,
    legal,
    medical,  # noqa: E402,F401
)
