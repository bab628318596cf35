"""What the crawler reads from an HTML page: its links and its meta robots directives.

One pre-order pass over the parsed tree (resiliparse's `traverse_dom`), so the work grows linearly
with the page: iterating the results of `query_selector_all` re-walks the tree for every item and
made a page of 4,000 links take a minute. The parse tree never leaves the function that builds it
(resiliparse trees must be dropped on the thread that made them), so the crawler can call
`read_links` on a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urljoin

from resiliparse.parse.encoding import detect_encoding
from resiliparse.parse.html import DOMContext, HTMLTree, traverse_dom

LINK_TAGS = frozenset({"a", "area"})


@dataclass
class PageLinks:
    """The links and meta robots directives of one page.

    `links` and `nofollow_links` hold at most `max_links` absolute targets each (in page order);
    `link_count` and `nofollow_count` count every one the page has, so a cap shows in the stats.
    """

    links: list[str] = field(default_factory=list)  # absolute targets without rel="nofollow"
    nofollow_links: list[str] = field(default_factory=list)  # absolute targets with rel="nofollow"
    robots: set[str] = field(default_factory=set)  # meta robots directives, lower-case ("none" expanded)
    link_count: int = 0
    nofollow_count: int = 0


def charset_of(content_type: str | None) -> str | None:
    """`utf-8` from `text/html; charset="UTF-8"` (as written); None when no charset is declared."""
    for param in (content_type or "").split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip():
            return value.strip().strip("\"'")
    return None


def _parse(body: bytes, content_type: str | None) -> HTMLTree:
    encoding = charset_of(content_type) or detect_encoding(body)
    try:
        return HTMLTree.parse_from_bytes(body, encoding)
    except LookupError:  # an unknown declared charset
        return HTMLTree.parse_from_bytes(body, detect_encoding(body))


def read_links(body: bytes, url: str, content_type: str | None, robots_names: tuple[str, ...] = ("robots",),
               max_links: int | None = None) -> PageLinks:
    """The `<a href>` / `<area href>` targets of an HTML page (resolved against its first
    `<base href>`) and the directives of its `<meta name=...>` tags whose name is one of
    `robots_names` (lower-case). Only the first `max_links` of each kind are resolved and kept."""
    hrefs: list[str] = []
    nofollow_hrefs: list[str] = []
    robots: set[str] = set()
    base: list[str] = []

    def visit(context: DOMContext) -> None:
        node = context.node
        tag = node.tag
        if tag in LINK_TAGS:
            href = node.getattr("href")
            if href is not None:
                nofollow = "nofollow" in (node.getattr("rel") or "").lower().split()
                (nofollow_hrefs if nofollow else hrefs).append(href)
        elif tag == "meta":
            name, content = node.getattr("name"), node.getattr("content")
            if name is not None and content is not None and name.strip().lower() in robots_names:
                directives = {d.strip().lower() for d in content.split(",")} - {""}
                robots.update(directives | ({"noindex", "nofollow"} if "none" in directives else set()))
        elif tag == "base" and not base:
            href = node.getattr("href")
            if href is not None:
                base.append(href)

    tree = _parse(body, content_type)
    if tree.document is not None and tree.document.document_element is not None:
        traverse_dom(tree.document.document_element, visit, elements_only=True)
    del tree  # dropped here, on the thread that parsed it
    base_url = urljoin(url, base[0].strip()) if base else url
    return PageLinks(
        links=[urljoin(base_url, href.strip()) for href in hrefs[:max_links]],
        nofollow_links=[urljoin(base_url, href.strip()) for href in nofollow_hrefs[:max_links]],
        robots=robots,
        link_count=len(hrefs),
        nofollow_count=len(nofollow_hrefs),
    )
