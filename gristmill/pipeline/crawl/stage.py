"""The crawl stage: fetch pages from seed URLs into WARC files, politely, safely, resumably.

Output, in the stage folder (the contract with `extract`):

    warc/crawl-00000.warc.gz ...   request + response records of every page kept (gzip per record)
    crawl_log.parquet              one row per fetch attempt outcome (url, status, content_type,
                                   bytes, fetch_time, elapsed_s, depth, error, robots_meta)
    crawl_log/part-00000.parquet   the same rows, written in parts while the crawl runs
    crawl_state.sqlite             the resume state (seen URLs, done URLs, robots.txt, WARC position)

Only 2xx responses with a kept content type go into the WARC files (as Common Crawl's main WARCs);
redirects, errors and skipped pages are in the crawl log. A redirect is not followed inline: its
target is queued like a link (same depth, one more redirect hop), so every hop gets the same scope,
robots.txt, politeness, de-duplication and address checks as any other URL.

Links marked `rel="nofollow"`, and every link of a page whose `<meta name="robots">` says `nofollow`,
are not followed (as CCBot does). A page whose meta robots says `noindex` is still kept in the WARC
(the directive is about search indexes, and the page's bytes carry it); the log row records it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pyarrow as pa
from protego import Protego
from pydantic import Field, field_validator

import gristmill
from gristmill.pipeline import io
from gristmill.pipeline.crawl.frontier import (
    Frontier,
    FrontierEntry,
    Scope,
    host_of,
    normalize_url,
    origin_of,
)
from gristmill.pipeline.crawl.links import PageLinks, read_links
from gristmill.pipeline.crawl.safety import AddressPolicy, GuardedTransport, UnsafeAddressError
from gristmill.pipeline.crawl.serve import serve_directory
from gristmill.pipeline.crawl.state import CrawlState, LogRow
from gristmill.pipeline.crawl.warc import WARC_FOLDER, Exchange, WarcRoller
from gristmill.pipeline.stage import StageConfig, StageContext, StageResult, custom_stage

LOG_FILE = "crawl_log.parquet"
ROBOTS_MAX_BYTES = 500 * 1024  # RFC 9309: crawlers must parse at least 500 KiB
ROBOTS_MAX_REDIRECTS = 5  # RFC 9309: follow at least five consecutive redirects
DEFAULT_USER_AGENT = f"gristmill/{gristmill.__version__} (web crawler for LLM pretraining data)"


class CrawlConfig(StageConfig):
    """Settings of the crawl stage; the README (crawl) says why each default is what it is."""

    seeds: list[str] = []
    seeds_file: str | None = None
    serve_directory: str | None = None
    serve_port: int = Field(0, ge=0, le=65535)
    user_agent: str = DEFAULT_USER_AGENT
    max_pages: int = Field(1000, ge=1)
    max_depth: int = Field(3, ge=0)
    concurrency: int = Field(16, ge=1)
    per_host_concurrency: int = Field(1, ge=1)
    delay_s: float = Field(1.0, ge=0)
    max_crawl_delay_s: float = Field(30.0, ge=0)
    obey_robots: bool = True
    obey_meta_robots: bool = True
    follow_nofollow_links: bool = False
    same_host: bool = True
    allowed_domains: list[str] = []
    include: list[str] = []
    exclude: list[str] = []
    max_redirects: int = Field(5, ge=0)
    timeout_s: float = Field(30.0, gt=0)
    max_retries: int = Field(2, ge=0)
    retry_backoff_s: float = Field(2.0, ge=0)
    max_body_bytes: int = Field(5 * 1024 * 1024, ge=1)
    # Links followed per page: documentation index pages have thousands; a hostile page can have
    # millions. Links past the cap are counted (`links_over_cap`), not queued.
    max_links_per_page: int = Field(5000, ge=0)
    content_types: list[str] = ["text/html", "application/xhtml+xml"]
    allow_networks: list[str] = []
    warc_max_bytes: int = Field(1024 * 1024 * 1024, ge=1)
    warc_prefix: str = Field("crawl", pattern=r"^[A-Za-z0-9_.]+$")
    log_part_rows: int = Field(1000, ge=1)
    log_part_interval_s: float = Field(10.0, ge=0)

    @field_validator("allow_networks")
    @classmethod
    def _networks_parse(cls, value: list[str]) -> list[str]:
        AddressPolicy.from_strings(value)
        return value

    @field_validator("content_types")
    @classmethod
    def _lower(cls, value: list[str]) -> list[str]:
        return [v.strip().lower() for v in value]


def _media_type(content_type: str | None) -> str | None:
    """`text/html` from `Text/HTML; charset=utf-8`; None when there is no type."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    return media_type or None


