"""Records of WARC, WET and ARC files, as plain values the extract stage can judge.

A file has one of five layouts. `members`: WARC gzipped with one member per record, as Common
Crawl and every crawler (gristmill's included) write them; members are walked one by one, so a
file can be cut into spans that start at record boundaries, and a damaged member is skipped:
reading goes on at the next member that begins a WARC record. `arc_members`: ARC gzipped the same
way, cut the same way, read with warcio (which converts ARC to WARC on the fly) from a span's start
to its end. `stream` (gzipped as one stream), `plain` (not gzipped) and `arc` files are read
whole, from their start (WARC with FastWARC, ARC with warcio).

Only records that can be documents come out: `response` (a crawled page), `resource` (a stored
file) and `conversion` (WET text). Requests, metadata and warcinfo records are counted and skipped.
Damage is reported, never raised: a record shorter than its declared length is `truncated`,
unparsable HTTP headers are `bad_http`, a payload over the size limit is `too_large` (and is not
read), a gzip member that does not inflate is `damaged` (its bytes are skipped), and in the layouts
read whole, the point from which a file cannot be read any further is one `unreadable` record.
"""

from __future__ import annotations

import io
import os
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, BinaryIO

from gristmill.pipeline import storage

Opener = Callable[[str], IO[bytes]]  # opens an archive for reading: a path, a URL, a retrying stream

WARC_SUFFIXES = (".warc", ".warc.gz", ".wet", ".wet.gz", ".arc", ".arc.gz")
DOCUMENT_RECORD_TYPES = ("response", "resource", "conversion")
GZIP_MAGIC = b"\x1f\x8b\x08"
CHUNK_BYTES = 1 << 20
FEED_BYTES = 1 << 14  # input handed to zlib at a time: what is left past a member's end is copied
HEADER_BYTES = 1 << 20  # room for a record's WARC and HTTP headers on top of its payload
# A gzip file whose first member is longer than this is taken for one stream (no seek points).
LAYOUT_PROBE_BYTES = 64 << 20
# The start of a record: a WARC version line, or an ARC header line (URL IP date type length).
RECORD_START = re.compile(rb"WARC/\d|\S+ \S+ \d{14} \S+ \d+\r?\n")
RECORD_START_BYTES = 1 << 12
SPLITTABLE = ("members", "arc_members")
UNSPLITTABLE = {
    "stream": "gzipped as one stream: no record boundary to seek to, so it is read whole",
    "plain": "not gzipped record by record: it is read whole",
    "arc": "ARC files are read whole",
}
REMOTE_WHOLE = "on object storage or the web: read whole, in one stream"


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
    skipped_bytes: int = 0  # bytes of the file passed over because they could not be read


@dataclass(frozen=True)
class ArchiveSpan:
    """Bytes [start, end) of one archive file, a work unit of the extract stage (or part of one).
    Only `members` files have spans that do not start at 0; `note` says why a big file is whole."""

    path: str
    start: int
    end: int
    layout: str
    note: str = ""

    @property
    def size(self) -> int:
        return self.end - self.start


def is_archive_file(path: str | Path) -> bool:
    return str(path).lower().endswith(WARC_SUFFIXES)


def _is_arc(path: str | Path) -> bool:
    return str(path).lower().endswith((".arc", ".arc.gz"))


def archive_layout(path: str | Path, opener: Opener = storage.open_binary) -> str:
    """`members`, `arc_members`, `stream`, `plain` or `arc` (see the module docstring), from the
    file's name and first bytes."""
    arc = _is_arc(path)
    with opener(str(path)) as stream:
        if stream.read(3) != GZIP_MAGIC:
            return "arc" if arc else "plain"
        size = _stream_size(stream)
        first = _inflate_member(_Cursor(stream, 0), keep=0, limit=LAYOUT_PROBE_BYTES)
        per_record = first.problem not in ("over_limit", None) or (
            first.problem is None and first.end < size and _begins_record(stream, first.end))
        if not per_record:  # one member for the whole file, or members that are not records
            return "arc" if arc else "stream"
        return "arc_members" if arc else "members"  # a damaged first member: the rest resynchronises


