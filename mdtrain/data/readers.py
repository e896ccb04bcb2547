"""Input formats for ``mdtrain prepare``: documents streamed from text, JSON-lines and Parquet files.

Each reader yields ``(text, nbytes)`` with the raw bytes consumed (for the progress bar) and holds at most one
document (or one Parquet batch) in memory. Problems raise a DataError naming the file and line.
"""
from __future__ import annotations

import fnmatch
import gzip
import json
import os
from typing import Iterator

from mdtrain.data.errors import DataError

JSONL_EXT = (".jsonl", ".ndjson", ".json")
PARQUET_EXT = (".parquet",)


def expand_inputs(paths: list[str], pattern: str = "*") -> list[tuple[str, bool]]:
    """``(file, named)`` for the files named on the command line (named=True) and the files under directories
    whose name or relative path matches ``pattern`` (recursively, sorted, hidden entries skipped)."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = []
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    rel = os.path.relpath(os.path.join(root, name), p)
                    if not name.startswith(".") and (fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(rel, pattern)):
                        found.append(os.path.join(root, name))
            if not found:
                raise DataError(f"{p}: empty input (no files matching --glob {pattern!r} in this directory)")
            files.extend((f, False) for f in found)
        elif os.path.isfile(p):
            files.append((p, True))
        else:
            raise DataError(f"{p}: no such file or directory")
    if not files:
        raise DataError("empty input: no input files were given")
    return files


def file_format(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(JSONL_EXT):
        return "jsonl"
    if name.endswith(PARQUET_EXT):
        return "parquet"
    return "text"


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _decode(raw: bytes, path: str, line: int | None, offset: int = 0) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if line is None:
            line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}: not valid UTF-8 at line {line}, byte {offset + e.start} ({e.reason}: "
                        f"{raw[e.start:e.start + 4]!r}); convert the file to UTF-8 or remove it") from None


def _text_docs(path: str, doc_per: str) -> Iterator[tuple[str, int]]:
    if doc_per == "file":
        with _open(path) as fh:
            raw = fh.read()
        if raw.strip():
            yield _decode(raw, path, None), len(raw)
        return
    offset = 0
    with _open(path) as fh:
        for lineno, raw in enumerate(fh, 1):
            text = _decode(raw, path, lineno, offset).rstrip("\r\n")
            offset += len(raw)
            if text.strip():
                yield text, len(raw)


def _jsonl_docs(path: str, field: str) -> Iterator[tuple[str, int]]:
    offset = 0
    with _open(path) as fh:
        for lineno, raw in enumerate(fh, 1):
            line = _decode(raw, path, lineno, offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno} is not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict) or field not in obj:
                keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
                raise DataError(f"{path}: line {lineno} has no field {field!r} (has {keys}); "
                                "set --text-field")
            text = obj[field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(f"{path}: line {lineno}: field {field!r} is {type(text).__name__}, not a string")
            if text.strip():
                yield text, len(raw)


def _parquet_docs(path: str, field: str) -> Iterator[tuple[str, int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(f"{path}: Parquet file has no column {field!r} (columns: {names[:10]}); set --text-field")
    rows = max(1, pf.metadata.num_rows)
    size = os.path.getsize(path)
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=[field]):
            col = batch.column(0)
            if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
                raise DataError(f"{path}: column {field!r} has type {col.type}, not string")
            per_row = size / rows
            for text in col.to_pylist():
                if text is not None and text.strip():
                    yield text, per_row
    except pa.ArrowException as e:
        raise DataError(f"{path}: corrupt Parquet data ({e})") from None


def iter_documents(path: str, doc_per: str = "file", text_field: str = "text",
                   allow_empty: bool = False) -> Iterator[tuple[str, int]]:
    """Documents of one input file (blank documents are skipped). A file without any document is an error
    unless ``allow_empty`` (files found in a directory, like an empty ``__init__.py``)."""
    fmt = file_format(path)
    gen = (_jsonl_docs(path, text_field) if fmt == "jsonl" else _parquet_docs(path, text_field) if fmt == "parquet"
           else _text_docs(path, doc_per))
    n = 0
    try:
        for doc in gen:
            n += 1
            yield doc
    except (OSError, EOFError) as e:  # unreadable file, broken gzip stream
        raise DataError(f"{path}: read error ({type(e).__name__}: {e})") from None
    if n == 0 and not allow_empty:
        raise DataError(f"{path}: empty input (no non-blank documents); remove it from --input")


def iter_all_documents(files: list[tuple[str, bool]], doc_per: str, text_field: str) -> Iterator[tuple[str, int]]:
    """Documents of every file in turn; an input that yields none at all is an error."""
    n = 0
    for path, named in files:
        for doc in iter_documents(path, doc_per, text_field, allow_empty=not named):
            n += 1
            yield doc
    if n == 0:
        raise DataError(f"empty input: no documents in {', '.join(p for p, _ in files[:5])}"
                        + (f" and {len(files) - 5} more files" if len(files) > 5 else ""))
