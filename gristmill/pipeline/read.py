"""The `read` stage: JSONL, Parquet and plain-text files (or globs) into documents.

Work units: a file over `split_bytes` is cut into spans (JSONL at byte ranges whose lines belong to
the span they start in, Parquet at row groups); small files and spans are grouped up to
`split_bytes`. A gzipped JSONL file is one stream and is read whole (stats say so).

Ids are stable across runs and independent of splitting: the record's own id when `id_key` names
one, else a hash of the file's name (relative to the workflow folder) and the record's position in
it (the byte where its line starts, or its row). A record that cannot be read (bad JSON, no text,
not UTF-8, longer than `max_doc_chars`) becomes a `removed` row whose `reason` says why and where.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ByteSize, Field

from gristmill.pipeline import io, storage
from gristmill.pipeline.stage import PartitionOutput, StageConfig, StageContext, group_by_size, source_stage

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".json")
TEXT_SUFFIXES = (".txt", ".md", ".text")
SAMPLE_CHARS = 10_000  # how much of an unreadable or over-long record its removed row keeps
JSON_BYTES_PER_CHAR = 12  # \uXXXX escapes take 6 bytes a character; the rest of a record as much again


class ReadConfig(StageConfig):
    """`input`: files, folders or globs. `format: auto` decides by suffix per file."""

    format: Literal["auto", "jsonl", "parquet", "text"] = "auto"
    text_key: str = "text"
    id_key: str | None = None
    url_key: str = "url"
    files_per_part: int = Field(default=64, ge=1)  # at most this many files in one unit
    # A unit is about this many bytes of input: JSONL and text are mostly text, so ~128 MB of it.
    split_bytes: ByteSize = Field(default=ByteSize(128 * 2**20), ge=1)
    # One document bigger than this costs gigabytes downstream (filters hold several copies).
    max_doc_chars: int = Field(default=1_000_000, ge=1)


@dataclass(frozen=True)
class Span:
    """A piece of one input file: bytes [start, end) of a JSONL or text file (`end` None: to the
    end of a stream), or row groups [start, end) of a Parquet file. `note` says why a big file was
    not split."""

    path: str
    source: str
    kind: str
    start: int
    end: int | None
    size: int
    note: str = ""


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


def source_name(path: Path, workflow_dir: Path) -> str:
    """The file's name relative to the workflow folder (absolute when outside it, a URL as it is):
    part of every id."""
    if storage.is_remote(path):
        return str(path)
    try:
        source = os.path.relpath(path, workflow_dir)
    except ValueError:  # another drive on Windows
        return str(path)
    return str(path.resolve()) if source.startswith("..") else source


def file_spans(path: Path, source: str, kind: str, split_bytes: int) -> list[Span]:
    """The spans of one file: one for small files, text files and gzip streams."""
    size = path.stat().st_size
    if kind == "parquet":
        return _parquet_spans(path, source, split_bytes)
    if kind == "jsonl" and path.name.lower().endswith(".gz"):
        note = "gzip is one stream: it cannot be split" if size > split_bytes else ""
        return [Span(str(path), source, kind, 0, None, size, note)]
    if kind == "text" or size <= split_bytes:
        return [Span(str(path), source, kind, 0, size, size)]
    return [Span(str(path), source, kind, start, min(start + split_bytes, size), min(split_bytes, size - start))
            for start in range(0, size, split_bytes)]


def _parquet_spans(path: Path, source: str, split_bytes: int) -> list[Span]:
    """Runs of whole row groups of about `split_bytes` (uncompressed, from the footer)."""
    metadata = storage.parquet_file(path).metadata
    groups = list(range(metadata.num_row_groups)) or [0]
    sizes = [metadata.row_group(g).total_byte_size if metadata.num_row_groups else 0 for g in groups]
    runs = group_by_size(groups, lambda g: sizes[g], split_bytes)
    note = ""
    if any(sizes[run[0]] > split_bytes for run in runs):
        note = "a row group is over split_bytes: Parquet splits only between row groups"
    return [Span(str(path), source, "parquet", run[0], run[-1] + 1, sum(sizes[g] for g in run), note)
            for run in runs]


def list_read_units(ctx: StageContext) -> list[list[Span]]:
    """Work items: spans of the input files, grouped up to `split_bytes` and `files_per_part`."""
    config: ReadConfig = ctx.config
    spans = [
        span
        for path in ctx.input_files()
        for span in file_spans(path, source_name(path, ctx.workflow_dir), file_format(path, config.format),
                               config.split_bytes)
    ]
    return group_by_size(spans, lambda span: span.size, config.split_bytes, config.files_per_part)


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


class _Records:
    """Kept and removed rows of one unit, with the reason of every removed one."""

    def __init__(self) -> None:
        self.kept: list[dict] = []
        self.removed: list[dict] = []
        self.reasons: list[str] = []

    def remove(self, row: dict, reason: str) -> None:
        self.removed.append(row)
        self.reasons.append(reason)


def _lines(handle: BinaryIO, span: Span, max_line_bytes: int):
    """(offset, line) of every line that starts inside the span; a line over `max_line_bytes` comes
    as (offset, None, its length) without being held in memory."""
    if span.start > 0:
        handle.seek(span.start - 1)
        if handle.read(1) != b"\n":
            handle.readline()  # the line under way started in the span before: it is read there
    position = handle.tell()
    while span.end is None or position < span.end:
        raw = handle.readline(max_line_bytes + 1)
        if not raw:
            return
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            length = len(raw)
            while not raw.endswith(b"\n") and (raw := handle.readline(1 << 20)):
                length += len(raw)
            yield position, None, length
            position += length
            continue
        yield position, raw, len(raw)
        position += len(raw)


def _read_jsonl(span: Span, config: ReadConfig, out: _Records) -> None:
    source = span.source
    with storage.open_binary(span.path) as raw_handle, (
        gzip.open(raw_handle) if span.path.endswith(".gz") else raw_handle
    ) as handle:
        for offset, raw, length in _lines(handle, span, JSON_BYTES_PER_CHAR * config.max_doc_chars):
            doc_id = io.document_id(source, offset)
            where = f"line at byte {offset}"
            if raw is None:
                out.remove(_document(doc_id, None, source),
                           f"read:too_long ({where}: {length:,} bytes > {JSON_BYTES_PER_CHAR} x max_doc_chars "
                           f"{config.max_doc_chars:,})")
                continue
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                out.remove(_document(doc_id, raw.decode("utf-8", "replace")[:SAMPLE_CHARS], source),
                           f"read:bad_json ({where}: {error.msg if hasattr(error, 'msg') else error})")
                continue
            if not isinstance(record, dict):
                out.remove(_document(doc_id, raw.decode("utf-8", "replace")[:SAMPLE_CHARS], source),
                           f"read:not_an_object ({where})")
                continue
            if config.id_key and record.get(config.id_key) is not None:
                doc_id = str(record[config.id_key])
            text = record.get(config.text_key)
            url = record.get(config.url_key)
            url = url if isinstance(url, str) else None
            if not isinstance(text, str):
                problem = "missing" if text is None else f"not a string but {type(text).__name__}"
                out.remove(_document(doc_id, None, source, url, record),
                           f"read:no_text ({where}: key {config.text_key!r} {problem})")
            elif len(text) > config.max_doc_chars:
                out.remove(_document(doc_id, text[:SAMPLE_CHARS], source, url, record),
                           f"read:too_long ({where}: {len(text):,} characters > max_doc_chars {config.max_doc_chars:,})")
            else:
                out.kept.append(_document(doc_id, text, source, url, record))


def _read_parquet(span: Span, config: ReadConfig, out: _Records) -> None:
    parquet = storage.parquet_file(span.path)
    names = parquet.schema_arrow.names
    if config.text_key not in names:
        raise ValueError(f"{span.path}: no column {config.text_key!r} (columns: {', '.join(names)}); set `text_key`")
    wanted = [c for c in (config.text_key, config.id_key, config.url_key, "lang", "lang_score") if c in names]
    groups = list(range(span.start, min(span.end, parquet.metadata.num_row_groups)))
    table = parquet.read_row_groups(groups, columns=list(dict.fromkeys(wanted)))
    first_row = sum(parquet.metadata.row_group(g).num_rows for g in range(span.start))
    texts = table.column(config.text_key).to_pylist()
    lengths = pc.utf8_length(table.column(config.text_key)).to_pylist()
    ids = table.column(config.id_key).to_pylist() if config.id_key in names else [None] * len(texts)
    urls = table.column(config.url_key).to_pylist() if config.url_key in names else [None] * len(texts)
    labels = table.select([c for c in ("lang", "lang_score") if c in names]).to_pylist() or [{}] * len(texts)
    for offset, (text, length, given_id, url, label) in enumerate(zip(texts, lengths, ids, urls, labels)):
        row = first_row + offset
        doc_id = str(given_id) if given_id is not None else io.document_id(span.source, row)
        url = url if isinstance(url, str) else None
        if not isinstance(text, str):
            out.remove(_document(doc_id, None, span.source, url, label),
                       f"read:no_text (row {row}: {config.text_key!r} is null)")
        elif length > config.max_doc_chars:
            out.remove(_document(doc_id, text[:SAMPLE_CHARS], span.source, url, label),
                       f"read:too_long (row {row}: {length:,} characters > max_doc_chars {config.max_doc_chars:,})")
        else:
            out.kept.append(_document(doc_id, text, span.source, url, label))


def _read_text(span: Span, config: ReadConfig, out: _Records) -> None:
    doc_id = io.document_id(span.source, 0)
    if span.size > 4 * config.max_doc_chars:  # UTF-8 takes at most 4 bytes a character: no need to read it all
        with storage.open_binary(span.path) as handle:
            sample = handle.read(4 * SAMPLE_CHARS).decode("utf-8", "replace")[:SAMPLE_CHARS]
        out.remove(_document(doc_id, sample, span.source),
                   f"read:too_long ({span.size:,} bytes > 4 x max_doc_chars {config.max_doc_chars:,})")
        return
    data = storage.location(span.path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        out.remove(_document(doc_id, data.decode("utf-8", "replace")[:SAMPLE_CHARS], span.source),
                   f"read:not_utf8 (byte {error.start})")
        return
    if len(text) > config.max_doc_chars:
        out.remove(_document(doc_id, text[:SAMPLE_CHARS], span.source),
                   f"read:too_long ({len(text):,} characters > max_doc_chars {config.max_doc_chars:,})")
    else:
        out.kept.append(_document(doc_id, text, span.source))


READERS = {"jsonl": _read_jsonl, "parquet": _read_parquet, "text": _read_text}


@source_stage("read", ReadConfig, units=list_read_units)
def read_files(unit: list[Span], config: ReadConfig) -> PartitionOutput:
    """Read the spans of one unit into kept documents and removed records."""
    out = _Records()
    for span in unit:
        try:
            READERS[span.kind](span, config, out)
        except (OSError, EOFError, zlib.error, pa.ArrowException) as error:
            # A corrupt file (truncated gzip, not gzip, torn Parquet) is one removed row naming it;
            # records read before the damage stay, and the other files go on.
            out.remove(
                _document(io.document_id(span.source, f"unreadable:{span.start}"), None, span.source),
                f"read:unreadable_file ({span.path}: {type(error).__name__}: {error})",
            )
    return PartitionOutput(
        kept=_rows_to_table(out.kept),
        removed=io.with_reason(_rows_to_table(out.removed), out.reasons),
        stats={
            "files": sum(span.start == 0 for span in unit),
            "spans": len(unit),
            "unsplit_files": {span.source: span.note for span in unit if span.note and span.start == 0},
            "removed_by_reason": _count_reasons(out.reasons),
        },
    )


def _count_reasons(reasons: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason in reasons:
        key = reason.split(" ", 1)[0]
        counts[key] = counts.get(key, 0) + 1
    return counts
