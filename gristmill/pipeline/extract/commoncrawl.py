"""Common Crawl as an input: a dump's `warc.paths.gz` (or `wet.paths.gz`) list, its files streamed.

The list names files relative to `base_url`: Common Crawl's public HTTPS endpoint by default, or
`s3://commoncrawl/` (through s3fs, with its own retries). Over HTTP(S) every file is read as one
stream that survives throttling: a 503 SlowDown, 429, 5xx or a connection cut mid-body is retried
with jittered exponential backoff, and a retry resumes at the byte where the stream stopped (a
`Range` request), so every record is read exactly once. Retries, requests and bytes are counted
for the stage's stats. A Dask cluster caps the downloads running at once with a distributed
semaphore; an optional random delay spreads the first requests of many tasks.
"""

from __future__ import annotations

import gzip
import io
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import IO, Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from gristmill.pipeline import storage
from gristmill.pipeline.extract.archive import ArchiveSpan

COMMON_CRAWL_HTTPS = "https://data.commoncrawl.org/"
RETRY_STATUSES = {429, 500, 502, 503, 504}
SEMAPHORE_NAME = "gristmill-commoncrawl-downloads"
_CHUNK = 1 << 16


class RetrySettings(BaseModel):
    """Backoff for throttled or dropped requests: attempt n waits `initial_s * 2**n` (at most
    `max_s`) times a random factor in [1, 1.5)."""

    model_config = ConfigDict(extra="forbid")

    attempts: int = Field(12, ge=1)
    initial_s: float = Field(1.0, gt=0)
    max_s: float = Field(60.0, gt=0)

    def delay(self, attempt: int) -> float:
        return min(self.max_s, self.initial_s * 2**attempt) * random.uniform(1.0, 1.5)


class CommonCrawlInput(BaseModel):
    """The `commoncrawl:` settings of an extract stage."""

    model_config = ConfigDict(extra="forbid")

    paths_file: str  # a local path or URL of `warc.paths.gz` / `wet.paths.gz`
    base_url: str = COMMON_CRAWL_HTTPS
    max_files: int | None = Field(None, ge=1)  # the first N files of the list
    sample_files: int | None = Field(None, ge=1)  # N files drawn at random (fixed by `seed`)
    seed: int = 0
    cache_dir: str | None = None  # keep a copy of every file read here, and read it from here next time
    max_concurrent_downloads: int = Field(4, ge=1)  # per Dask cluster
    start_delay_s: float = Field(0.0, ge=0)  # each task first sleeps a random time up to this
    timeout_s: float = Field(60.0, gt=0)
    retry: RetrySettings = RetrySettings()


def list_files(settings: CommonCrawlInput) -> list[str]:
    """URLs of the files to read: the paths list, cut to `max_files` or sampled, joined to `base_url`."""
    counters: dict[str, int] = {}
    with open_stream(settings.paths_file, settings, counters) as raw:
        data = raw.read()
    if settings.paths_file.endswith(".gz"):
        data = gzip.decompress(data)
    paths = [line.strip() for line in data.decode().splitlines() if line.strip()]
    if not paths:
        raise ValueError(f"{settings.paths_file}: the paths list is empty")
    if settings.sample_files is not None:
        chosen = random.Random(settings.seed).sample(range(len(paths)), min(settings.sample_files, len(paths)))
        paths = [paths[i] for i in sorted(chosen)]
    if settings.max_files is not None:
        paths = paths[: settings.max_files]
    return [settings.base_url.rstrip("/") + "/" + p.lstrip("/") for p in paths]


def file_spans(url: str, settings: CommonCrawlInput) -> list[ArchiveSpan]:
    """One dump file as one span, read whole. Common Crawl gzips every record as its own member
    (WARC and WET alike), so the layout needs no probe; the size costs one (retried) request, or
    none when `cache_dir` holds the file."""
    cached = _cache_path(url, settings)
    if cached is not None and cached.is_file():
        size = cached.stat().st_size
    else:
        with open_stream(url, settings, {}) as stream:
            size = stream.seek(0, io.SEEK_END)
    return [ArchiveSpan(url, 0, size, "members", "a Common Crawl file: read whole, in one stream")]