def archive_spans(path: str | Path, split_bytes: int) -> list[ArchiveSpan]:
    """The spans of one archive file: runs of whole gzip members of about `split_bytes`, each
    starting at a member that begins a record, found by one pass that inflates every member. Small
    files, and files that cannot be split (`note` says why), are one span."""
    path = str(path)
    if storage.is_url(path):  # finding the split points would read the whole object once more
        size, layout = storage.location(path).stat().st_size, archive_layout(path)
        return [ArchiveSpan(path, 0, size, layout, "" if size <= split_bytes else REMOTE_WHOLE)]
    size = os.path.getsize(path)
    layout = archive_layout(path)
    if size <= split_bytes or layout not in SPLITTABLE:
        return [ArchiveSpan(path, 0, size, layout, "" if size <= split_bytes else UNSPLITTABLE[layout])]
    starts = [0]
    with open(path, "rb") as stream:
        for member in _members(stream, 0, size, keep=RECORD_START_BYTES):
            if (member.problem is None and member.offset - starts[-1] >= split_bytes
                    and RECORD_START.match(member.data)):
                starts.append(member.offset)
    return [ArchiveSpan(path, start, end, layout) for start, end in zip(starts, starts[1:] + [size])]


def iter_records(path: str | Path, max_payload_bytes: int, counts: dict[str, int] | None = None,
                 start: int = 0, end: int | None = None, layout: str | None = None,
                 opener: Opener = storage.open_binary) -> Iterator[ArchiveRecord]:
    """The document-bearing records of one archive file, in file order.

    `counts` (optional) receives the number of records of every WARC type seen, documents or not.
    `start` reads from that byte offset (a record boundary) instead of the beginning; in the
    layouts that split, only records whose gzip member starts before `end` are read. `opener`
    opens the file (a retrying stream for Common Crawl, see commoncrawl.py).
    """
    counts = {} if counts is None else counts
    layout = layout or archive_layout(path, opener)
    if layout == "members":
        yield from _iter_members(str(path), max_payload_bytes, counts, start, end, opener)
    elif layout in ("arc", "arc_members"):
        yield from _iter_arc(str(path), max_payload_bytes, counts, start, end if layout == "arc_members" else None,
                             opener)
    else:
        yield from _iter_warc(str(path), max_payload_bytes, counts, start, opener)


