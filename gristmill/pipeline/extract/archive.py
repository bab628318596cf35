"""Records of WARC, WET and ARC files, as plain values the extract stage can judge.

WARC and WET files (gzip or not) are read with FastWARC; ARC files with warcio, which converts them
to WARC on the fly. Only records that can be documents come out: `response` (a crawled page),
`resource` (a stored file) and `conversion` (WET text). Requests, metadata and warcinfo records are
counted and skipped. Damage is reported, never raised: a record shorter than its declared length is
`truncated`, unparsable HTTP headers are `bad_http`, a payload over the size limit is `too_large`
(and is not read), and when the file itself cannot be read further (a corrupt or cut gzip member)
one last record with problem `unreadable` says where the damage starts.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from gristmill.pipeline import storage

Opener = Callable[[str], IO[bytes]]

WARC_SUFFIXES = (".warc", ".warc.gz", ".wet", ".wet.gz", ".arc", ".arc.gz")
DOCUMENT_RECORD_TYPES = ("response", "resource", "conversion")


@dataclass
class ArchiveRecord:
    """One record that could be a document, or the note that a file is damaged from `offset` on.

    `payload` is the HTTP body (response) or the record block (resource, conversion); it is None
    when `problem` says it could not or should not be read.
    """

    warc_file: str
    offset: int
    record_type: str
    record_id: str | None = None
    url: str | None = None
    date: datetime | None = None
    http_status: int | None = None
    content_type: str | None = None
    charset: str | None = None
    content_encoding: str | None = None
    payload: bytes | None = None
    problem: str | None = None
    detail: str = ""


def is_archive_file(path: str | Path) -> bool:
    return str(path).lower().endswith(WARC_SUFFIXES)


def _is_arc(path: str | Path) -> bool:
    return str(path).lower().endswith((".arc", ".arc.gz"))


def iter_records(path: str | Path, max_payload_bytes: int, counts: dict[str, int] | None = None,
                 start: int | None = None, opener: Opener = storage.open_binary) -> Iterator[ArchiveRecord]:
    """The document-bearing records of one archive file, in file order.

    `counts` (optional) receives the number of records of every WARC type seen, documents or not.
    `start` reads from that byte offset (a record boundary) instead of the beginning.
    `opener` opens the file (a retrying stream for Common Crawl, see commoncrawl.py).
    """
    counts = {} if counts is None else counts
    reader = _iter_arc if _is_arc(path) else _iter_warc
    yield from reader(str(path), max_payload_bytes, counts, start or 0, opener)


def _mime_type(value: str | None) -> str | None:
    """`text/html; charset=x` -> `text/html`; None for a missing or empty value."""
    if not value:
        return None
    return value.split(";", 1)[0].strip().lower() or None


def _iter_warc(path: str, max_payload_bytes: int, counts: dict[str, int], start: int,
               opener: Opener) -> Iterator[ArchiveRecord]:
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    with opener(path) as stream:
        stream.seek(start)
        records = iter(ArchiveIterator(stream, record_types=WarcRecordType.any_type, parse_http=False))
        position = start
        damage_reported = False
        while True:
            try:
                record = next(records)
            except StopIteration:
                if not damage_reported and not _gzip_members_complete(path, position, opener):
                    yield ArchiveRecord(path, position, "unreadable", problem="unreadable",
                                        detail=f"file ends inside a gzip member after byte {position}")
                return
            except OSError as error:
                yield ArchiveRecord(path, position, "unreadable", problem="unreadable",
                                    detail=f"file unreadable after byte {position}: {error}")
                return
            position = record.stream_pos
            kind = str(record.record_type)
            counts[kind] = counts.get(kind, 0) + 1
            if kind not in DOCUMENT_RECORD_TYPES:
                expected = record.content_length
                if len(record.reader.read()) < expected:  # the file ends inside this record
                    yield ArchiveRecord(path, position, "unreadable", problem="unreadable",
                                        detail=f"file cut inside the {kind} record at byte {position}")
                    return
                continue
            try:
                out = _warc_record(path, record, kind, max_payload_bytes)
            except OSError as error:
                # The payload of this record could not be decompressed: the file is damaged here.
                yield ArchiveRecord(path, position, kind, record.record_id, record.headers.get("WARC-Target-URI"),
                                    problem="unreadable", detail=f"record at byte {position}: {error}")
                return
            damage_reported = out.problem == "truncated"
            yield out


def _gzip_members_complete(path: str, offset: int, opener: Opener) -> bool:
    """Whether every gzip member from `offset` (a record boundary) to the end of the file is whole.
    FastWARC stops quietly at a member that was cut off; this tells a short file from a cut one.
    Files that are not gzip are always complete here (their cuts show as short records)."""
    with opener(path) as stream:
        if stream.read(2) != b"\x1f\x8b":
            return True
        stream.seek(offset)
        member = zlib.decompressobj(wbits=31)
        while chunk := stream.read(1 << 20):
            while chunk:
                if member.eof:
                    member = zlib.decompressobj(wbits=31)
                try:
                    member.decompress(chunk, 1 << 20)
                except zlib.error:
                    return False
                chunk = member.unconsumed_tail or member.unused_data
        return member.eof


def _warc_record(path: str, record, kind: str, max_payload_bytes: int) -> ArchiveRecord:
    headers = record.headers
    out = ArchiveRecord(
        warc_file=path,
        offset=record.stream_pos,
        record_type=kind,
        record_id=record.record_id or None,
        url=headers.get("WARC-Target-URI"),
        date=record.record_date,
        content_type=_mime_type(headers.get("WARC-Identified-Payload-Type")),
    )
    declared = headers.get("Content-Length")
    expected = record.content_length
    if declared is None or not declared.strip().isdigit() or int(declared) != expected:
        out.problem, out.detail = "truncated", f"WARC header cut short (Content-Length {declared!r})"
        return out
    if expected > max_payload_bytes:
        out.problem, out.detail = "too_large", f"{expected:,} bytes > max_payload_bytes {max_payload_bytes:,}"
        return out
    record.freeze()  # reads the block into memory; content_length becomes what was really there
    if record.content_length < expected:
        out.problem, out.detail = "truncated", f"got {record.content_length:,} of {expected:,} bytes"
        return out
    if kind == "response":
        try:
            record.parse_http(quirks_mode=True)
        except OSError as error:
            out.problem, out.detail = "bad_http", str(error)
            return out
        status = record.http_headers.status_code if record.http_headers is not None else None
        if status is None:
            out.problem, out.detail = "bad_http", "no HTTP status line"
            return out
        out.http_status = status
        out.content_type = out.content_type or _mime_type(record.http_content_type)
        out.charset = record.http_charset
        out.content_encoding = record.http_headers.get("Content-Encoding")
    else:
        out.content_type = out.content_type or _mime_type(headers.get("Content-Type"))
    out.payload = record.reader.read()
    return out


def _iter_arc(path: str, max_payload_bytes: int, counts: dict[str, int], start: int,
              opener: Opener) -> Iterator[ArchiveRecord]:
    from warcio.archiveiterator import ArchiveIterator

    with opener(path) as stream:
        stream.seek(start)
        iterator = ArchiveIterator(stream, arc2warc=True)
        records = iter(iterator)
        position = start
        while True:
            try:
                record = next(records)
                kind = record.rec_type
                counts[kind] = counts.get(kind, 0) + 1
                out = _arc_record(path, record, kind, max_payload_bytes) if kind in DOCUMENT_RECORD_TYPES else None
                position = iterator.get_record_offset()  # absolute; known once the record is read
            except StopIteration:
                return
            except Exception as error:  # warcio raises several types for damaged input
                yield ArchiveRecord(path, position, "unreadable", problem="unreadable",
                                    detail=f"file unreadable after byte {position}: {error}")
                return
            if out is not None:
                out.offset = position
                yield out


def _arc_record(path: str, record, kind: str, max_payload_bytes: int) -> ArchiveRecord:
    headers = record.rec_headers
    out = ArchiveRecord(path, -1, kind, url=headers.get_header("WARC-Target-URI"),
                        date=_parse_warc_date(headers.get_header("WARC-Date")))
    http = record.http_headers
    if kind == "response":
        status = http.get_statuscode() if http is not None else None
        if not status or not status.isdigit():
            out.problem, out.detail = "bad_http", f"status line {http.statusline if http else None!r}"
            return out
        out.http_status = int(status)
        out.content_type = _mime_type(http.get_header("Content-Type"))
        charset = (http.get_header("Content-Type") or "").partition("charset=")[2].strip(" \"';")
        out.charset = charset or None
    else:
        out.content_type = _mime_type(headers.get_header("Content-Type"))
    if record.length is not None and record.length > max_payload_bytes:
        out.problem, out.detail = "too_large", f"{record.length:,} bytes > max_payload_bytes {max_payload_bytes:,}"
        return out
    payload = record.content_stream().read()  # warcio undoes Content-Encoding itself
    expected = (record.length or 0) - (http.total_len if http is not None else 0)
    if len(payload) < expected and (http is None or not http.get_header("Content-Encoding")):
        out.problem, out.detail = "truncated", f"got {len(payload):,} of {expected:,} bytes"
        return out
    out.payload = payload
    return out


def _parse_warc_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(timezone.utc)
    except ValueError:
        return None


def read_record(warc_file: str | Path, offset: int) -> ArchiveRecord:
    """The record that starts at byte `offset` of `warc_file` (as recorded in `warc_offset`)."""
    for record in iter_records(warc_file, max_payload_bytes=2**62, start=offset):
        if record.offset != offset or record.problem == "unreadable":
            break
        return record
    raise ValueError(f"{warc_file}: no response, resource or conversion record starts at byte {offset}")
