"""One shape for extracted text, whichever extractor made it.

Extractors leave layout debris: whitespace-only lines (trafilatura emits a tab for an empty table
cell), runs of blank lines, and list markers alone on a line (`- ` before an item whose text sits in
a nested block). Line-based quality rules count that debris as lines: a page with a dozen `- ` lines
looks repetitive to Gopher's duplicate-line rule. `normalize_text`:

1. strips trailing whitespace from every line; a whitespace-only line becomes blank;
2. joins a bare list marker to the line right after it (`- ` + `item` -> `- item`), or drops it
   when a blank line or the end follows;
3. collapses every run of blank lines into one blank line (the paragraph break) and trims the text.

Leading indentation is kept (code blocks need it), and so are single line breaks.
"""

from __future__ import annotations

import re

# A line that is only a list marker: a bullet or dash, or a number / letter with `.` or `)`.
_BARE_MARKER = re.compile(r"^\s*(?:[-*+\u2022\u00b7\u2013\u2014\u25aa\u25e6]|\d{1,3}[.)]|[a-zA-Z][.)])\s*$")


def normalize_text(text: str) -> str:
    """`text` with whitespace-only lines blank, bare list markers joined to their item, blank runs
    collapsed to one blank line, and no leading or trailing blank lines."""
    lines: list[str] = []
    marker: str | None = None  # a bare marker waiting for its item's text
    for raw in text.splitlines():
        line = raw.rstrip()
        if _BARE_MARKER.match(line):
            marker = line.strip()
            continue
        if not line:
            marker = None  # a marker with no item text before the paragraph ends
            if lines and lines[-1]:
                lines.append("")
            continue
        if marker is not None:
            line = f"{marker} {line.lstrip()}"
            marker = None
        lines.append(line)
    return "\n".join(lines).strip("\n")
