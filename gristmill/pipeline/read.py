"""The `read` stage: JSONL, Parquet and plain-text files (or globs) into documents.

Ids are stable across runs: the record's own id when `id_key` names one, else a hash of the file's
name (relative to the workflow folder) and the record's position in it. A record that cannot be
read (bad JSON, no text, not UTF-8) becomes a `removed` row whose `reason` says why and where.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Literal

import pyarrow as pa

from gristmill.pipeline import io, storage
from gristmill.pipeline.stage import PartitionOutput, StageConfig, StageContext, source_stage

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".json")
TEXT_SUFFIXES = (".txt", ".md", ".text")


class ReadConfig(StageConfig):
    """`input`: files, folders or globs. `format: auto` decides by suffix per file."""

    format: Literal["auto", "jsonl", "parquet", "text"] = "auto"
    text_key: str = "text"
    id_key: str | None = None
    url_key: str = "url"
    files_per_part: int = 64  # plain-text files are small: group them so a part is worth a task


def file_format(path: Path, configured: str) -> str:
    if configured != "auto":
        return configured
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    raise ValueError(f"{path}: cannot tell the format from the name; set `format:` (jsonl, parquet or text)")


def list_read_units(ctx: StageContext) -> list[list[tuple[str, str]]]:
    """Work items: one per JSONL/Parquet file, plain-text files grouped `files_per_part` at a time.
    Each file is a (path, source name) pair; the source name is relative to the workflow folder."""
    config: ReadConfig = ctx.config
    units: list[list[tuple[str, str]]] = []
    text_group: list[tuple[str, str]] = []
    for path in ctx.input_files():
        entry = (str(path), _source_name(path, ctx.workflow_dir))
        if file_format(path, config.format) == "text":
            text_group.append(entry)
            if len(text_group) == config.files_per_part:
                units.append(text_group)
                text_group = []
        else:
            units.append([entry])
    if text_group:
        units.append(text_group)
    return units


def _source_name(path: storage.Location, workflow_dir: Path) -> str:
    """A file's name relative to the workflow folder (a URL as it is), so ids survive a moved checkout."""
    if storage.is_remote(path):
        return str(path)
    try:
        source = os.path.relpath(path, workflow_dir)
    except ValueError:  # another drive on Windows
        source = str(path)
    return str(path.resolve()) if source.startswith("..") else source


def _rows_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=io.DOCUMENT_SCHEMA) if rows else io.empty_documents()


def _document(doc_id: str, text: str | None, source: str, url: str | None = None, record: dict | None = None) -> dict:
    """A document row; a `lang` (string) and `lang_score` (number) already in the record are kept,
    so corpora labelled elsewhere keep their language through filters and tokenizer reports."""
    record = record or {}
    lang = record.get("lang")
    score = record.get("lang_score")
    return {"id": doc_id, "url": url, "text": text, "source": source, "fetch_time": None,
            "lang": lang if isinstance(lang, str) else None,
            "lang_score": float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else None}


def _read_jsonl(path: str, source: str, config: ReadConfig, kept: list, removed: list, reasons: list) -> None:
    with storage.open_binary(path) as raw_stream, (
        gzip.open(raw_stream) if path.endswith(".gz") else raw_stream
    ) as handle:
        for line_no, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            doc_id = io.document_id(source, line_no)
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                removed.append(_document(doc_id, raw.decode("utf-8", "replace")[:10_000], source))
                reasons.append(f"read:bad_json (line {line_no}: {error.msg if hasattr(error, 'msg') else error})")
                continue
            if not isinstance(record, dict):
                removed.append(_document(doc_id, raw.decode("utf-8", "replace")[:10_000], source))
                reasons.append(f"read:not_an_object (line {line_no})")
                continue
            if config.id_key and record.get(config.id_key) is not None:
                doc_id = str(record[config.id_key])
            text = record.get(config.text_key)
            url = record.get(config.url_key)
            url = url if isinstance(url, str) else None
            if not isinstance(text, str):
                removed.append(_document(doc_id, None, source, url, record))
                problem = "missing" if text is None else f"not a string but {type(text).__name__}"
                reasons.append(f"read:no_text (line {line_no}: key {config.text_key!r} {problem})")
                continue
            kept.append(_document(doc_id, text, source, url, record))


def _read_parquet(path: str, source: str, config: ReadConfig, kept: list, removed: list, reasons: list) -> None:
    table = storage.read_parquet(path)
    if config.text_key not in table.column_names:
        raise ValueError(f"{path}: no column {config.text_key!r} (columns: {', '.join(table.column_names)}); set `text_key`")
    texts = table.column(config.text_key).to_pylist()
    ids = table.column(config.id_key).to_pylist() if config.id_key in table.column_names else [None] * len(texts)
    urls = table.column(config.url_key).to_pylist() if config.url_key in table.column_names else [None] * len(texts)
    labels = table.select([c for c in ("lang", "lang_score") if c in table.column_names]).to_pylist()
    for row, (text, given_id, url, label) in enumerate(zip(texts, ids, urls, labels or [{}] * len(texts))):
        doc_id = str(given_id) if given_id is not None else io.document_id(source, row)
        url = url if isinstance(url, str) else None
        if not isinstance(text, str):
            removed.append(_document(doc_id, None, source, url, label))
            reasons.append(f"read:no_text (row {row}: {config.text_key!r} is null)")
        else:
            kept.append(_document(doc_id, text, source, url, label))


def _read_text(path: str, source: str, kept: list, removed: list, reasons: list) -> None:
    data = storage.location(path).read_bytes()
    doc_id = io.document_id(source, 0)
    try:
        kept.append(_document(doc_id, data.decode("utf-8"), source))
    except UnicodeDecodeError as error:
        removed.append(_document(doc_id, data.decode("utf-8", "replace"), source))
        reasons.append(f"read:not_utf8 (byte {error.start})")


@source_stage("read", ReadConfig, units=list_read_units)
def read_files(unit: list[tuple[str, str]], config: ReadConfig) -> PartitionOutput:
    """Read the files of one unit into kept documents and removed records."""
    kept: list[dict] = []
    removed: list[dict] = []
    reasons: list[str] = []
    for path, source in unit:
        kind = file_format(Path(path), config.format)
        try:
            if kind == "jsonl":
                _read_jsonl(path, source, config, kept, removed, reasons)
            elif kind == "parquet":
                _read_parquet(path, source, config, kept, removed, reasons)
            else:
                _read_text(path, source, kept, removed, reasons)
        except (OSError, EOFError, zlib.error, pa.ArrowException) as error:
            # A corrupt file (truncated gzip, not gzip, torn Parquet) is one removed row naming it;
            # records read before the damage stay, and the other files go on.
            removed.append(_document(io.document_id(source, "unreadable"), None, source))
            reasons.append(f"read:unreadable_file ({path}: {type(error).__name__}: {error})")
    removed_table = io.with_reason(_rows_to_table(removed), reasons)
    return PartitionOutput(
        kept=_rows_to_table(kept),
        removed=removed_table,
        stats={"files": len(unit), "removed_by_reason": _count_reasons(reasons)},
    )


def _count_reasons(reasons: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason in reasons:
        key = reason.split(" ", 1)[0]
        counts[key] = counts.get(key, 0) + 1
    return counts
