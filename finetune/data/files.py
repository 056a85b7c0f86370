"""Read raw records from local files (.json .jsonl .jsonl.gz .json.gz .csv .tsv .parquet) or the Hub.

Records come out as (where, dict) pairs; `where` names the file and record for error lines.
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

from finetune.errors import FinetuneError, first_line

TEXT_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt")


def suffix(path: Path) -> str:
    """The format suffix, with a trailing .gz ignored: data.jsonl.gz -> .jsonl."""
    return Path(path.name.removesuffix(".gz")).suffix.lower()


def read_text(path: Path) -> str:
    """File text in UTF-8, else Latin-1 (several public finance and legal files are Latin-1)."""
    if not path.is_file():
        raise FinetuneError(
            f"{path}: file not found; check data.sources[].path (relative paths start at the project folder)"
        )
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # a bad header is OSError, damaged data zlib.error
            raise FinetuneError(f"{path}: not a valid gzip file ({e}); re-download or decompress it") from None
    if not raw:
        raise FinetuneError(f"{path}: the file is empty; check data.sources[].path or re-download the file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        text = raw.decode("latin-1")
        controls = sum(1 for ch in text if ord(ch) < 32 and ch not in "\t\r\n" or 0x7F <= ord(ch) < 0xA0)
        if "\x00" in text or controls > len(text) / 1000:
            raise FinetuneError(
                f"{path}: byte {e.start} is neither UTF-8 nor Latin-1 text; save the file as UTF-8"
            ) from None
        return text


def local_path(path: Path | None, hub: str | None, reader: str) -> Path:
    """The local file of a reader that parses an upstream release's own layout (not a Hub data set's)."""
    if path is None:
        raise FinetuneError(
            f"data.sources[].hub: {hub}: the {reader} reader reads the upstream release files, not a Hub data set; "
            "download them and set data.sources[].path instead"
        )
    return path


def parse_json(path: Path):
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FinetuneError(
            f"{path}:{e.lineno}: invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno}); fix or re-download "
            "the file"
        ) from None


# Lines of a JSONL file that are not JSON objects, collected instead of raised while data.on_bad_row is skip.
# A context variable, because records() is a generator that readers wrap: the error cannot be caught and resumed.
_bad_lines: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("bad_lines", default=None)


@contextlib.contextmanager
def skipping_bad_lines():
    """Within the block, unreadable JSONL lines are skipped and their locations collected in the yielded list."""
    collected: list[str] = []
    token = _bad_lines.set(collected)
    try:
        yield collected
    finally:
        _bad_lines.reset(token)


def _jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = _object(json.loads(line), where)
        except json.JSONDecodeError as e:
            error = FinetuneError(
                f"{where}: invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno}); fix the line or set "
                "data.on_bad_row=skip"
            )
        except FinetuneError as e:
            error = e
        else:
            yield where, record
            continue
        skipping = _bad_lines.get()
        if skipping is None:
            raise error from None
        skipping.append(where)


def _object(record, where: str) -> dict:
    # Readers index records by field name; a list or scalar would surface as an AttributeError deep in a reader.
    if not isinstance(record, dict):
        raise FinetuneError(
            f"{where}: expected a JSON object {{field: value}}, found a {type(record).__name__}; each record must be "
            "one object"
        )
    return record


def _delimited(path: Path, delimiter: str, header: bool) -> Iterator[tuple[str, dict]]:
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter=delimiter)
    columns = None
    for number, cells in enumerate(reader, start=1):
        if not cells:
            continue
        if header and columns is None:
            columns = [c.strip() for c in cells]
            continue
        names = columns or [str(i) for i in range(len(cells))]
        if len(cells) != len(names):
            raise FinetuneError(
                f"{path}: record {number}: expected {len(names)} columns, found {len(cells)}; check quoting and the "
                "delimiter"
            )
        yield f"{path}: record {number}", dict(zip(names, cells))


def _parquet(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise FinetuneError(f"{path}: not a readable parquet file ({e}); re-export it") from None
    for index, record in enumerate(table.to_pylist()):
        yield f"{path}: row {index}", record


def records(path: Path, header: bool = True) -> Iterator[tuple[str, dict]]:
    """Every record of a local file as (where, dict); CSV/TSV without a header get keys '0', '1', ..."""
    if not path.is_file():
        raise FinetuneError(
            f"{path}: file not found; check data.sources[].path (relative paths start at the project folder)"
        )
    kind = suffix(path)
    if kind == ".jsonl":
        yield from _jsonl(path)
    elif kind == ".json":
        data = parse_json(path)
        items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else None
        if items is None:
            raise FinetuneError(
                f"{path}: expected a JSON list of records (or an object of records), found {type(data).__name__}"
            )
        for key, record in items:
            yield f"{path}: record {key}", _object(record, f"{path}: record {key}")
    elif kind in (".csv", ".tsv"):
        yield from _delimited(path, "," if kind == ".csv" else "\t", header)
    elif kind == ".parquet":
        yield from _parquet(path)
    else:
        raise FinetuneError(
            f"{path}: unsupported file type {kind or '(none)'}; use .json, .jsonl, .jsonl.gz, .csv, .tsv or .parquet "
            "(raw .txt documents: reader text)"
        )


def hub_records(name: str, config: str | None, split: str) -> Iterator[tuple[str, dict]]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, ValueError... for the same cause
        if (
            os.environ.get("HF_HUB_OFFLINE") == "1"
            or os.environ.get("HF_DATASETS_OFFLINE") == "1"
            or "offline" in str(e).lower()
            or isinstance(e, ConnectionError)
        ):
            raise FinetuneError(
                f"data.sources[].hub: {name}: cannot reach the Hugging Face Hub (HF_HUB_OFFLINE is set or there is no "
                "network) "
                "and the data set is not cached; download it where there is network, or point data.sources[].path at "
                "a local copy"
            ) from None
        raise FinetuneError(f"data.sources[].hub: {name} (config {config}, split {split}): {first_line(e)}") from None
    for index, record in enumerate(dataset):
        yield f"{name}[{split}]: row {index}", record


def rename(record: dict, columns: dict[str, str], where: str) -> dict:
    """Apply a recipe's column mapping {reader_field: source_field}."""
    if not columns:
        return record
    renamed = dict(record)
    for target, source in columns.items():
        if source not in record:
            raise FinetuneError(
                f"{where}: column mapping {target}: {source}: no field {source!r} in the record (fields: "
                f"{', '.join(map(str, record))})"
            )
        renamed[target] = renamed.pop(source)
    return renamed
