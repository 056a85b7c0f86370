"""File formats and encodings every reader relies on: finetune/data/files.py."""

from __future__ import annotations

import gzip
import json

import pytest

from finetune.data import files
from finetune.data.readers import RawSource
from finetune.errors import FinetuneError

TEXT = "Société Générale raised its target for Nestlé to 110 francs ; Pöyry fell 3 %"


def error_of(call) -> str:
    with pytest.raises(FinetuneError) as caught:
        call()
    return str(caught.value)


def test_utf8_and_latin1_read_to_the_same_text(tmp_path):
    utf8, latin1, bom = tmp_path / "u.txt", tmp_path / "l.txt", tmp_path / "b.txt"
    utf8.write_bytes(TEXT.encode("utf-8"))
    latin1.write_bytes(TEXT.encode("latin-1"))
    bom.write_bytes(b"\xef\xbb\xbf" + TEXT.encode("utf-8"))
    assert files.read_text(utf8) == files.read_text(latin1) == files.read_text(bom) == TEXT


def test_latin1_csv_and_tsv_records(tmp_path):
    csv_path, tsv_path = tmp_path / "d.csv", tmp_path / "d.tsv"
    csv_path.write_bytes('text,label\r\n"Pöyry, the consultancy,\r\nfell",negative\r\n'.encode("latin-1"))
    tsv_path.write_bytes("text\tlabel\nCafé sales rose\tpositive\n".encode("latin-1"))
    assert list(files.records(csv_path)) == [
        (f"{csv_path}: record 2", {"text": "Pöyry, the consultancy,\r\nfell", "label": "negative"})
    ]
    assert list(files.records(tsv_path)) == [
        (f"{tsv_path}: record 2", {"text": "Café sales rose", "label": "positive"})
    ]
    assert list(files.records(tsv_path, header=False))[0] == (f"{tsv_path}: record 1", {"0": "text", "1": "label"})


def test_json_jsonl_gz_and_parquet_records(tmp_path):
    rows = [{"q": "a", "n": 1}, {"q": "é", "n": 2}]
    as_list, as_object = tmp_path / "l.json", tmp_path / "o.json"
    as_list.write_text(json.dumps(rows), encoding="utf-8")
    as_object.write_text(json.dumps({"k1": rows[0], "k2": rows[1]}), encoding="utf-8")
    jsonl_gz = tmp_path / "r.jsonl.gz"
    jsonl_gz.write_bytes(gzip.compress("\n".join(json.dumps(r) for r in rows).encode("utf-8") + b"\n\n"))
    assert list(files.records(as_list)) == [(f"{as_list}: record 0", rows[0]), (f"{as_list}: record 1", rows[1])]
    assert [w for w, _ in files.records(as_object)] == [f"{as_object}: record k1", f"{as_object}: record k2"]
    assert list(files.records(jsonl_gz)) == [(f"{jsonl_gz}:1", rows[0]), (f"{jsonl_gz}:2", rows[1])]

    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "r.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    assert list(files.records(parquet)) == [(f"{parquet}: row 0", rows[0]), (f"{parquet}: row 1", rows[1])]


def test_column_mapping(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"instr": "Do it", "out": "Done"}\n', encoding="utf-8")
    renamed = RawSource(path=path, columns={"instruction": "instr", "output": "out"})
    assert list(renamed.records()) == [(f"{path}:1", {"instruction": "Do it", "output": "Done"})]
    missing = RawSource(path=path, columns={"input": "context"})
    assert (
        error_of(lambda: list(missing.records()))
        == f"{path}:1: column mapping input: context: no field 'context' in the record (fields: instr, out)"
    )


def test_bad_files(tmp_path):
    empty, gz_empty = tmp_path / "e.jsonl", tmp_path / "e.jsonl.gz"
    empty.write_bytes(b"")
    gz_empty.write_bytes(gzip.compress(b""))
    for path in (empty, gz_empty):
        assert (
            error_of(lambda path=path: list(files.records(path)))
            == f"{path}: the file is empty; check data.sources[].path or re-download the file"
        )

    binary = tmp_path / "b.csv"
    binary.write_bytes(b"a,b\n\x00\x01\x02\xff,1\n")
    assert (
        error_of(lambda: list(files.records(binary)))
        == f"{binary}: byte 7 is neither UTF-8 nor Latin-1 text; save the file as UTF-8"
    )

    not_gzip = tmp_path / "n.jsonl.gz"
    not_gzip.write_bytes(b'{"a": 1}\n')
    assert error_of(lambda: list(files.records(not_gzip))).startswith(f"{not_gzip}: not a valid gzip file (")

    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    assert error_of(lambda: list(files.records(bad_line))) == (
        f"{bad_line}:2: invalid JSON (Expecting value at column 7); fix the line or set data.on_bad_row=skip"
    )

    truncated = tmp_path / "t.json"
    truncated.write_text('[{"a": "unterminated', encoding="utf-8")
    assert error_of(lambda: list(files.records(truncated))) == (
        f"{truncated}:1: invalid JSON (Unterminated string starting at column 8); fix or re-download the file"
    )

    scalar = tmp_path / "s.json"
    scalar.write_text("42", encoding="utf-8")
    assert (
        error_of(lambda: list(files.records(scalar)))
        == f"{scalar}: expected a JSON list of records (or an object of records), found int"
    )

    ragged = tmp_path / "r.csv"
    ragged.write_text("a,b\n1,2,3\n", encoding="utf-8")
    assert (
        error_of(lambda: list(files.records(ragged)))
        == f"{ragged}: record 2: expected 2 columns, found 3; check quoting and the delimiter"
    )

    other = tmp_path / "r.xlsx"
    other.write_bytes(b"PK")
    assert error_of(lambda: list(files.records(other))) == (
        f"{other}: unsupported file type .xlsx; use .json, .jsonl, .jsonl.gz, .csv, .tsv or .parquet (raw .txt "
        "documents: reader text)"
    )

    absent = tmp_path / "absent.json"
    assert error_of(lambda: list(files.records(absent))) == (
        f"{absent}: file not found; check data.sources[].path (relative paths start at the project folder)"
    )


def test_local_path():
    assert error_of(lambda: files.local_path(None, "org/set", "tatqa")) == (
        "data.sources[].hub: org/set: the tatqa reader reads the upstream release files, not a Hub data set; "
        "download them and set data.sources[].path instead"
    )
