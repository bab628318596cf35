"""WARC output of the crawler: request + response records, gzip per record, files rolled by size.

Records follow Common Crawl's conventions so any WARC tool (and the extract stage) reads them:
a `warcinfo` record opens each file, every fetched page is a `request` record followed by its
`response` (`WARC-Concurrent-To` links them), the response carries `WARC-IP-Address` and
`WARC-Identified-Payload-Type` (the type sniffed from the bytes, not the one the server declared).
The payload is stored decoded; the server's `Content-Encoding`, `Transfer-Encoding` and
`Content-Length` headers are kept as `X-Crawler-*` and `Content-Length` is set to the stored size.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

import gristmill

WARC_FOLDER = "warc"

# Headers that describe the bytes on the wire, not the stored payload (Common Crawl's renaming).
_WIRE_HEADERS = ("content-encoding", "transfer-encoding", "content-length")

# Leading bytes -> media type, for WARC-Identified-Payload-Type. Checked in order.
_MAGIC = (
    (b"%PDF-", "application/pdf"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF8", "image/gif"),
    (b"PK\x03\x04", "application/zip"),
    (b"\x1f\x8b", "application/gzip"),
    (b"<?xml", "application/xml"),
    (b"{", "application/json"),
)
_HTML_MARKERS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<title")


def identify_payload_type(body: bytes, declared: str | None) -> str:
    """The media type the bytes look like: magic numbers, then HTML markers, else the declared type."""
    head = body[:1024].lstrip()
    lowered = head.lower()
    if any(marker in lowered for marker in _HTML_MARKERS):
        return "text/html"
    for magic, media_type in _MAGIC:
        if head.startswith(magic):
            return media_type
    return declared or "application/octet-stream"


@dataclass
class Exchange:
    """One fetched page as it goes into the WARC file."""

    url: str
    fetch_time: datetime
    ip_address: str | None
    request_line: str
    request_headers: list[tuple[str, str]]
    status: int
    reason: str
    http_version: str
    response_headers: list[tuple[str, str]]
    body: bytes
    declared_type: str | None


def _stored_headers(headers: list[tuple[str, str]], size: int) -> list[tuple[str, str]]:
    stored = [(f"X-Crawler-{k}" if k.lower() in _WIRE_HEADERS else k, v) for k, v in headers]
    return stored + [("Content-Length", str(size))]


class WarcRoller:
    """Appends exchanges to `<folder>/<prefix>-NNNNN.warc.gz`, starting a new file once one
    reaches `max_bytes`.

    `position` (`"<index>:<offset>"`) is what the crawl state commits after each exchange; opening
    with a committed position cuts the current file back to it and deletes later files, which
    drops any record written after the last commit of a killed crawl.
    """

    def __init__(self, folder: Path, prefix: str, max_bytes: int, position: str | None) -> None:
        self.folder = Path(folder)
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        index, offset = (int(x) for x in position.split(":")) if position else (0, 0)
        for path in self.folder.glob(f"{prefix}-*.warc.gz"):
            if int(path.name[len(prefix) + 1 : -len(".warc.gz")]) > index:
                path.unlink()
        self.index = index
        self._file = None  # a file is created with its first exchange: no record-less files
        if offset > 0:
            with open(self._path(index), "r+b") as handle:
                handle.truncate(offset)
            self._file = open(self._path(index), "ab")
            self._writer = WARCWriter(self._file, gzip=True)

    def _path(self, index: int) -> Path:
        return self.folder / f"{self.prefix}-{index:05d}.warc.gz"

    def _open_new(self) -> None:
        path = self._path(self.index)
        self._file = open(path, "wb")
        self._writer = WARCWriter(self._file, gzip=True)
        info = self._writer.create_warcinfo_record(
            path.name,
            {"software": f"gristmill/{gristmill.__version__}", "format": "WARC File Format 1.0",
             "description": "gristmill crawl"},
        )
        self._writer.write_record(info)

    @property
    def position(self) -> str:
        return f"{self.index}:{self._file.tell() if self._file else 0}"

    @property
    def files(self) -> list[Path]:
        return sorted(self.folder.glob(f"{self.prefix}-*.warc.gz"))

    def write(self, exchange: Exchange) -> str:
        """Append the request and response records of `exchange`; returns the new position."""
        if self._file is None:
            self._open_new()
        elif self._file.tell() >= self.max_bytes:
            self._file.close()
            self.index += 1
            self._open_new()
        date = exchange.fetch_time.strftime("%Y-%m-%dT%H:%M:%SZ")
        request = self._writer.create_warc_record(
            exchange.url,
            "request",
            payload=io.BytesIO(b""),
            http_headers=StatusAndHeaders(exchange.request_line, exchange.request_headers, is_http_request=True),
            warc_headers_dict={"WARC-Date": date},
        )
        response_headers = {
            "WARC-Date": date,
            "WARC-Concurrent-To": request.rec_headers.get_header("WARC-Record-ID"),
            "WARC-Identified-Payload-Type": identify_payload_type(exchange.body, exchange.declared_type),
        }
        if exchange.ip_address:
            response_headers["WARC-IP-Address"] = exchange.ip_address
        response = self._writer.create_warc_record(
            exchange.url,
            "response",
            payload=io.BytesIO(exchange.body),
            http_headers=StatusAndHeaders(
                f"{exchange.status} {exchange.reason}".strip(),
                _stored_headers(exchange.response_headers, len(exchange.body)),
                protocol=exchange.http_version,
            ),
            warc_headers_dict=response_headers,
        )
        self._writer.write_record(request)
        self._writer.write_record(response)
        self._file.flush()
        return self.position

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
