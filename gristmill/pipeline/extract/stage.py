"""The `extract` stage: WARC, WET and ARC records into clean text documents with a language guess.

Input: archive files or globs (`.warc`, `.warc.gz`, `.wet`, `.wet.gz`, `.arc`, `.arc.gz`; Common
Crawl's layout works with a glob such as `crawl-data/**/*.warc.gz`), or an upstream `crawl` stage,
whose files are `<stage dir>/warc/*.warc.gz`, or a Common Crawl dump's paths list (`commoncrawl:`,
see commoncrawl.py). Work units are about `split_bytes` of archive: local files gzipped record by
record are cut at record boundaries (see `archive.archive_spans`), small files are grouped, and
files that cannot be split, or live on object storage or the web, are one unit each (stats say why).

Every response, resource and conversion (WET) record becomes exactly one row: kept with its text,
or removed with a reason (`extract:truncated`, `extract:not_html`, ...). Requests, metadata and
warcinfo records are not documents. HTML is decoded with the charset from the BOM, the HTTP header,
the `<meta>` tag or byte statistics (in that order), then the main content is extracted by
resiliparse (default) or trafilatura. Each row points back at its record (`warc_file`,
`warc_offset`) so `read_record_html` can show the raw page beside the text.
"""

from __future__ import annotations

import bisect
import codecs
import functools
import gzip
import importlib.util
import re
import zlib
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import ByteSize, Field, field_validator, model_validator
from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.encoding import detect_encoding, map_encoding_to_html5
from resiliparse.parse.html import HTMLTree

from gristmill.pipeline import io, storage
from gristmill.pipeline.extract import commoncrawl, langid
from gristmill.pipeline.extract.archive import (
    ArchiveRecord,
    ArchiveSpan,
    archive_spans,
    is_archive_file,
    iter_records,
    read_record,
)
from gristmill.pipeline.extract.commoncrawl import CommonCrawlInput
from gristmill.pipeline.extract.text import normalize_text
from gristmill.pipeline.stage import PartitionOutput, StageConfig, StageContext, group_by_size, source_stage

# The document columns, then the title and the pointer back to the source record.
EXTRACT_SCHEMA = pa.schema(
    [
        *io.DOCUMENT_SCHEMA,
        pa.field("title", pa.string()),
        pa.field("warc_file", pa.string()),
        pa.field("warc_offset", pa.int64()),
        pa.field("warc_record_id", pa.string()),
        pa.field("http_status", pa.int32()),
        pa.field("content_type", pa.string()),
        pa.field("charset", pa.string()),
    ]
)

# Histogram of kept text length in characters; the last bin counts everything from its edge up.
TEXT_CHARS_EDGES = [0, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000]

# Control characters (other than whitespace) and U+FFFD mark bytes that are not text in the charset.
_JUNK_CHARACTERS = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f\ufffd]")
_JUNK_SAMPLE_CHARS = 65_536
_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


