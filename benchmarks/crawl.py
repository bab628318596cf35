"""Crawling a site on loopback: gristmill's crawl stage against Scrapy, same site, same rules.

Data: a site of `--pages` pages (quick 600, else 3,000) generated with a fixed seed from the bundled
sample site: page k is sample page k mod 250 (its own links blanked), plus links to 5-20 random
pages of the site and 2 to its `/private/` part, which robots.txt disallows. Index pages of 2,500
links each (`/index/N.html`) list every page, and the home page links the index pages, so a crawl
from `/` reaches every page at depth 2 or 3, and most pages are linked many times over.

One process each side, one after the other, each a fresh Python process; the site is served by a
third (an HTTP/1.1 keep-alive file server on 127.0.0.1), so neither crawler shares its interpreter:
- gristmill: `run_crawl` (the crawl stage) writing gzipped WARC files, robots.txt obeyed,
  `concurrency` = `per_host_concurrency` = `--concurrency`, `delay_s` 0, depth unlimited in effect;
- Scrapy: a `CrawlSpider` with one `LinkExtractor` rule over the same host, `ROBOTSTXT_OBEY`,
  `CONCURRENT_REQUESTS` = `CONCURRENT_REQUESTS_PER_DOMAIN` = `--concurrency`, no delay, no depth
  limit, writing every page (url, status, headers, body) to a gzipped JSON-lines feed.

Figure: pages stored per wall second of each crawl (from start to the last page written, process
start-up and imports excluded); `ratio` is gristmill's over Scrapy's. The sets of pages both stored
are compared, and `same_pages` says whether they are equal. Wall seconds on a shared machine are
noisy: compare ratios, not absolute rates, between runs.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gristmill import DATA_DIR

SITE = DATA_DIR / "sample_site"
INDEX_LINKS = 2500
USER_AGENT = "gristmill-bench/1.0"
_HREF = re.compile(rb"""href\s*=\s*("[^"]*"|'[^']*'|[^\s>]+)""", re.IGNORECASE)


def build_site(folder: Path, pages: int, seed: int = 0) -> None:
    """Write the generated site (see the module docstring) into `folder`."""
    rng = random.Random(seed)
    samples = [_HREF.sub(b'href="#"', p.read_bytes()) for p in sorted(SITE.rglob("*.html"))]
    (folder / "p").mkdir(parents=True)
    (folder / "private").mkdir()
    (folder / "index").mkdir()
    for k in range(pages):
        targets = [f"/p/{t}.html" for t in rng.sample(range(pages), rng.randint(5, 20))]
        targets += [f"/private/{rng.randrange(pages)}.html" for _ in range(2)]
        nav = "".join(f'<a href="{t}">{t}</a> ' for t in targets).encode()
        body = samples[k % len(samples)]
        at = body.lower().rfind(b"</body>")
        (folder / "p" / f"{k}.html").write_bytes(body[:at] + b"<nav>" + nav + b"</nav>" + body[at:] if at >= 0
                                                 else body + nav)
    for k in range(pages):
        (folder / "private" / f"{k}.html").write_bytes(b"<html><body>private</body></html>")
    order = list(range(pages))
    rng.shuffle(order)
    indexes = [order[i:i + INDEX_LINKS] for i in range(0, pages, INDEX_LINKS)]
    for n, chunk in enumerate(indexes):
        items = "".join(f'<li><a href="/p/{k}.html">page {k}</a></li>' for k in chunk)
        (folder / "index" / f"{n}.html").write_text(f"<html><head><title>index {n}</title></head><body><ul>{items}"
                                                    "</ul></body></html>")
    home = "".join(f'<a href="/index/{n}.html">index {n}</a> ' for n in range(len(indexes)))
    (folder / "index.html").write_text(f"<html><head><title>home</title></head><body>{home}</body></html>")
    (folder / "robots.txt").write_text("User-agent: *\nDisallow: /private/\n")


