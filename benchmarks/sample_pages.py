"""The bundled sample site's pages as text: the real pages every benchmark builds its data from.

A helper the benchmarks import, not a benchmark: it has no `--quick` mode and prints nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.encoding import bytes_to_str, detect_encoding

from gristmill import DATA_DIR

SITE = DATA_DIR / "sample_site"


@dataclass(frozen=True)
class SamplePage:
    path: Path
    text: str
    lang: str  # from the handbook's language folders (`fr-FR` -> `fr`); every other page is English


def sample_pages(main_content: bool = True) -> list[SamplePage]:
    """Every bundled page in path order, as text (only the main content unless told otherwise)."""
    pages = []
    for path in sorted(SITE.rglob("*.html")):
        data = path.read_bytes()
        text = extract_plain_text(bytes_to_str(data, detect_encoding(data)), main_content=main_content)
        parts = path.relative_to(SITE).parts
        lang = parts[1].split("-")[0] if parts[0] == "handbook" and len(parts) > 2 else "en"
        pages.append(SamplePage(path, text, lang))
    return pages
