"""The crawl frontier: which URLs are the same page, which are in scope, and which to fetch next.

- `normalize_url` maps the many spellings of one URL to one string, so de-duplication is a set lookup.
- `Scope` says whether a URL belongs to the crawl (hosts, domains, include/exclude patterns).
- `Frontier` hands URLs to fetch workers breadth-first while keeping every host polite: at most
  `per_host_concurrency` requests in flight per host and `delay` seconds between them.
"""

from __future__ import annotations

import asyncio
import heapq
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

from gristmill.pipeline.crawl.safety import ALLOWED_SCHEMES

_DEFAULT_PORTS = {"http": 80, "https": 443}
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters left as they are when re-quoting a path or query (RFC 3986 reserved + `%`).
_SAFE_PATH = "/%:@!$&'()*+,;="
_SAFE_QUERY = _SAFE_PATH + "?"


def _normalize_percent(text: str, safe: str) -> str:
    """Upper-case percent escapes, decode escaped unreserved characters, escape what must be."""

    def fix(match: re.Match) -> str:
        char = chr(int(match.group(1), 16))
        return char if char in _UNRESERVED else f"%{match.group(1).upper()}"

    return quote(_PERCENT.sub(fix, text), safe=safe)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4: `/a/./b/../c` -> `/a/c`, keeping a trailing slash."""
    output: list[str] = []
    segments = path.split("/")
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == ".":
            if last:
                output.append("")
        elif segment == "..":
            if len(output) > 1:
                output.pop()
            if last:
                output.append("")
        else:
            output.append(segment)
    result = "/".join(output)
    return result if result.startswith("/") else "/" + result


def normalize_url(url: str, base: str | None = None) -> str | None:
    """The canonical form of `url` (resolved against `base`), or None when it is not crawlable.

    Lower-case scheme and host (IDNA-encoded), default port dropped, user info and fragment
    dropped, dot segments resolved, percent escapes normalised, empty path -> `/`. Query parameter
    order is kept: reordering can change what a server returns. Only http and https are crawlable.
    """
    url = url.strip()
    if base is not None:
        url = urljoin(base, url)
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES or not host:
        return None
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host.lower()
    except UnicodeError:
        return None
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    path = _remove_dot_segments(_normalize_percent(parts.path or "/", _SAFE_PATH))
    query = _normalize_percent(parts.query, _SAFE_QUERY)
    return urlunsplit((scheme, netloc, path, query, ""))


def host_of(url: str) -> str:
    """`host[:port]` of a normalised URL: the unit of politeness."""
    return urlsplit(url).netloc


def origin_of(url: str) -> str:
    """`scheme://host[:port]` of a normalised URL: the unit robots.txt applies to."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@dataclass(frozen=True)
class Scope:
    """Which URLs belong to the crawl.

    The host rule: with `allowed_domains`, a host must be one of them or a subdomain of one;
    otherwise with `same_host`, it must be the host of a seed; otherwise any host. Then the URL
    must match one of `include` (when given) and none of `exclude` (regular expressions, searched
    anywhere in the URL).
    """

    seed_hosts: frozenset[str]
    same_host: bool = True
    allowed_domains: tuple[str, ...] = ()
    include: tuple[re.Pattern, ...] = ()
    exclude: tuple[re.Pattern, ...] = ()

    @classmethod
    def build(cls, seeds: list[str], same_host: bool, allowed_domains: list[str], include: list[str],
              exclude: list[str]) -> Scope:
        """A Scope from config values; a bad pattern is a ValueError naming it."""

        def compile_all(key: str, patterns: list[str]) -> tuple[re.Pattern, ...]:
            compiled = []
            for pattern in patterns:
                try:
                    compiled.append(re.compile(pattern))
                except re.error as error:
                    raise ValueError(f"{key}: {pattern!r} is not a valid regular expression ({error})") from None
            return tuple(compiled)

        return cls(
            seed_hosts=frozenset(urlsplit(s).hostname or "" for s in seeds),
            same_host=same_host,
            allowed_domains=tuple(d.lower().strip(".") for d in allowed_domains),
            include=compile_all("include", include),
            exclude=compile_all("exclude", exclude),
        )

    def rejects(self, url: str) -> str | None:
        """Why `url` (normalised) is out of scope, or None when it is in scope."""
        host = urlsplit(url).hostname or ""
        if self.allowed_domains:
            if not any(host == d or host.endswith("." + d) for d in self.allowed_domains):
                return f"host {host} not in allowed_domains"
        elif self.same_host and host not in self.seed_hosts:
            return f"host {host} is not a seed host"
        if self.include and not any(p.search(url) for p in self.include):
            return "matches no include pattern"
        for pattern in self.exclude:
            if pattern.search(url):
                return f"matches exclude pattern {pattern.pattern!r}"
        return None