SERVER = """
import functools, sys
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
class Handler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=sys.argv[1]))
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def crawl_gristmill(url: str, out: Path, concurrency: int, max_pages: int) -> dict:
    from gristmill.pipeline.crawl.stage import CrawlConfig, run_crawl

    config = CrawlConfig(type="crawl", seeds=[url], user_agent=USER_AGENT, allow_networks=["127.0.0.1/32"],
                         concurrency=concurrency, per_host_concurrency=concurrency, delay_s=0.0,
                         max_pages=max_pages, max_depth=100, log_part_interval_s=60.0)
    started = time.perf_counter()
    result = run_crawl(config, out)
    seconds = time.perf_counter() - started
    import pyarrow.parquet as pq

    log = pq.read_table(out / "crawl_log.parquet").to_pylist()
    urls = sorted({r["url"] for r in log if r["status"] == 200 and r["error"] is None and r["depth"] is not None})
    return {"pages": result.counts["pages_fetched"], "seconds": seconds, "urls": urls}


def crawl_scrapy(url: str, out: Path, concurrency: int, max_pages: int) -> dict:
    from scrapy.crawler import CrawlerProcess
    from scrapy.linkextractors import LinkExtractor
    from scrapy.spiders import CrawlSpider, Rule

    class SiteSpider(CrawlSpider):
        name = "site"
        start_urls = [url]
        # same host as the seed (allow_domains does not match IP addresses)
        rules = (Rule(LinkExtractor(allow=[re.escape(url)]), callback="parse_item", follow=True),)

        def parse_start_url(self, response, **kwargs):
            return self.parse_item(response)

        def parse_item(self, response):
            yield {"url": response.url, "status": response.status,
                   "headers": dict(response.headers.to_unicode_dict()), "body": response.text}

    feed = out / "pages.jl.gz"
    process = CrawlerProcess(settings={
        "USER_AGENT": USER_AGENT, "ROBOTSTXT_OBEY": True, "CONCURRENT_REQUESTS": concurrency,
        "CONCURRENT_REQUESTS_PER_DOMAIN": concurrency, "DOWNLOAD_DELAY": 0, "DEPTH_LIMIT": 0,
        "CLOSESPIDER_ITEMCOUNT": max_pages, "LOG_LEVEL": "ERROR", "TELNETCONSOLE_ENABLED": False,
        "FEEDS": {str(feed): {"format": "jsonlines", "postprocessing": ["scrapy.extensions.postprocessing.GzipPlugin"]}},
    })
    process.crawl(SiteSpider)
    started = time.perf_counter()
    process.start()
    seconds = time.perf_counter() - started
    with gzip.open(feed, "rt") as handle:
        urls = sorted({json.loads(line)["url"] for line in handle})
    return {"pages": len(urls), "seconds": seconds, "urls": urls}


def run_side(side: str, url: str, out: Path, concurrency: int, max_pages: int) -> dict:
    """One crawl in a fresh Python process; its figures come back as the process's last line."""
    command = [sys.executable, "-m", "benchmarks.crawl", "--side", side, "--url", url, "--out", str(out),
               "--concurrency", str(concurrency), "--max-pages", str(max_pages)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return {"pages": 0, "seconds": float("nan"), "urls": []}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 600-page site, under a minute in all")
    parser.add_argument("--pages", type=int, default=None, help="pages of the site (default 3000, quick 600)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight, both sides (default 16)")
    parser.add_argument("--side", choices=["gristmill", "scrapy"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--max-pages", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side is not None:
        crawl = crawl_gristmill if args.side == "gristmill" else crawl_scrapy
        print(json.dumps(crawl(args.url, args.out, args.concurrency, args.max_pages)))
        return
    pages = args.pages or (600 if args.quick else 3000)
    with tempfile.TemporaryDirectory(prefix="gristmill-bench-crawl-") as tmp:
        site = Path(tmp) / "site"
        build_site(site, pages)
        expected = pages + (pages + INDEX_LINKS - 1) // INDEX_LINKS + 1  # pages, index pages, home
        server = subprocess.Popen([sys.executable, "-c", SERVER, str(site)], stdout=subprocess.PIPE, text=True)
        try:
            url = f"http://127.0.0.1:{int(server.stdout.readline())}/"
            ours = run_side("gristmill", url, Path(tmp) / "gristmill", args.concurrency, expected)
            ref = run_side("scrapy", url, Path(tmp) / "scrapy", args.concurrency, expected)
        finally:
            server.terminate()
            server.wait()
    ours_rate, ref_rate = ours["pages"] / ours["seconds"], ref["pages"] / ref["seconds"]
    same = ours["urls"] == ref["urls"]
    print(f"site: {expected} pages to store, links into /private/ disallowed by robots.txt", file=sys.stderr)
    print(f"gristmill crawl stage: {ours['pages']} pages in {ours['seconds']:.1f} s, {ours_rate:.1f} pages/s",
          file=sys.stderr)
    print(f"Scrapy CrawlSpider: {ref['pages']} pages in {ref['seconds']:.1f} s, {ref_rate:.1f} pages/s",
          file=sys.stderr)
    if not same:
        only_ours, only_ref = set(ours["urls"]) - set(ref["urls"]), set(ref["urls"]) - set(ours["urls"])
        print(f"pages differ: {len(only_ours)} only gristmill's (e.g. {sorted(only_ours)[:3]}), "
              f"{len(only_ref)} only Scrapy's (e.g. {sorted(only_ref)[:3]})", file=sys.stderr)
    result = {
        "benchmark": "crawl",
        "pages_per_s": round(ours_rate, 1),
        "reference_pages_per_s": round(ref_rate, 1),
        "ratio": round(ours_rate / ref_rate, 2) if ref_rate else None,
        "same_pages": same,
        "target": 1.0,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
