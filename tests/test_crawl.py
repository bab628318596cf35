"""The crawl stage against real HTTP servers on loopback (127.0.0.0/8 only)."""

from __future__ import annotations

import asyncio
import gzip
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastwarc.warc import ArchiveIterator as FastArchiveIterator
from fastwarc.warc import WarcRecordType
from warcio.archiveiterator import ArchiveIterator

from gristmill import DATA_DIR
from gristmill.pipeline.crawl.safety import AddressPolicy, GuardedTransport, UnsafeAddressError
from gristmill.pipeline.crawl.stage import CrawlConfig, crawl_stats, run_crawl

SAMPLE = DATA_DIR / "sample_site"
UA = "gristmill-test/1.0"


def page(title: str, links: list[str] = (), body: str = "") -> bytes:
    anchors = "".join(f'<a href="{href}">{href}</a> ' for href in links)
    return f"<!DOCTYPE html><html><head><title>{title}</title></head><body><h1>{title}</h1>{body}{anchors}</body></html>".encode()


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # clients closing keep-alive connections
        pass


class Site:
    """A test web site: `routes` maps a path to a handler, every request is logged."""

    def __init__(self, routes: dict, host: str = "127.0.0.1") -> None:
        self.routes = routes
        self.requests: list[tuple[float, str, str]] = []  # (time, path, user agent)
        self.lock = threading.Lock()
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                with site.lock:
                    site.requests.append((time.monotonic(), self.path, self.headers.get("User-Agent", "")))
                route = site.routes.get(self.path.split("?")[0])
                try:
                    if route is None:
                        self.reply(404, b"not found", "text/plain")
                    else:
                        route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def reply(self, status: int, body: bytes = b"", content_type: str = "text/html; charset=utf-8",
                      headers: dict | None = None, declare_length: bool = True) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                if declare_length:
                    self.send_header("Content-Length", str(len(body)))
                else:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body)

        self.server = QuietServer((host, 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def paths(self) -> list[str]:
        with self.lock:
            return [path for _, path, _ in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ConnectionRecorder:
    """A TCP listener that records every connection it accepts (and answers nothing)."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen()
        self.sock.settimeout(0.02)
        self.port = self.sock.getsockname()[1]
        self.accepted: list = []
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while self.running:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                continue
            self.accepted.append(addr)
            conn.close()

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.sock.close()


def static(body: bytes, content_type: str = "text/html; charset=utf-8"):
    return lambda h: h.reply(200, body, content_type)


@pytest.fixture
def trap():
    recorder = ConnectionRecorder("127.0.0.2")
    yield recorder
    recorder.close()


@pytest.fixture
def site(trap):
    """Links several levels deep, robots.txt rules, redirects, errors, slow, big and non-HTML pages."""
    counts: Counter = Counter()

    def limited(h):
        counts["limited"] += 1
        if counts["limited"] == 1:
            h.reply(429, b"slow down", "text/plain", headers={"Retry-After": "0"})
        else:
            h.reply(200, page("limited ok"))

    def slow(h):
        time.sleep(1.0)
        h.reply(200, page("slow"))

    routes = {
        "/robots.txt": static(b"User-agent: *\nDisallow: /private/\nCrawl-delay: 0.05\n", "text/plain"),
        "/": static(page("home", [
            "/a/1.html", "/a/./1.html#top", "A/../a/1.html", "/private/secret.html", "/loop/a", "/chain/0",
            "/missing", "/error", "/limited", "/slow", "/big", "/big-stream", "/data.json", "/redirect-out",
            "mailto:someone@example.org", "file:///etc/passwd", "javascript:void(0)",
        ])),
        "/a/1.html": static(page("one", ["2.html"])),
        "/a/2.html": static(page("two", ["/a/3.html"])),
        "/a/3.html": static(page("three", ["/a/4.html"])),
        "/a/4.html": static(page("four")),
        "/private/secret.html": static(page("secret")),
        "/loop/a": lambda h: h.reply(302, b"", headers={"Location": "/loop/b"}),
        "/loop/b": lambda h: h.reply(302, b"", headers={"Location": "/loop/a"}),
        "/missing": lambda h: h.reply(404, b"gone", "text/plain"),
        "/error": lambda h: h.reply(500, b"oops", "text/plain"),
        "/limited": limited,
        "/slow": slow,
        "/big": static(page("big", body="x" * 300_000)),
        "/big-stream": lambda h: h.reply(200, page("big", body="y" * 300_000), declare_length=False),
        "/data.json": static(b'{"a": 1}', "application/json"),
        "/redirect-out": lambda h: h.reply(302, b"", headers={"Location": f"http://127.0.0.2:{trap.port}/trap"}),
    }
    for i in range(10):
        routes[f"/chain/{i}"] = (lambda n: lambda h: h.reply(301, b"", headers={"Location": f"/chain/{n + 1}"}))(i)
    server = Site(routes)
    yield server
    server.close()


def crawl_config(seeds: list[str], **overrides) -> CrawlConfig:
    settings = dict(
        type="crawl", seeds=seeds, user_agent=UA, allow_networks=["127.0.0.1/32"], delay_s=0.0,
        concurrency=4, timeout_s=0.4, max_retries=1, retry_backoff_s=0.01, max_body_bytes=100_000,
        max_depth=3, max_redirects=3,
    )
    settings.update(overrides)
    return CrawlConfig(**settings)


def warc_responses(folder: Path) -> list:
    """(url, status, body) of every response record, read with warcio."""
    out = []
    for path in sorted((folder / "warc").glob("*.warc.gz")):
        with open(path, "rb") as handle:
            for record in ArchiveIterator(handle):
                if record.rec_type == "response":
                    out.append((record.rec_headers.get_header("WARC-Target-URI"), record.http_headers.get_statuscode(),
                                record.content_stream().read(), record.rec_headers))
    return out


def test_crawl_follows_rules_of_the_site(site, trap, tmp_path):
    result = run_crawl(crawl_config([site.url + "/"]), tmp_path)
    paths = Counter(site.paths())
    log = pq.read_table(tmp_path / "crawl_log.parquet").to_pylist()
    by_url = {}
    for row in log:
        by_url.setdefault(row["url"].removeprefix(site.url), []).append(row)

    # depth: / (0) -> 1.html (1) -> 2.html (2) -> 3.html (3); 4.html is depth 4, never fetched
    assert [paths[p] for p in ("/", "/a/1.html", "/a/2.html", "/a/3.html")] == [1, 1, 1, 1]
    assert paths["/a/4.html"] == 0
    # robots.txt fetched once, obeyed, and the Crawl-delay spaces requests (0.05 s, delay_s is 0)
    assert paths["/robots.txt"] == 1
    assert paths["/private/secret.html"] == 0
    assert by_url["/private/secret.html"][0]["error"] == "robots.txt disallows"
    times = sorted(t for t, p, _ in site.requests if p != "/slow")
    assert min(b - a for a, b in zip(times, times[1:])) >= 0.045
    # every request carries the configured user agent
    assert {ua for _, _, ua in site.requests} == {UA}
    # a redirect loop ends: each URL once; a redirect chain stops at max_redirects (3)
    assert paths["/loop/a"] == 1 and paths["/loop/b"] == 1
    assert [paths[f"/chain/{i}"] for i in range(5)] == [1, 1, 1, 1, 0]
    assert "too many redirects" in by_url["/chain/3"][0]["error"]
    # 404 once; 500 retried max_retries times; 429 retried and then stored
    assert paths["/missing"] == 1 and by_url["/missing"][0]["status"] == 404
    assert paths["/error"] == 2 and [r["status"] for r in by_url["/error"]] == [500, 500]
    assert [r["status"] for r in by_url["/limited"]] == [429, 200]
    # the slow endpoint times out (0.4 s) on each attempt
    assert [r["error"] for r in by_url["/slow"]] == ["timeout after 0.4s"] * 2
    # oversized bodies (declared or streamed) and non-HTML are not kept
    assert "over max_body_bytes" in by_url["/big"][0]["error"]
    assert "over max_body_bytes" in by_url["/big-stream"][0]["error"]
    assert by_url["/data.json"][0]["error"] == "content type application/json not kept"
    # the redirect to 127.0.0.2 is out of scope (another host): never queued, never connected to
    assert "out of scope" in by_url["/redirect-out"][0]["error"]
    assert trap.accepted == []

    stored = {url.removeprefix(site.url) for url, status, _, _ in warc_responses(tmp_path)}
    assert stored == {"/", "/a/1.html", "/a/2.html", "/a/3.html", "/limited"}
    assert result.counts["pages_fetched"] == 5
    assert result.stats["crawl"]["status_counts"]["500"] == 2
    assert any(e["url"].endswith("/slow") for e in result.stats["crawl"]["errors"])


def log_parts(folder: Path) -> pa.Table:
    """The `crawl_log/part-*.parquet` files, concatenated in part order."""
    return pa.concat_tables(pq.read_table(p) for p in sorted((folder / "crawl_log").glob("part-*.parquet")))


@pytest.fixture
def robots_site():
    """Pages with rel="nofollow" links and meta robots nofollow / noindex / none."""

    def meta(title: str, name: str, content: str, links: list[str]) -> bytes:
        return page(title, links).replace(b"<title>", f'<meta name="{name}" content="{content}"><title>'.encode())

    routes = {
        "/robots.txt": static(b"User-agent: *\nAllow: /\n", "text/plain"),
        "/": lambda h: h.reply(200, page("home", ["/plain.html", "/noindex.html", "/meta-nofollow.html",
                                                   "/bot-nofollow.html", "/none.html"],
                                         body='<a href="/rel-nofollow.html" rel="ugc nofollow">x</a>')),
        "/plain.html": static(page("plain")),
        "/rel-nofollow.html": static(page("rel nofollow")),
        "/noindex.html": static(meta("noindex", "robots", "noindex", ["/after-noindex.html"])),
        "/after-noindex.html": static(page("after noindex")),
        "/meta-nofollow.html": static(meta("meta nofollow", "robots", "nofollow", ["/hidden-1.html"])),
        "/bot-nofollow.html": static(meta("bot nofollow", UA.split("/")[0], "NOFOLLOW", ["/hidden-2.html"])),
        "/none.html": static(meta("none", "Robots", "none", ["/hidden-3.html"])),
        **{f"/hidden-{i}.html": static(page(f"hidden {i}")) for i in (1, 2, 3)},
    }
    server = Site(routes)
    yield server
    server.close()


def test_meta_robots_and_rel_nofollow_are_obeyed_and_noindex_is_kept_but_marked(robots_site, tmp_path):
    result = run_crawl(crawl_config([robots_site.url + "/"]), tmp_path)
    paths = set(robots_site.paths())
    assert not paths & {"/rel-nofollow.html", "/hidden-1.html", "/hidden-2.html", "/hidden-3.html"}
    stored = {url.removeprefix(robots_site.url) for url, *_ in warc_responses(tmp_path)}
    assert stored == {"/", "/plain.html", "/noindex.html", "/after-noindex.html", "/meta-nofollow.html",
                      "/bot-nofollow.html", "/none.html"}
    log = {r["url"].removeprefix(robots_site.url): r for r in pq.read_table(tmp_path / "crawl_log.parquet").to_pylist()}
    assert log["/noindex.html"]["robots_meta"] == "noindex" and log["/noindex.html"]["error"] is None
    assert log["/meta-nofollow.html"]["robots_meta"] == "nofollow"
    assert log["/bot-nofollow.html"]["robots_meta"] == "nofollow"
    assert log["/none.html"]["robots_meta"] == "nofollow,noindex,none"
    assert log["/plain.html"]["robots_meta"] is None
    assert result.counts["robots_meta_noindex"] == 2 and result.counts["robots_meta_nofollow"] == 3
    assert result.counts["pages_fetched"] == 7


def test_meta_robots_and_rel_nofollow_can_be_ignored(robots_site, tmp_path):
    config = crawl_config([robots_site.url + "/"], obey_meta_robots=False, follow_nofollow_links=True)
    result = run_crawl(config, tmp_path)
    assert {"/rel-nofollow.html", "/hidden-1.html", "/hidden-2.html", "/hidden-3.html"} <= set(robots_site.paths())
    assert result.counts["pages_fetched"] == 11
    assert result.counts["robots_meta_nofollow"] == 3  # still recorded, not obeyed


def test_crawl_log_parts_hold_the_log_in_order_and_give_the_same_stats(site, tmp_path):
    result = run_crawl(crawl_config([site.url + "/"], log_part_rows=3), tmp_path)
    parts = sorted(p.name for p in (tmp_path / "crawl_log").glob("*"))
    log = pq.read_table(tmp_path / "crawl_log.parquet")
    assert len(parts) > 3 and parts == [f"part-{i:05d}.parquet" for i in range(len(parts))]
    assert log_parts(tmp_path).to_pylist() == log.to_pylist()
    counts, stats = crawl_stats(log_parts(tmp_path))
    assert stats == result.stats and {**counts, "warc_files": result.counts["warc_files"]} == result.counts


def test_redirect_to_address_outside_allow_list_is_refused_before_connecting(site, trap, tmp_path):
    # any host is in scope and robots.txt is ignored, so only the address check stands in the way
    config = crawl_config([site.url + "/redirect-out"], same_host=False, obey_robots=False)
    result = run_crawl(config, tmp_path)
    log = pq.read_table(tmp_path / "crawl_log.parquet").to_pylist()
    trap_rows = [r for r in log if r["url"].startswith("http://127.0.0.2")]
    assert len(trap_rows) == 1  # refusals are not retried
    assert trap_rows[0]["status"] is None and trap_rows[0]["error"].startswith("unsafe address: refused 127.0.0.2")
    assert trap.accepted == []
    assert result.counts["pages_fetched"] == 0


def test_guarded_transport_checks_addresses_after_dns(site, trap):
    async def get(url: str, networks: list[str]) -> int:
        transport = GuardedTransport(AddressPolicy.from_strings(networks), max_connections=2)
        async with httpx.AsyncClient(transport=transport) as client:
            return (await client.get(url)).status_code

    # `localhost` is a name: it is resolved, and the loopback address it gives is refused by default
    with pytest.raises(UnsafeAddressError):
        asyncio.run(get(f"http://localhost:{site.port}/", []))
    assert asyncio.run(get(f"http://localhost:{site.port}/", ["127.0.0.1/32"])) == 200
    with pytest.raises(UnsafeAddressError):
        asyncio.run(get(f"http://127.0.0.2:{trap.port}/", ["127.0.0.1/32"]))
    assert trap.accepted == []
    assert site.paths() == ["/"]


def test_unreachable_robots_txt_disallows_everything(tmp_path):
    site = Site({"/robots.txt": lambda h: h.reply(503, b"down", "text/plain"), "/": static(page("home"))})
    try:
        result = run_crawl(crawl_config([site.url + "/"]), tmp_path)
    finally:
        site.close()
    assert site.paths() == ["/robots.txt"]
    assert result.counts["pages_fetched"] == 0 and result.counts["robots_disallowed"] == 1
    assert not list((tmp_path / "warc").glob("*.warc.gz"))


def test_warc_records_read_back_with_warcio_and_fastwarc(site, tmp_path):
    run_crawl(crawl_config([site.url + "/a/1.html"]), tmp_path)
    responses = warc_responses(tmp_path)
    assert [(url.removeprefix(site.url), status) for url, status, _, _ in responses] == [
        ("/a/1.html", "200"), ("/a/2.html", "200"), ("/a/3.html", "200"), ("/a/4.html", "200")
    ]
    assert responses[0][2] == page("one", ["2.html"])
    headers = responses[0][3]
    assert headers.get_header("WARC-Identified-Payload-Type") == "text/html"
    assert headers.get_header("WARC-IP-Address") == "127.0.0.1"
    # fastwarc: every record's digests verify, requests pair with responses
    types = Counter()
    path = next((tmp_path / "warc").glob("*.warc.gz"))
    for record in FastArchiveIterator(open(path, "rb"), parse_http=False):
        types[record.headers.get("WARC-Type")] += 1
        if record.record_type != WarcRecordType.warcinfo:
            assert record.verify_block_digest()
    assert types == {"warcinfo": 1, "request": 4, "response": 4}
    # gzip per record: the file is a sequence of gzip members, each one a whole record
    with gzip.open(path) as whole:
        assert whole.read().count(b"WARC/1.0\r\n") == 9


def test_warc_files_roll_at_max_bytes(site, tmp_path):
    run_crawl(crawl_config([site.url + "/a/1.html"], warc_max_bytes=1), tmp_path)
    files = sorted(p.name for p in (tmp_path / "warc").glob("*.warc.gz"))
    assert files == [f"crawl-{i:05d}.warc.gz" for i in range(4)]
    assert len(warc_responses(tmp_path)) == 4


def test_max_pages_stops_the_crawl(site, tmp_path):
    result = run_crawl(crawl_config([site.url + "/a/1.html"], max_pages=2), tmp_path)
    assert result.counts["pages_fetched"] == 2
    assert len(warc_responses(tmp_path)) == 2
    assert "/a/3.html" not in site.paths()


def test_serve_directory_crawls_a_folder_and_admits_only_its_server(tmp_path, trap):
    root = tmp_path / "site"
    (root / "postgresql").mkdir(parents=True)
    for name in ("contents.html", "sql-altergroup.html", "sql-alterserver.html"):
        (root / "postgresql" / name).write_bytes((SAMPLE / "postgresql" / name).read_bytes())
    links = '<a href="postgresql/contents.html">docs</a> <a href="http://127.0.0.1:1/">other port</a>'
    (root / "index.html").write_text(f"<html><body>{links}</body></html>")
    config = CrawlConfig(type="crawl", serve_directory=str(root), delay_s=0.0, max_depth=2, same_host=False,
                         obey_robots=False)
    result = run_crawl(config, tmp_path / "crawl")
    log = pq.read_table(tmp_path / "crawl" / "crawl_log.parquet").to_pylist()
    # another port on the same address is not the served endpoint: refused
    other = [r for r in log if r["url"] == "http://127.0.0.1:1/"]
    assert other and other[0]["error"].startswith("unsafe address")
    urls = {url.split("/", 3)[3] for url, *_ in warc_responses(tmp_path / "crawl")}
    assert urls == {"", "postgresql/contents.html", "postgresql/sql-altergroup.html",
                    "postgresql/sql-alterserver.html"}
    assert result.counts["pages_fetched"] == 4


def test_crawl_as_a_workflow_stage_feeds_extract(tmp_path):
    from gristmill.pipeline.runner import run_workflow

    root = tmp_path / "site"
    root.mkdir()
    for name in ("contents.html", "sql-altergroup.html", "sql-alterserver.html"):
        (root / name).write_bytes((SAMPLE / "postgresql" / name).read_bytes())
    workflow = tmp_path / "crawl.yaml"
    workflow.write_text(
        "name: crawltest\n"
        "dask: {scheduler: synchronous}\n"
        "stages:\n"
        "  crawl:\n"
        "    type: crawl\n"
        "    serve_directory: site\n"
        "    seeds: [contents.html]\n"
        "    delay_s: 0\n"
        "    max_depth: 1\n"
        "  extract:\n"
        "    type: extract\n"
        "    input: crawl\n"
    )
    run_dir = run_workflow(workflow, runs_dir=tmp_path / "runs")
    crawl_dir = run_dir / "crawl"
    assert (crawl_dir / "_DONE.json").exists()
    pages = {url for url, *_ in warc_responses(crawl_dir)}
    assert any(url.endswith("/sql-altergroup.html") for url in pages)
    kept = pq.read_table(run_dir / "extract" / "kept").to_pylist()
    assert {row["url"] for row in kept} == pages
    assert all(row["text"] for row in kept)


def test_bad_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="allow_networks.*'not-a-net'"):
        crawl_config(["http://127.0.0.1/"], allow_networks=["not-a-net"])
    with pytest.raises(ValueError, match="seed 'ftp://x/' is not an absolute http"):
        run_crawl(crawl_config(["ftp://x/"]), tmp_path)
    with pytest.raises(ValueError, match="exclude: '\\(' is not a valid regular expression"):
        run_crawl(crawl_config(["http://127.0.0.1/"], exclude=["("]), tmp_path)


def test_killed_crawl_restarts_and_fetches_every_page_exactly_once(tmp_path):
    pages = {f"/p/{i}.html": [f"/p/{j}.html" for j in (2 * i + 1, 2 * i + 2) if j < 30] for i in range(30)}
    site = Site({"/robots.txt": static(b"User-agent: *\nAllow: /\n", "text/plain"),
                 **{path: static(page(path, links)) for path, links in pages.items()}})
    out = tmp_path / "crawl"
    command = [sys.executable, "-m", "gristmill.cli", "crawl", site.url + "/p/0.html", "--out", str(out),
               "--allow-network", "127.0.0.1/32", "--delay", "0.25", "--max-depth", "10", "--concurrency", "2",
               "--log-part-rows", "3"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    try:
        first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # kill between two fetches: every page the server has answered is committed as done
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            page_requests = sum(1 for p in site.paths() if p.startswith("/p/"))
            done = 0
            if (out / "crawl_state.sqlite").exists():
                try:
                    with sqlite3.connect(out / "crawl_state.sqlite") as db:
                        done = db.execute("SELECT COUNT(*) FROM urls WHERE done = 1").fetchone()[0]
                except sqlite3.OperationalError:
                    pass
            if done >= 8 and done == page_requests:
                break
            time.sleep(0.01)
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert 8 <= done < 30
        # the log parts written so far can be read while the crawl is unfinished
        assert not (out / "crawl_log.parquet").exists() and log_parts(out).num_rows >= 3
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr
    finally:
        site.close()
    assert Counter(site.paths()) == {"/robots.txt": 1, **{path: 1 for path in pages}}
    stored = Counter(url.removeprefix(site.url) for url, *_ in warc_responses(out))
    assert stored == {path: 1 for path in pages}
    # nothing logged twice: the parts are the whole log, each page once
    log = pq.read_table(out / "crawl_log.parquet")
    assert log_parts(out).to_pylist() == log.to_pylist()
    assert Counter(url.removeprefix(site.url) for url in log.column("url").to_pylist()) == Counter(site.paths())