class RetryingHTTPStream(io.RawIOBase):
    """A seekable read-only HTTP(S) file that retries throttling and resumes dropped connections."""

    def __init__(self, url: str, settings: CommonCrawlInput, counters: dict[str, int]):
        self.url, self.settings, self.counters = url, settings, counters
        self._client = httpx.Client(timeout=settings.timeout_s, follow_redirects=True)
        self._response: httpx.Response | None = None
        self._chunks: Iterator[bytes] | None = None
        self._pending = b""
        self._position = 0  # where the next read starts
        self._stream_at = 0  # the file offset the open response (with `_pending` first) is at
        self._size: int | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move; an open response is kept until a read shows it is not at the new position."""
        if whence == io.SEEK_END:
            offset += self._total_size()
        elif whence == io.SEEK_CUR:
            offset += self._position
        self._position = offset
        return offset

    def readinto(self, buffer) -> int:
        return self._with_retries(lambda: self._read_some(buffer))

    def _with_retries(self, step: Callable[[], Any]) -> Any:
        error: Exception | None = None
        for attempt in range(self.settings.retry.attempts):
            if attempt:
                self.counters["retries"] = self.counters.get("retries", 0) + 1
                time.sleep(self.settings.retry.delay(attempt - 1))
            try:
                return step()
            except (httpx.TransportError, _Retry) as failure:
                error = failure
                self._drop()
        raise OSError(f"{self.url}: gave up after {self.settings.retry.attempts} attempts at byte "
                      f"{self._position}: {error}")

    def _read_some(self, buffer) -> int:
        if self._size is not None and self._position >= self._size:
            return 0
        if self._chunks is not None and self._stream_at != self._position:
            self._drop()
        if self._chunks is None and not self._open():
            return 0
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:  # the body ended: at the end of the file, or cut short
                if self._size is None or self._position >= self._size:
                    return 0
                raise _Retry(f"connection closed at byte {self._position} of {self._size}")
            self._pending = chunk
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        self._position += n
        self._stream_at += n
        self.counters["bytes"] = self.counters.get("bytes", 0) + n
        return n

    def _open(self) -> bool:
        """Start a response at the current position; False when that is past the end."""
        headers = {"Range": f"bytes={self._position}-"} if self._position else {}
        self.counters["requests"] = self.counters.get("requests", 0) + 1
        response = self._client.send(self._client.build_request("GET", self.url, headers=headers), stream=True)
        if response.status_code in RETRY_STATUSES:
            response.close()
            raise _Retry(f"HTTP {response.status_code}")
        if response.status_code == 416:
            response.close()
            return False
        if response.status_code == 404:
            response.close()
            raise FileNotFoundError(f"{self.url}: HTTP 404")
        if response.status_code not in (200, 206) or (self._position and response.status_code != 206):
            response.close()
            raise OSError(f"{self.url}: HTTP {response.status_code} for bytes {self._position}-")
        if response.status_code == 206 and "/" in response.headers.get("Content-Range", ""):
            total = response.headers["Content-Range"].rsplit("/", 1)[1]
            self._size = int(total) if total.isdigit() else None
        elif "Content-Length" in response.headers:
            self._size = self._position + int(response.headers["Content-Length"])
        self._response, self._chunks, self._stream_at = response, response.iter_raw(_CHUNK), self._position
        return True

    def _total_size(self) -> int:
        """The file's length, from the headers of a (retried) request that then serves the next read."""
        if self._size is None:
            self._with_retries(self._open)
        if self._size is None:
            raise OSError(f"{self.url}: the server does not say how long the file is")
        return self._size

    def _drop(self) -> None:
        if self._response is not None:
            self._response.close()
        self._response, self._chunks, self._pending = None, None, b""

    def close(self) -> None:
        self._drop()
        self._client.close()
        super().close()


class _Retry(Exception):
    """A response worth trying again: throttled, a server error, or a body cut short."""


def open_stream(url: str, settings: CommonCrawlInput, counters: dict[str, int]) -> IO[bytes]:
    """A buffered binary stream of `url`: retrying over HTTP(S), through fsspec otherwise."""
    if url.startswith(("http://", "https://")):
        return io.BufferedReader(RetryingHTTPStream(url, settings, counters), buffer_size=_CHUNK)
    return storage.open_binary(url)


@contextmanager
def opener(settings: CommonCrawlInput, counters: dict[str, int]) -> Iterator[Callable[[str], IO[bytes]]]:
    """A function that opens one file of the dump, within the cluster's download limit and after
    the optional start delay; with `cache_dir` a file is copied there whole first, then read locally."""
    if settings.start_delay_s:
        time.sleep(random.uniform(0, settings.start_delay_s))
    with _download_slot(settings):
        if settings.cache_dir is None:
            yield lambda url: open_stream(url, settings, counters)
            return
        yield lambda url: open(_cached(url, settings, counters), "rb")


def _cache_path(url: str, settings: CommonCrawlInput) -> Path | None:
    """Where `cache_dir` keeps `url`: its path on the server, under the cache folder."""
    if settings.cache_dir is None:
        return None
    return Path(settings.cache_dir).expanduser() / url.split("://", 1)[-1].split("/", 1)[-1]


def _cached(url: str, settings: CommonCrawlInput, counters: dict[str, int]) -> Path:
    target = _cache_path(url, settings)
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        with open_stream(url, settings, counters) as source, open(partial, "wb") as sink:
            shutil.copyfileobj(source, sink, _CHUNK)
        partial.replace(target)
    return target


def _download_slot(settings: CommonCrawlInput):
    """A lease of the cluster-wide download semaphore inside a Dask worker; nothing to wait for
    elsewhere (the synchronous scheduler reads one file at a time)."""
    try:
        from distributed import Semaphore, get_worker

        get_worker()
    except (ImportError, ValueError):
        return nullcontext()
    return Semaphore(max_leases=settings.max_concurrent_downloads, name=SEMAPHORE_NAME)