class ExtractConfig(StageConfig):
    """Settings of the extract stage; the README (extract) explains every default."""

    extractor: Literal["resiliparse", "trafilatura"] = "resiliparse"
    main_content: bool = True
    content_types: list[str] = ["text/html", "application/xhtml+xml"]
    max_payload_bytes: int = 10_000_000
    max_junk_ratio: float = 0.01
    langid_model: str | None = None
    langid_max_chars: int = 1_000
    # ~256 MB of gzipped WARC holds ~100 MB of extracted text (Common Crawl: a 1 GB WARC, ~400 MB of WET).
    split_bytes: ByteSize = Field(default=ByteSize(256 * 2**20), ge=1)
    # One document bigger than this costs gigabytes downstream (filters hold several copies).
    max_doc_chars: int = Field(default=1_000_000, ge=1)
    commoncrawl: CommonCrawlInput | None = None  # read a Common Crawl dump's paths list

    @field_validator("max_payload_bytes", "langid_max_chars")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("must be a positive number")
        return value

    @field_validator("max_junk_ratio")
    @classmethod
    def _ratio(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError("must be between 0 and 1")
        return value

    @model_validator(mode="after")
    def _optional_packages(self) -> ExtractConfig:
        if self.extractor == "trafilatura" and importlib.util.find_spec("trafilatura") is None:
            raise ValueError("extractor 'trafilatura' needs the package `trafilatura`: pip install 'gristmill[trafilatura]'")
        langid.check_model(self.langid_model)
        return self

    def has_own_source(self) -> bool:
        return self.commoncrawl is not None


def list_extract_units(ctx: StageContext) -> list[list[ArchiveSpan]]:
    """Spans of the archive files (the WARC files of upstream `crawl` stages, path inputs, then the
    files of a Common Crawl dump), indexed on the cluster and grouped up to `split_bytes`."""
    config: ExtractConfig = ctx.config
    index = functools.partial(archive_spans, split_bytes=config.split_bytes)
    spans = [span for spans in ctx.map(index, _archive_files(ctx), f"{ctx.name}: index") for span in spans]
    if config.commoncrawl is not None:
        sizes = functools.partial(commoncrawl.file_spans, settings=config.commoncrawl)
        urls = commoncrawl.list_files(config.commoncrawl)
        spans += [span for spans in ctx.map(sizes, urls, f"{ctx.name}: dump files") for span in spans]
    return group_by_size(spans, lambda span: span.size, config.split_bytes)


def _archive_files(ctx: StageContext) -> list[str]:
    files: list[str] = []
    for entry in ctx.inputs:
        if entry.is_stage:
            if entry.stage_type != "crawl":
                raise ValueError(
                    f"stage {ctx.name!r}: input {entry.name!r} is a {entry.stage_type!r} stage; extract reads "
                    "WARC/WET/ARC files or a `crawl` stage"
                )
            files.extend(_file_name(p) for p in sorted((entry.stage_dir / "warc").glob("*.warc.gz")))
            continue
        if not entry.files:
            raise ValueError(f"stage {ctx.name!r}: input {entry.name!r} matches no files")
        for path in entry.files:
            if not is_archive_file(path):
                raise ValueError(
                    f"stage {ctx.name!r}: {path} is not a WARC, WET or ARC file (expected a name ending in "
                    ".warc, .warc.gz, .wet, .wet.gz, .arc or .arc.gz); narrow the glob in `input`"
                )
            files.append(_file_name(path))
    return files


def _file_name(path: storage.Location) -> str:
    """An absolute local path, or a URL as it is: what workers open and `source` records."""
    return str(path) if storage.is_remote(path) else str(path.resolve())


def decode_html(payload: bytes, declared_charset: str | None) -> tuple[str, str]:
    """Decode page bytes with the first charset that decodes them cleanly: the BOM's, the HTTP
    header's, the `<meta>` tag's (or uchardet's guess when there is none), then UTF-8.
    When none does, the first candidate decodes with U+FFFD for the bad bytes.
    Returns (text, charset used)."""
    candidates: list[str] = [name for bom, name in _BOMS if payload.startswith(bom)][:1]
    if declared_charset:
        try:
            codecs.lookup(declared_charset)
            candidates.append(map_encoding_to_html5(declared_charset))
        except LookupError:
            pass  # an unknown charset label is ignored, as browsers do
    for charset in candidates:
        try:
            return payload.decode(charset), charset
        except UnicodeDecodeError:
            continue
    for charset in (detect_encoding(payload, max_len=0, from_html_meta=True), "utf-8"):
        try:
            return payload.decode(charset), charset
        except UnicodeDecodeError:
            candidates.append(charset)
    return payload.decode(candidates[0], errors="replace"), candidates[0]


def junk_ratio(text: str) -> float:
    """Share of control and replacement characters at the start of `text`: near 0 for real text,
    high for binary data or bytes decoded with the wrong charset."""
    sample = text[:_JUNK_SAMPLE_CHARS]
    return len(_JUNK_CHARACTERS.findall(sample)) / len(sample) if sample else 0.0


def decode_content_encoding(payload: bytes, content_encoding: str | None) -> bytes:
    """Undo an HTTP `Content-Encoding` that the crawler stored as sent (gzip, deflate)."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("identity", "none", ""):
        return payload
    if encoding in ("gzip", "x-gzip"):
        return gzip.decompress(payload)
    if encoding == "deflate":
        try:
            return zlib.decompress(payload)
        except zlib.error:
            return zlib.decompress(payload, -zlib.MAX_WBITS)  # raw deflate, as some servers send
    raise ValueError(f"unsupported Content-Encoding {content_encoding!r}")


def html_to_text(html: str, extractor: str, main_content: bool = True) -> tuple[str, str | None]:
    """(text, title) of an HTML page. `main_content` drops navigation and boilerplate (resiliparse;
    trafilatura always does). The title comes from the parsed `<title>` either way. The text of
    both extractors is normalised the same way (see `extract.text`).

    The resiliparse tree is dropped before trafilatura runs and never left in a traceback: a
    resiliparse tree must be freed on the thread that built it, and a tree kept alive by a frame
    in a reference cycle is freed by whichever thread runs the garbage collector."""
    tree = HTMLTree.parse(html)
    try:
        title = (tree.title or "").strip() or None
        if extractor != "trafilatura":
            text = extract_plain_text(tree, preserve_formatting=True, main_content=main_content, alt_texts=False)
    finally:
        del tree
    if extractor == "trafilatura":
        import trafilatura

        text = trafilatura.extract(html, favor_precision=True, include_comments=False, deduplicate=False) or ""
    return normalize_text(text), title


def read_record_html(warc_file: str | Path, offset: int) -> str:
    """The raw page of the record at `warc_offset` in `warc_file`, decoded as the stage decoded it
    (for WET records, the stored text). Raises ValueError when no such record exists."""
    record = read_record(warc_file, offset)
    if record.payload is None:
        raise ValueError(f"{warc_file}: record at byte {offset} has no readable payload ({record.problem}: {record.detail})")
    payload = decode_content_encoding(record.payload, record.content_encoding)
    return decode_html(payload, record.charset)[0]


def _row(record: ArchiveRecord) -> dict:
    if record.record_id:
        doc_id = io.document_id(record.record_id, 0)
    else:
        doc_id = io.document_id(record.warc_file, f"{record.offset}:{record.record_type}")
    return {
        "id": doc_id,
        "url": record.url,
        "text": None,
        "source": record.warc_file,
        "fetch_time": record.date,
        "lang": None,
        "lang_score": None,
        "title": None,
        "warc_file": record.warc_file,
        "warc_offset": record.offset,
        "warc_record_id": record.record_id,
        "http_status": record.http_status,
        "content_type": record.content_type,
        "charset": None,
    }


class _Removal(Exception):
    """A record that is not a document: `reason` is the stats key, `detail` says where and why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _extract_record(record: ArchiveRecord, row: dict, config: ExtractConfig) -> None:
    """Fill `row` with text, title and charset, or raise _Removal."""
    if record.problem is not None:
        raise _Removal(f"extract:{record.problem}", record.detail)
    if record.http_status is not None and not 200 <= record.http_status < 300:
        raise _Removal("extract:http_status", f"HTTP {record.http_status}")
    is_text = record.record_type == "conversion"
    if not is_text and record.content_type is not None and record.content_type not in config.content_types:
        raise _Removal("extract:not_html", record.content_type)
    try:
        payload = decode_content_encoding(record.payload, record.content_encoding)
    except (OSError, EOFError, zlib.error, ValueError) as error:
        raise _Removal("extract:bad_content_encoding", str(error)) from None
    if not payload.strip():
        raise _Removal("extract:empty_text", "empty payload")
    html, charset = decode_html(payload, record.charset)
    row["charset"] = charset
    junk = junk_ratio(html)
    if junk > config.max_junk_ratio:
        raise _Removal("extract:undecodable", f"{junk:.0%} control or replacement characters as {charset}")
    if is_text:
        text, title = html.strip(), None
    else:
        try:
            text, title = html_to_text(html, config.extractor, config.main_content)
        except Exception as error:  # a page the extractor cannot handle is one removed row, not a crash
            raise _Removal("extract:extractor_error", f"{type(error).__name__}: {error}") from None
    if not text:
        raise _Removal("extract:empty_text", "no text after extraction")
    if len(text) > config.max_doc_chars:
        raise _Removal("extract:too_long", f"{len(text):,} characters > max_doc_chars {config.max_doc_chars:,}")
    row["text"], row["title"] = text, title


def text_length_bin(chars: int) -> int:
    """Index of the `TEXT_CHARS_EDGES` bin that `chars` falls in."""
    return max(0, bisect.bisect_right(TEXT_CHARS_EDGES, chars) - 1)


def _span_records(span: ArchiveSpan, config: ExtractConfig, record_types: dict[str, int],
                  download: dict[str, int]):
    """The records of one span; a Common Crawl file through a retrying stream (in the cluster's
    download limit), its requests, retries and bytes counted into `download`."""
    settings = config.commoncrawl
    from_dump = settings is not None and span.path.startswith(settings.base_url.rstrip("/") + "/")
    if from_dump:
        download["files"] = download.get("files", 0) + 1
    with commoncrawl.opener(settings, download) if from_dump else nullcontext(storage.open_binary) as opener:
        yield from iter_records(span.path, config.max_payload_bytes, counts=record_types, start=span.start,
                                end=span.end, layout=span.layout, opener=opener)


@source_stage("extract", ExtractConfig, units=list_extract_units)
def extract_archive(unit: list[ArchiveSpan], config: ExtractConfig) -> PartitionOutput:
    """Turn every document record of the spans of one unit into a kept or a removed row."""
    identify = langid.language_identifier(config.langid_model)
    kept: list[dict] = []
    removed: list[dict] = []
    reasons: list[str] = []
    record_types: dict[str, int] = {}
    removed_by_reason: dict[str, int] = {}
    languages: dict[str, int] = {}
    charsets: dict[str, int] = {}
    text_chars = [0] * len(TEXT_CHARS_EDGES)
    payload_bytes = skipped_bytes = 0
    download: dict[str, int] = {}
    records = (record for span in unit for record in _span_records(span, config, record_types, download))
    for record in records:
        row = _row(record)
        payload_bytes += len(record.payload or b"")
        skipped_bytes += record.skipped_bytes
        try:
            _extract_record(record, row, config)
        except _Removal as removal:
            removed.append(row)
            reasons.append(f"{removal.reason} ({removal.detail})" if removal.detail else removal.reason)
            removed_by_reason[removal.reason] = removed_by_reason.get(removal.reason, 0) + 1
            continue
        charsets[row["charset"]] = charsets.get(row["charset"], 0) + 1
        text_chars[text_length_bin(len(row["text"]))] += 1
        kept.append(row)
    # One call for the whole unit: the language model scores many pages far faster than one at a time.
    guesses = identify([row["text"][: config.langid_max_chars] for row in kept])
    for row, (lang, score) in zip(kept, guesses, strict=True):
        row["lang"], row["lang_score"] = lang, score
        languages[lang] = languages.get(lang, 0) + 1
    stats = {
        "extractor": config.extractor,
        "langid_model": langid.model_name(config.langid_model),
        "files": sum(span.start == 0 for span in unit),
        "spans": len(unit),
        "unsplit_files": {span.path: span.note for span in unit if span.note},
        "records_by_type": record_types,
        "payload_bytes": payload_bytes,
        "skipped_bytes": skipped_bytes,
        "languages": languages,
        "charsets": charsets,
        "text_chars": {"edges": TEXT_CHARS_EDGES, "counts": text_chars},
        "removed_by_reason": removed_by_reason,
    }
    if download:
        stats["download"] = {"requests": 0, "retries": 0, "bytes": 0, **download}
    return PartitionOutput(
        kept=pa.Table.from_pylist(kept, schema=EXTRACT_SCHEMA),
        removed=io.with_reason(pa.Table.from_pylist(removed, schema=EXTRACT_SCHEMA), reasons),
        stats=stats,
    )