def _stream_size(stream: BinaryIO) -> int:
    """Size of an open file: from the file system for a local file, by seeking to the end (and
    back) for a remote stream."""
    try:
        return os.fstat(stream.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        here = stream.tell()
        size = stream.seek(0, io.SEEK_END)
        stream.seek(here)
        return size


@dataclass
class _Member:
    """One gzip member: where it starts and ends, the first bytes of its content, and its problem
    (`damaged`, `truncated`, or `over_limit` when inflating stopped at a probe's limit)."""

    offset: int
    end: int
    data: bytes
    length: int
    problem: str | None = None
    detail: str = ""


def _members(stream: BinaryIO, start: int, end: int, keep: int) -> Iterator[_Member]:
    """The gzip members that start in [start, end), each with the first `keep` bytes of its
    content. A member that does not inflate ends where the next member beginning a WARC record
    starts (or at the end of the file): that is where reading resynchronises."""
    size = _stream_size(stream)
    cursor = _Cursor(stream, start)
    while cursor.offset < min(end, size):
        member = _inflate_member(cursor, keep)
        if member.problem is not None:
            member.data = member.data or _salvage_head(stream, member.offset)
            member.end = _next_record_member(stream, member.offset + 1, size)
            cursor.seek(member.end)
        yield member


class _Cursor:
    """Reads a file forward in blocks and hands out small slices of them without copying, so that
    finding where each of many small gzip members ends costs no more than inflating it."""

    def __init__(self, stream: BinaryIO, offset: int):
        self.stream = stream
        self.seek(offset)

    def seek(self, offset: int) -> None:
        self.stream.seek(offset)
        self.block, self.base, self.pos = b"", offset, 0  # `base`: file offset of block[0]

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def peek(self, n: int) -> bytes:
        """The next `n` bytes (fewer at the end of the file), without moving."""
        if len(self.block) - self.pos < n:
            self.block, self.base, self.pos = self.block[self.pos:] + self.stream.read(CHUNK_BYTES), self.offset, 0
        return self.block[self.pos : self.pos + n]

    def take(self, n: int) -> memoryview:
        """Up to `n` of the next bytes (empty at the end of the file)."""
        if self.pos == len(self.block):
            self.peek(1)
        view = memoryview(self.block)[self.pos : self.pos + n]
        self.pos += len(view)
        return view

    def give_back(self, n: int) -> None:
        self.pos -= n


def _inflate_member(cursor: _Cursor, keep: int, limit: int | None = None) -> _Member:
    """Inflate the member at the cursor and leave the cursor at its end."""
    offset = cursor.offset
    if cursor.peek(len(GZIP_MAGIC)) != GZIP_MAGIC:
        return _Member(offset, -1, b"", 0, "damaged", "no gzip member starts here")
    inflater = zlib.decompressobj(wbits=31)
    head, length = bytearray(), 0
    try:
        while True:
            data: bytes | memoryview = cursor.take(FEED_BYTES)
            if not data:
                piece = inflater.flush()  # output zlib may still hold back
                head += piece[: max(keep - len(head), 0)]
                length += len(piece)
                if inflater.eof:
                    return _Member(offset, cursor.offset, bytes(head), length)
                return _Member(offset, -1, bytes(head), length, "truncated", "the file ends inside this gzip member")
            while data:
                piece = inflater.decompress(data, CHUNK_BYTES)
                head += piece[: max(keep - len(head), 0)]
                length += len(piece)
                if inflater.eof:
                    cursor.give_back(len(inflater.unused_data))
                    return _Member(offset, cursor.offset, bytes(head), length)
                if limit is not None and length > limit:
                    return _Member(offset, -1, bytes(head), length, "over_limit")
                data = inflater.unconsumed_tail
    except zlib.error as error:
        return _Member(offset, -1, bytes(head), length, "damaged", f"gzip: {error}")


def _salvage_head(stream: BinaryIO, offset: int) -> bytes:
    """What a damaged member still inflates to before the damage, fed in small steps (zlib drops
    the output of a call that fails): enough for its WARC headers, the URL of the lost record."""
    stream.seek(offset)
    inflater, head = zlib.decompressobj(wbits=31), bytearray()
    while len(head) < (1 << 16) and (data := stream.read(256)):
        try:
            head += inflater.decompress(data)
        except zlib.error:
            break
        if inflater.eof:
            break
    return bytes(head)


def _begins_record(stream: BinaryIO, offset: int) -> bool:
    """Whether a gzip member starts at `offset` and its content starts a WARC or ARC record."""
    stream.seek(offset)
    data = stream.read(1 << 16)
    if not data.startswith(GZIP_MAGIC):
        return False
    try:
        return RECORD_START.match(zlib.decompressobj(wbits=31).decompress(data, RECORD_START_BYTES)) is not None
    except zlib.error:
        return False


def _next_record_member(stream: BinaryIO, after: int, size: int) -> int:
    """Offset of the first gzip member at or after `after` that begins a record; `size` if none."""
    position = after
    while position < size:
        stream.seek(position)
        window = stream.read(CHUNK_BYTES + len(GZIP_MAGIC) - 1)
        found = window.find(GZIP_MAGIC)
        while found != -1:
            if _begins_record(stream, position + found):
                return position + found
            found = window.find(GZIP_MAGIC, found + 1)
        position += CHUNK_BYTES
    return size


def _iter_members(path: str, max_payload_bytes: int, counts: dict[str, int], start: int,
                  end: int | None, opener: Opener) -> Iterator[ArchiveRecord]:
    """Records of a `members` file, member by member; a damaged member is one record with its
    problem and the bytes skipped, and reading goes on after it."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    with opener(path) as stream:
        size = _stream_size(stream)
        for member in _members(stream, start, size if end is None else end, keep=max_payload_bytes + HEADER_BYTES):
            if member.problem is not None:
                yield _skipped_member(path, member, member.problem, member.detail)
                continue
            kind = _lone_record_type(member)
            if kind is not None and kind not in DOCUMENT_RECORD_TYPES:  # a request, warcinfo...: count it, no more
                counts[kind] = counts.get(kind, 0) + 1
                continue
            capped = member.length > len(member.data)  # only the first record's headers are whole
            found = 0
            try:
                for record in ArchiveIterator(io.BytesIO(member.data), record_types=WarcRecordType.any_type,
                                              parse_http=False):
                    found += 1
                    kind = str(record.record_type)
                    counts[kind] = counts.get(kind, 0) + 1
                    if kind in DOCUMENT_RECORD_TYPES:
                        yield _warc_record(path, record, kind, max_payload_bytes, member.offset)
                    if capped:
                        break
            except OSError as error:
                if not found:
                    yield _skipped_member(path, member, "damaged", f"not a WARC record: {error}")
                continue
            if not found:
                yield _skipped_member(path, member, "damaged", "not a WARC record")


def _warc_headers(data: bytes) -> tuple[dict[str, str], int]:
    """The WARC headers (lower-case names) at the start of `data`, and where its block starts
    (-1 when the header block does not end within the data)."""
    headers: dict[str, str] = {}
    if not data.startswith(b"WARC/"):
        return headers, -1
    block_start = data.find(b"\r\n\r\n", 0, HEADER_BYTES)
    block = data[: block_start if block_start >= 0 else HEADER_BYTES].decode("utf-8", "replace")
    for line in block.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers, block_start + 4 if block_start >= 0 else -1


def _lone_record_type(member: _Member) -> str | None:
    """The WARC-Type of a member that holds exactly one whole record, read from its headers alone
    (cheaper than parsing the record); None otherwise."""
    headers, block_start = _warc_headers(member.data)
    declared = headers.get("content-length", "")
    if block_start < 0 or not declared.isdigit() or block_start + int(declared) + 4 != member.length:
        return None
    return headers.get("warc-type")


def _skipped_member(path: str, member: _Member, problem: str, detail: str) -> ArchiveRecord:
    """The record of a member that could not be read, with what its first bytes still tell."""
    headers, _ = _warc_headers(member.data)
    return ArchiveRecord(
        path, member.offset, headers.get("warc-type", "unknown"), headers.get("warc-record-id"),
        headers.get("warc-target-uri"), _parse_warc_date(headers.get("warc-date")), problem=problem,
        detail=f"{path}: bytes {member.offset:,}-{member.end:,} skipped: {detail}",
        skipped_bytes=member.end - member.offset,
    )


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
                out = _warc_record(path, record, kind, max_payload_bytes, record.stream_pos)
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


def _warc_record(path: str, record, kind: str, max_payload_bytes: int, offset: int) -> ArchiveRecord:
    headers = record.headers
    out = ArchiveRecord(
        warc_file=path,
        offset=offset,
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
              end: int | None, opener: Opener) -> Iterator[ArchiveRecord]:
    """Records of an ARC file from `start`, up to the first record at or after `end` (None: all)."""
    from warcio.archiveiterator import ArchiveIterator

    with opener(path) as stream:
        stream.seek(start)
        iterator = ArchiveIterator(stream, arc2warc=True)
        records = iter(iterator)
        position = start
        while True:
            try:
                record = next(records)
                if end is not None and iterator.offset >= end:  # the offset of the record just read
                    return
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
    for record in iter_records(warc_file, max_payload_bytes=2**40, start=offset, end=offset + 1):
        if record.offset != offset or record.problem == "unreadable":
            break
        return record
    raise ValueError(f"{warc_file}: no response, resource or conversion record starts at byte {offset}")
