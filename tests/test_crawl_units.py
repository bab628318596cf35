"""The crawler's pure parts: URL normalisation, scope, address policy, WARC rolling and resume cuts."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from warcio.archiveiterator import ArchiveIterator

from gristmill.pipeline.crawl.frontier import Scope, normalize_url
from gristmill.pipeline.crawl.links import read_links
from gristmill.pipeline.crawl.safety import AddressPolicy
from gristmill.pipeline.crawl.warc import Exchange, WarcRoller, identify_payload_type


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("HTTP://Example.ORG:80/a/./b/../c.html#frag", "http://example.org/a/c.html"),
        ("https://example.org:443", "https://example.org/"),
        ("https://example.org:8443/x?b=2&a=1", "https://example.org:8443/x?b=2&a=1"),
        ("http://user:secret@example.org/%7euser/%2f%c3%a9", "http://example.org/~user/%2F%C3%A9"),
        ("http://example.org/a b", "http://example.org/a%20b"),
        ("http://bücher.example/", "http://xn--bcher-kva.example/"),
        ("http://[::1]:8080/", "http://[::1]:8080/"),
        ("ftp://example.org/", None),
        ("file:///etc/passwd", None),
        ("mailto:a@example.org", None),
        ("javascript:void(0)", None),
        ("http://example.org:99999/", None),
        ("http:///nohost", None),
    ],
)
def test_normalize_url(raw, expected):
    assert normalize_url(raw) == expected


def test_normalize_url_resolves_against_base():
    assert normalize_url("../b.html?q=1#x", base="http://h.example/a/c/d.html") == "http://h.example/a/b.html?q=1"
    assert normalize_url("//other.example/", base="https://h.example/") == "https://other.example/"


def test_scope_rules():
    seeds = ["http://docs.example.org/"]
    same_host = Scope.build(seeds, True, [], [], [r"\.pdf$"])
    assert same_host.rejects("http://docs.example.org/a.html") is None
    assert same_host.rejects("http://www.example.org/") == "host www.example.org is not a seed host"
    assert "exclude" in same_host.rejects("http://docs.example.org/a.pdf")
    domains = Scope.build(seeds, True, ["example.org"], [r"/guide/"], [])
    assert domains.rejects("http://www.example.org/guide/1") is None
    assert domains.rejects("http://notexample.org/guide/1") == "host notexample.org not in allowed_domains"
    assert domains.rejects("http://example.org/blog/1") == "matches no include pattern"
    assert Scope.build(seeds, False, [], [], []).rejects("http://anything.example/") is None


def test_address_policy_allows_public_and_listed_addresses_only():
    default = AddressPolicy.from_strings([])
    assert default.allows("93.184.216.34", 80)
    assert default.allows("2606:2800:220:1:248:1893:25c8:1946", 443)
    for private in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "172.16.0.1", "169.254.169.254", "::1",
                    "fe80::1%eth0", "::ffff:127.0.0.1", "0.0.0.0", "224.0.0.1", "100.64.0.1"):
        assert not default.allows(private, 80), private
    listed = AddressPolicy.from_strings(["127.0.0.1/32", "10.0.0.0/8"], endpoints=[("127.0.0.5", 8000)])
    assert listed.allows("127.0.0.1", 1) and listed.allows("10.9.9.9", 80)
    assert listed.allows("127.0.0.5", 8000) and not listed.allows("127.0.0.5", 8001)
    assert not listed.allows("127.0.0.2", 80)
    with pytest.raises(ValueError, match="allow_networks: '300.1.1.1'"):
        AddressPolicy.from_strings(["300.1.1.1"])


def test_identify_payload_type_sniffs_bytes():
    assert identify_payload_type(b"  <!DOCTYPE html><html>", "text/plain") == "text/html"
    assert identify_payload_type(b"%PDF-1.7 ...", "text/html") == "application/pdf"
    assert identify_payload_type(b"\x89PNG\r\n\x1a\n....", None) == "image/png"
    assert identify_payload_type(b"plain words", "text/plain") == "text/plain"
    assert identify_payload_type(b"\x00\x01", None) == "application/octet-stream"


def test_read_links_uses_base_and_declared_charset():
    html = '<html><head><base href="/docs/"></head><body><a href="a.html">à</a><area href="/b"></body></html>'
    page = read_links(html.encode("latin-1"), "http://h.example/x/y.html", "text/html; charset=latin-1")
    assert page.links == ["http://h.example/docs/a.html", "http://h.example/b"]
    assert page.nofollow_links == [] and page.robots == set()
    assert read_links(b'<a href="z">', "http://h.example/", "text/html; charset=bogus").links == ["http://h.example/z"]


def test_read_links_separates_nofollow_links_and_reads_meta_robots_addressed_to_the_crawler():
    html = (b'<html><head><meta name="ROBOTS" content="NoIndex, "><meta name="otherbot" content="nofollow">'
            b'<meta name="gristmill" content="noarchive"></head><body><a href="/a" rel="external NoFollow">a</a>'
            b'<a href="/b" rel="noopener">b</a><area href="/c" rel="nofollow"></body></html>')
    page = read_links(html, "http://h.example/", "text/html", ("robots", "gristmill"))
    assert page.links == ["http://h.example/b"]
    assert page.nofollow_links == ["http://h.example/a", "http://h.example/c"]
    assert page.robots == {"noindex", "noarchive"}
    none = read_links(b'<meta name="robots" content="none">', "http://h.example/", "text/html")
    assert {"noindex", "nofollow"} <= none.robots


def exchange(n: int) -> Exchange:
    return Exchange(
        url=f"http://h.example/{n}", fetch_time=datetime(2024, 5, 1, tzinfo=timezone.utc), ip_address="93.184.216.34",
        request_line=f"GET /{n} HTTP/1.1", request_headers=[("Host", "h.example")], status=200, reason="OK",
        http_version="HTTP/1.1",
        response_headers=[("Content-Type", "text/html"), ("Content-Encoding", "gzip"), ("Content-Length", "3")],
        body=f"<html>page {n}</html>".encode(), declared_type="text/html",
    )


def responses(folder) -> list[tuple[str, str | None, str | None]]:
    out = []
    for path in sorted(folder.glob("*.warc.gz")):
        with open(path, "rb") as handle:
            for record in ArchiveIterator(handle):
                if record.rec_type == "response":
                    out.append((record.rec_headers.get_header("WARC-Target-URI"),
                                record.http_headers.get_header("Content-Length"),
                                record.http_headers.get_header("X-Crawler-Content-Encoding")))
    return out


def test_warc_roller_resume_cuts_back_to_the_committed_position(tmp_path):
    roller = WarcRoller(tmp_path, "crawl", max_bytes=10**9, position=None)
    roller.write(exchange(0))
    committed = roller.write(exchange(1))
    roller.write(exchange(2))  # written, but the crawl was killed before committing it
    roller.close()
    with open(tmp_path / "crawl-00000.warc.gz", "ab") as handle:
        handle.write(b"\x1f\x8b\x08half a record")  # and killed mid-write of the next one
    resumed = WarcRoller(tmp_path, "crawl", max_bytes=10**9, position=committed)
    resumed.write(exchange(3))
    resumed.close()
    urls = [url for url, _, _ in responses(tmp_path)]
    assert urls == ["http://h.example/0", "http://h.example/1", "http://h.example/3"]
    # the payload is stored decoded: the wire headers are kept as X-Crawler-*, the length is the stored one
    assert responses(tmp_path)[0][1:] == (str(len(exchange(0).body)), "gzip")


def test_warc_roller_deletes_files_after_the_committed_one(tmp_path):
    roller = WarcRoller(tmp_path, "crawl", max_bytes=1, position=None)
    committed = roller.write(exchange(0))
    roller.write(exchange(1))  # rolled to crawl-00001, never committed
    roller.close()
    assert len(list(tmp_path.glob("*.warc.gz"))) == 2
    WarcRoller(tmp_path, "crawl", max_bytes=1, position=committed).close()
    assert [p.name for p in tmp_path.glob("*.warc.gz")] == ["crawl-00000.warc.gz"]
    assert [url for url, _, _ in responses(tmp_path)] == ["http://h.example/0"]