def _robots_names(user_agent: str) -> tuple[str, ...]:
    """Meta tag names addressed to this crawler: `robots` and the user agent's product token."""
    token = user_agent.split("/", 1)[0].split()[0].lower() if user_agent.strip() else ""
    return ("robots", token) if token else ("robots",)


def _retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max((parsedate_to_datetime(value) - now).total_seconds(), 0.0)
    except (TypeError, ValueError):
        return None


class _Fetched:
    """What one GET returned (or why it failed), before deciding what to keep."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fetch_time = datetime.now(timezone.utc)
        self.started = time.monotonic()
        self.elapsed_s = 0.0
        self.status: int | None = None
        self.content_type: str | None = None
        self.body = b""
        self.error: str | None = None
        self.location: str | None = None
        self.retry_after: str | None = None
        self.exchange: Exchange | None = None


class Crawler:
    """One crawl into one folder: a pool of fetch workers over a persisted frontier."""

    def __init__(self, config: CrawlConfig, folder: Path, seeds: list[str], policy: AddressPolicy) -> None:
        self.config = config
        self.folder = Path(folder)
        self.seeds = seeds
        self.policy = policy
        self.scope = Scope.build(seeds, config.same_host, config.allowed_domains, config.include, config.exclude)
        self.state = CrawlState(self.folder)
        self.stored = self.state.pages_stored()
        self.robots_names = _robots_names(config.user_agent)
        self._log_part_at = time.monotonic()
        self._robots: dict[str, Protego] = {}
        self._robots_locks: dict[str, asyncio.Lock] = {}

    async def run(self) -> None:
        config = self.config
        self.warc = WarcRoller(self.folder / WARC_FOLDER, config.warc_prefix, config.warc_max_bytes,
                               self.state.get_meta("warc_position"))
        self.frontier = Frontier(config.per_host_concurrency, config.delay_s,
                                 budget=lambda: config.max_pages - self.stored)
        self.state.add_urls([(seed, 0, 0) for seed in self.seeds])
        await self.frontier.add(self.state.queued())
        transport = GuardedTransport(self.policy, max_connections=config.concurrency)
        async with httpx.AsyncClient(
            transport=transport,
            headers={"User-Agent": config.user_agent},
            timeout=config.timeout_s,
            follow_redirects=False,  # pages: redirects are queued; robots.txt: followed, see _robots_for
            max_redirects=ROBOTS_MAX_REDIRECTS,
            trust_env=False,
        ) as self.client:
            await asyncio.gather(*(self._worker() for _ in range(config.concurrency)))
        self.warc.close()
        self.state.write_log_part(self.folder)

    async def _worker(self) -> None:
        while (entry := await self.frontier.pop()) is not None:
            try:
                await self._process(entry)
            finally:
                await self.frontier.release(entry)
            self._write_log_part_if_due()

    def _write_log_part_if_due(self) -> None:
        """A new `crawl_log/` part every `log_part_rows` rows or `log_part_interval_s` seconds."""
        now = time.monotonic()
        if (self.state.unwritten_log_rows() >= self.config.log_part_rows
                or now - self._log_part_at >= self.config.log_part_interval_s):
            self.state.write_log_part(self.folder)
            self._log_part_at = now

    async def _process(self, entry: FrontierEntry) -> None:
        config = self.config
        if config.obey_robots:
            robots = await self._robots_for(entry)
            if not robots.can_fetch(entry.url, config.user_agent):
                row = LogRow(entry.url, None, None, 0, datetime.now(timezone.utc), 0.0, entry.depth,
                             "robots.txt disallows")
                self.state.finish(entry, False, [row], [], None)
                return
        fetched = await self._fetch(entry.url, follow_redirects=False, max_bytes=config.max_body_bytes,
                                    keep_types=config.content_types)
        row = LogRow(entry.url, fetched.status, fetched.content_type, len(fetched.body), fetched.fetch_time,
                     fetched.elapsed_s, entry.depth, fetched.error)
        if self._should_retry(fetched) and entry.attempts < config.max_retries:
            entry.attempts += 1
            wait = config.retry_backoff_s * 2 ** (entry.attempts - 1)
            retry_after = _retry_after(fetched.retry_after, datetime.now(timezone.utc))
            if retry_after is not None:
                wait = max(wait, min(retry_after, config.max_crawl_delay_s))
            self.state.retry(entry, row)
            await self.frontier.add([entry], not_before=time.monotonic() + wait)
            return
        discovered: list[tuple[str, int, int]] = []
        position = None
        stored = fetched.exchange is not None
        if stored:
            position = self.warc.write(fetched.exchange)
            self.stored += 1
            if _media_type(fetched.content_type) in ("text/html", "application/xhtml+xml"):
                # Parsing is CPU work: off the event loop, so timeouts and other fetches go on meanwhile.
                page, discovered, row.links_over_cap = await asyncio.to_thread(self._outlinks, fetched.body, entry,
                                                                              fetched.content_type)
                row.robots_meta = ",".join(sorted(page.robots)) or None
        elif fetched.location is not None:
            row.error, discovered = self._follow_redirect(entry, fetched.location)
        new = self.state.finish(entry, stored, [row], discovered, position)
        await self.frontier.add(new)

    def _outlinks(self, body: bytes, entry: FrontierEntry, content_type: str | None
                  ) -> tuple[PageLinks, list[tuple[str, int, int]], int]:
        """The page's links and meta robots, the in-scope links to queue, and how many more links it
        would have followed but for `max_links_per_page`. Pure: safe to run on a worker thread."""
        config = self.config
        cap = config.max_links_per_page
        page = read_links(body, entry.url, content_type, self.robots_names, max_links=cap)
        links, count = page.links, page.link_count
        if config.follow_nofollow_links:
            links, count = links + page.nofollow_links, count + page.nofollow_count
        if (config.obey_meta_robots and "nofollow" in page.robots) or entry.depth >= config.max_depth:
            return page, [], 0
        return page, self._in_scope(links[:cap], entry.depth + 1, 0), max(count - cap, 0)

    def _in_scope(self, urls: list[str], depth: int, redirects: int) -> list[tuple[str, int, int]]:
        found = []
        for url in urls:
            normalized = normalize_url(url)
            if normalized is not None and self.scope.rejects(normalized) is None:
                found.append((normalized, depth, redirects))
        return found

    def _follow_redirect(self, entry: FrontierEntry, location: str) -> tuple[str | None, list]:
        """The error to log (None if fine) and the redirect target to queue."""
        target = normalize_url(location, base=entry.url)
        if target is None:
            return f"redirect to an uncrawlable URL {location!r}", []
        if entry.redirects >= self.config.max_redirects:
            return f"too many redirects (max_redirects {self.config.max_redirects}), last to {target}", []
        rejected = self.scope.rejects(target)
        if rejected is not None:
            return f"redirect to {target} out of scope: {rejected}", []
        return None, [(target, entry.depth, entry.redirects + 1)]

    @staticmethod
    def _should_retry(fetched: _Fetched) -> bool:
        if fetched.status is not None:
            return fetched.status == 429 or fetched.status >= 500
        return fetched.error is not None and not fetched.error.startswith("unsafe address")

    async def _fetch(self, url: str, follow_redirects: bool, max_bytes: int,
                     keep_types: list[str] | None, truncate: bool = False) -> _Fetched:
        """GET `url` within `timeout_s` in all; never raises for network or HTTP trouble.

        A (decoded) body over `max_bytes` is an error, or with `truncate` its first `max_bytes`."""
        fetched = _Fetched(url)
        try:
            await asyncio.wait_for(self._get(fetched, follow_redirects, max_bytes, keep_types, truncate),
                                   self.config.timeout_s)
        except asyncio.TimeoutError:
            fetched.error = f"timeout after {self.config.timeout_s}s"
        except UnsafeAddressError as error:
            fetched.error = f"unsafe address: {error}"
        except httpx.HTTPError as error:
            fetched.error = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        fetched.elapsed_s = round(time.monotonic() - fetched.started, 6)
        return fetched

    async def _get(self, fetched: _Fetched, follow_redirects: bool, max_bytes: int,
                   keep_types: list[str] | None, truncate: bool) -> None:
        async with self.client.stream("GET", fetched.url, follow_redirects=follow_redirects) as response:
            fetched.status = response.status_code
            fetched.content_type = response.headers.get("content-type")
            fetched.retry_after = response.headers.get("retry-after")
            if response.is_redirect:
                fetched.location = response.headers.get("location")
                return
            if not response.is_success:
                return
            media_type = _media_type(fetched.content_type)
            if keep_types is not None and media_type not in keep_types:
                fetched.error = f"content type {media_type} not kept"
                return
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > max_bytes and not truncate:
                fetched.error = f"body of {declared} bytes over max_body_bytes {max_bytes}"
                return
            stream = response.extensions.get("network_stream")  # read before the body closes it
            server = stream.get_extra_info("server_addr") if stream is not None else None
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > max_bytes and truncate:
                    fetched.body = bytes(body[:max_bytes])
                    return
                if len(body) > max_bytes:
                    fetched.body = bytes(body)
                    fetched.error = f"body over max_body_bytes {max_bytes}"
                    return
            fetched.body = bytes(body)
            request = response.request
            fetched.exchange = Exchange(
                url=fetched.url,
                fetch_time=fetched.fetch_time,
                ip_address=server[0] if server else None,
                request_line=f"GET {request.url.raw_path.decode('ascii')} HTTP/1.1",
                request_headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw],
                status=response.status_code,
                reason=response.reason_phrase,
                http_version=response.http_version,
                response_headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw],
                body=fetched.body,
                declared_type=media_type,
            )

    async def _robots_for(self, entry: FrontierEntry) -> Protego:
        """The robots.txt rules of `entry`'s origin, fetched once per crawl (and kept in the state).

        RFC 9309: a 4xx means no rules; 5xx, 429 or no answer means everything is disallowed
        (not saved, so a restarted crawl asks again). `Crawl-delay` sets the host's delay.
        """
        origin = origin_of(entry.url)
        lock = self._robots_locks.setdefault(origin, asyncio.Lock())
        async with lock:
            if origin in self._robots:
                return self._robots[origin]
            saved = self.state.robots(origin)
            fetched_now = saved is None
            if fetched_now:
                fetched = await self._fetch(origin + "/robots.txt", follow_redirects=True,
                                            max_bytes=ROBOTS_MAX_BYTES, keep_types=None, truncate=True)
                self.state.log_row(LogRow(fetched.url, fetched.status, fetched.content_type, len(fetched.body),
                                          fetched.fetch_time, fetched.elapsed_s, None, fetched.error))
                status = fetched.status or 0
                if 200 <= status < 300 or (400 <= status < 500 and status != 429):
                    saved = (status, fetched.body)
                    self.state.save_robots(origin, *saved)
            if saved is None:
                rules = Protego.parse("User-agent: *\nDisallow: /\n")
            elif 200 <= saved[0] < 300:
                rules = Protego.parse(robots_text(saved[1]))
            else:
                rules = Protego.parse("")
            delay = rules.crawl_delay(self.config.user_agent)
            if delay is not None:
                self.frontier.set_delay(entry.host, min(float(delay), self.config.max_crawl_delay_s))
            self._robots[origin] = rules
            if fetched_now:
                await asyncio.sleep(self.frontier.delay_of(entry.host))  # the page request waits its turn
            return rules


def robots_text(body: bytes) -> str:
    """The robots.txt rules the crawler obeys: the first `ROBOTS_MAX_BYTES` of the decoded body
    (RFC 9309 section 2.5), without a line cut off at that limit (half a path is another rule)."""
    if len(body) >= ROBOTS_MAX_BYTES:
        body = body[:ROBOTS_MAX_BYTES]
        body = body[: body.rfind(b"\n") + 1]
    return body.decode("utf-8", errors="replace")


def crawl_stats(log: pa.Table, top: int = 20, max_errors: int = 200) -> tuple[dict, dict]:
    """`(counts, stats)` for `stats.json` from the crawl log (shape documented in the README, crawl)."""
    rows = log.to_pylist()
    pages = [r for r in rows if r["status"] is not None and 200 <= r["status"] < 300 and r["error"] is None
             and r["depth"] is not None]
    errors = [r for r in rows if r["error"] is not None or (r["status"] or 0) >= 400]
    status_counts = Counter(str(r["status"]) if r["status"] is not None else "none" for r in rows)
    content_types = Counter(_media_type(r["content_type"]) or "none" for r in rows if r["status"] is not None)
    hosts: dict[str, dict[str, int]] = {}
    for r in pages:
        host = hosts.setdefault(host_of(r["url"]), {"pages": 0, "bytes": 0})
        host["pages"] += 1
        host["bytes"] += r["bytes"]
    top_hosts = [{"host": h, **v} for h, v in sorted(hosts.items(), key=lambda kv: -kv[1]["pages"])[:top]]
    timeline: dict = {"bin_s": 1.0, "counts": []}
    if pages:
        start = min(r["fetch_time"] for r in rows)
        offsets = [(r["fetch_time"] - start).total_seconds() for r in pages]
        span = max(offsets)
        bin_s = max(1.0, float(int(span / 120) + 1))  # at most ~120 bins
        counts = [0] * (int(span // bin_s) + 1)
        for offset in offsets:
            counts[int(offset // bin_s)] += 1
        timeline = {"bin_s": bin_s, "counts": counts, "pages_per_s": [c / bin_s for c in counts]}
    counts = {
        "pages_fetched": len(pages),
        "fetch_attempts": sum(1 for r in rows if r["error"] != "robots.txt disallows"),
        "errors": len(errors),
        "bytes": sum(r["bytes"] for r in pages),
        "robots_disallowed": sum(1 for r in rows if r["error"] == "robots.txt disallows"),
        "robots_meta_noindex": sum(1 for r in pages if "noindex" in (r["robots_meta"] or "").split(",")),
        "robots_meta_nofollow": sum(1 for r in pages if "nofollow" in (r["robots_meta"] or "").split(",")),
        "pages_over_link_cap": sum(1 for r in pages if r["links_over_cap"]),
        "links_over_cap": sum(r["links_over_cap"] or 0 for r in pages),
    }
    stats = {
        "crawl": {
            "status_counts": dict(status_counts),
            "content_types": dict(content_types),
            "top_hosts": top_hosts,
            "pages_over_time": timeline,
            "errors": [{"url": r["url"], "status": r["status"], "error": r["error"]} for r in errors[:max_errors]],
        }
    }
    return counts, stats


def _read_seeds_file(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise FileNotFoundError(f"seeds_file: cannot read {path} ({error})") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _seed_urls(config: CrawlConfig, base_dir: Path, served_root: str | None) -> list[str]:
    """Normalised seed URLs; with a served folder, relative seeds are relative to its root."""
    raw = list(config.seeds)
    if config.seeds_file:
        raw += _read_seeds_file(base_dir / config.seeds_file)
    if served_root is not None:
        raw = [urljoin(served_root, seed) for seed in raw or ["/"]]
    if not raw:
        raise ValueError("crawl: no seeds; set `seeds`, `seeds_file` or `serve_directory`")
    seeds = []
    for seed in raw:
        normalized = normalize_url(seed)
        if normalized is None:
            raise ValueError(f"crawl: seed {seed!r} is not an absolute http(s) URL")
        seeds.append(normalized)
    return seeds


def run_crawl(config: CrawlConfig, folder: str | Path, base_dir: str | Path = ".") -> StageResult:
    """Crawl into `folder` (resuming what is there), write `crawl_log.parquet`, return counts and stats.

    `crawl_log.parquet` is written when the crawl ends; `crawl_log/` holds the same rows in parts
    written while it runs (see `CrawlState.write_log_part`).

    `base_dir` is where relative `serve_directory` and `seeds_file` paths start (the workflow's folder).
    """
    folder, base_dir = Path(folder), Path(base_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if config.serve_directory is None:
        policy = AddressPolicy.from_strings(config.allow_networks)
        crawler = Crawler(config, folder, _seed_urls(config, base_dir, None), policy)
        asyncio.run(crawler.run())
    else:
        # A resumed crawl serves on the port its queued URLs name.
        state = CrawlState(folder)
        port = int(state.get_meta("serve_port") or config.serve_port)
        with serve_directory(base_dir / config.serve_directory, port) as (host, port):
            state.set_meta("serve_port", str(port))
            state.close()
            policy = AddressPolicy.from_strings(config.allow_networks, endpoints=[(host, port)])
            crawler = Crawler(config, folder, _seed_urls(config, base_dir, f"http://{host}:{port}/"), policy)
            asyncio.run(crawler.run())
    log = crawler.state.log_table()
    crawler.state.close()
    io.write_parquet_atomic(log, folder / LOG_FILE)
    counts, stats = crawl_stats(log)
    counts["warc_files"] = len(list((folder / WARC_FOLDER).glob("*.warc.gz")))
    return StageResult(counts=counts, stats=stats)


@custom_stage("crawl", CrawlConfig, produces_documents=False, needs_input=False)
def crawl_stage(ctx: StageContext) -> StageResult:
    """Crawl the configured seeds into the stage folder (see the module docstring for its layout)."""
    return run_crawl(ctx.config, ctx.stage_dir, ctx.workflow_dir)
