"""The crawler against hostile pages: huge link lists, huge robots.txt files, slow servers meanwhile."""

from __future__ import annotations

import gzip
import sqlite3
import time

import pyarrow.parquet as pq
import pytest

from gristmill.pipeline.crawl.links import read_links
from gristmill.pipeline.crawl.stage import ROBOTS_MAX_BYTES, run_crawl
from gristmill.pipeline.crawl.state import STATE_FILE
from tests.test_crawl import Site, crawl_config, page, static, warc_responses


def many_links(n: int, prefix: str = "/p/") -> bytes:
    anchors = "".join(f'<li><a href="{prefix}{i}.html">page {i}</a></li>' for i in range(n))
    return f"<!DOCTYPE html><html><head><title>index</title></head><body><ul>{anchors}</ul></body></html>".encode()


def log_rows(folder) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for row in pq.read_table(folder / "crawl_log.parquet").to_pylist():
        rows.setdefault(row["url"].split("/", 3)[-1], []).append(row)
    return rows


def test_a_page_with_20000_links_is_read_in_well_under_a_second():
    body = many_links(20_000)
    started = time.thread_time()  # CPU time of this thread: other load on the machine does not count
    links = read_links(body, "http://h.example/docs/", "text/html", max_links=None)
    spent = time.thread_time() - started
    assert links.link_count == 20_000 and len(links.links) == 20_000
    assert links.links[0] == "http://h.example/p/0.html" and links.links[-1] == "http://h.example/p/19999.html"
    assert spent < 1.0  # iterating query results re-walks the tree per item: minutes for this page


def test_read_links_keeps_max_links_of_each_kind_and_counts_them_all():
    body = many_links(30).replace(b"</ul>", b'<a href="/n1" rel="nofollow">1</a><a href="/n2" rel=nofollow>2</a></ul>')
    links = read_links(body, "http://h.example/", "text/html", max_links=10)
    assert links.links == [f"http://h.example/p/{i}.html" for i in range(10)]
    assert links.nofollow_links == ["http://h.example/n1", "http://h.example/n2"]
    assert (links.link_count, links.nofollow_count) == (30, 2)


def test_links_past_max_links_per_page_are_counted_not_queued(tmp_path):
    routes = {"/robots.txt": static(b"User-agent: *\nAllow: /\n", "text/plain"), "/": static(many_links(50))}
    routes.update({f"/p/{i}.html": static(page(f"page {i}")) for i in range(50)})
    site = Site(routes)
    try:
        result = run_crawl(crawl_config([site.url + "/"], max_links_per_page=10, max_depth=1), tmp_path)
    finally:
        site.close()
    assert sorted(p for p in site.paths() if p.startswith("/p/")) == sorted(f"/p/{i}.html" for i in range(10))
    assert result.counts["pages_fetched"] == 11
    assert result.counts["links_over_cap"] == 40 and result.counts["pages_over_link_cap"] == 1
    rows = log_rows(tmp_path)
    assert rows[""][0]["links_over_cap"] == 40 and rows["p/0.html"][0]["links_over_cap"] == 0


def test_a_request_timeout_fires_while_a_huge_page_is_parsed(tmp_path):
    def slow(h):
        time.sleep(3.0)
        h.reply(200, page("slow"))

    huge = many_links(100_000)
    started = time.monotonic()
    read_links(huge, "http://h.example/", "text/html", max_links=5000)
    parse_s = time.monotonic() - started  # how long the page takes to read on this machine, now
    routes = {"/robots.txt": static(b"User-agent: *\nAllow: /\n", "text/plain"), "/huge": static(huge), "/slow": slow}
    site = Site(routes)
    timeout = 0.3
    try:
        config = crawl_config([site.url + "/huge", site.url + "/slow"], timeout_s=timeout, max_retries=0,
                              max_depth=0, concurrency=2, per_host_concurrency=2, max_body_bytes=20_000_000)
        run_crawl(config, tmp_path)
    finally:
        site.close()
    rows = log_rows(tmp_path)
    assert rows["huge"][0]["error"] is None  # parsed and stored ...
    # ... while the slow request timed out on time: a parse on the event loop holds the timer
    # until the parse ends (late by most of parse_s); on a worker thread it is late by a fraction
    assert rows["slow"][0]["error"] == f"timeout after {timeout}s"
    assert rows["slow"][0]["elapsed_s"] - timeout < parse_s / 2


@pytest.mark.parametrize("encoding", ["gzip", "identity"])
def test_only_the_first_500_kib_of_a_huge_robots_txt_are_parsed(tmp_path, encoding):
    # 4 MB of robots.txt: a rule at the top, comment lines, a rule far past the 500 KiB limit
    text = b"User-agent: *\nDisallow: /early/\n" + b"# padding padding padding padding\n" * 120_000
    text += b"Disallow: /late/\n"
    assert len(text) > 4_000_000
    sent, headers = (gzip.compress(text), {"Content-Encoding": "gzip"}) if encoding == "gzip" else (text, {})
    routes = {
        "/robots.txt": lambda h: h.reply(200, sent, "text/plain", headers=headers),
        "/": static(page("home", ["/early/a.html", "/late/b.html"])),
        "/early/a.html": static(page("early")),
        "/late/b.html": static(page("late")),
    }
    site = Site(routes)
    try:
        run_crawl(crawl_config([site.url + "/"]), tmp_path)
    finally:
        site.close()
    stored = {url.removeprefix(site.url) for url, *_ in warc_responses(tmp_path)}
    assert stored == {"/", "/late/b.html"}  # the early rule holds; the late one is past the limit
    assert log_rows(tmp_path)["early/a.html"][0]["error"] == "robots.txt disallows"
    with sqlite3.connect(tmp_path / STATE_FILE) as db:
        (saved,) = db.execute("SELECT length(body) FROM robots").fetchone()
    assert saved == ROBOTS_MAX_BYTES