@dataclass(order=True)
class FrontierEntry:
    """A URL waiting to be fetched. Ordered by (depth, seq): breadth-first, then discovery order."""

    depth: int
    seq: int
    url: str = field(compare=False)
    redirects: int = field(default=0, compare=False)
    attempts: int = field(default=0, compare=False)

    @property
    def host(self) -> str:
        return host_of(self.url)


@dataclass
class _Host:
    queue: list[FrontierEntry] = field(default_factory=list)  # a heap
    active: int = 0
    ready_at: float = 0.0
    delay: float = 0.0


class Frontier:
    """Per-host queues of URLs with politeness, shared by the fetch workers of one event loop.

    `pop()` waits until some host may be fetched from and returns its next URL (lowest depth
    first), or None once nothing is queued, nothing is in flight, or `budget()` (how many more
    fetches may start) is used up. Every popped entry must be given back with `release()`.
    """

    def __init__(self, per_host_concurrency: int, delay: float, budget: Callable[[], int]) -> None:
        self.per_host_concurrency = per_host_concurrency
        self.default_delay = delay
        self.budget = budget
        self.in_flight = 0
        self._hosts: dict[str, _Host] = {}
        self._changed = asyncio.Condition()

    def _host(self, name: str) -> _Host:
        if name not in self._hosts:
            self._hosts[name] = _Host(delay=self.default_delay)
        return self._hosts[name]

    def push(self, entry: FrontierEntry, not_before: float = 0.0) -> None:
        host = self._host(entry.host)
        heapq.heappush(host.queue, entry)
        host.ready_at = max(host.ready_at, not_before)

    def set_delay(self, host: str, delay: float) -> None:
        """Seconds between requests to `host` from now on (the larger of the default and robots.txt's)."""
        self._host(host).delay = max(self.default_delay, delay)

    def delay_of(self, host: str) -> float:
        return self._host(host).delay

    def queued(self) -> int:
        return sum(len(h.queue) for h in self._hosts.values())

    async def pop(self) -> FrontierEntry | None:
        async with self._changed:
            while True:
                now = time.monotonic()
                best: _Host | None = None
                wake = float("inf")
                for host in self._hosts.values():
                    if not host.queue or host.active >= self.per_host_concurrency:
                        continue
                    if host.ready_at > now:
                        wake = min(wake, host.ready_at)
                    elif best is None or host.queue[0] < best.queue[0]:
                        best = host
                budget_left = self.budget() - self.in_flight
                if best is not None and budget_left > 0:
                    best.active += 1
                    best.ready_at = now + best.delay
                    self.in_flight += 1
                    return heapq.heappop(best.queue)
                if self.in_flight == 0 and (self.queued() == 0 or self.budget() <= 0):
                    self._changed.notify_all()
                    return None
                timeout = None if budget_left <= 0 or wake == float("inf") else max(wake - now, 0.0)
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout)
                except asyncio.TimeoutError:
                    pass

    async def release(self, entry: FrontierEntry) -> None:
        """The fetch of `entry` is over: the host's next request waits `delay` from now."""
        async with self._changed:
            host = self._host(entry.host)
            host.active -= 1
            host.ready_at = max(host.ready_at, time.monotonic() + host.delay)
            self.in_flight -= 1
            self._changed.notify_all()

    async def add(self, entries: list[FrontierEntry], not_before: float = 0.0) -> None:
        """Queue newly discovered entries and wake waiting workers."""
        async with self._changed:
            for entry in entries:
                self.push(entry, not_before)
            self._changed.notify_all()
