"""Training examples for the quality classifier: read from stages and files, or made from the
bundled sample site.

An example source is a stage (its kept documents' `text`), a Parquet file (`text` column), a JSON
lines file (`text` key) or a text file (one example per non-empty line).

The bundled set (`gristmill/data/quality/`, rebuilt by `python -m gristmill.pipeline.classify.examples`)
is made from the sample site's documentation pages, so the project needs no outside data:
positives are the pages' main-content paragraphs of at least `MIN_PARAGRAPH_CHARS` characters;
negatives are what a crawl also brings in, made from the same pages: the short lines around the
main content (menus, footers, navigation) glued into blocks, and each positive paragraph with its
words shuffled (word salad keeps the vocabulary but loses the language).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pyarrow.parquet as pq

from gristmill import DATA_DIR
from gristmill.pipeline import io
from gristmill.pipeline.stage import StageContext

BUNDLED_DIR = DATA_DIR / "quality"
POSITIVES_FILE = "positives.txt"
NEGATIVES_FILE = "negatives.txt"
MIN_PARAGRAPH_CHARS = 200
NAVIGATION_MAX_LINE_CHARS = 40
NAVIGATION_BLOCK_LINES = 12
SEED = 0


def one_line(text: str) -> str:
    """fastText reads one example per line: every run of whitespace becomes one space."""
    return " ".join(text.split())


def read_examples(ctx: StageContext, entries: list[str], key: str) -> list[str]:
    """The texts of every source in `entries` (stages or files), one line each, empty ones dropped."""
    texts: list[str] = []
    for entry in entries:
        source = ctx.reference(entry)
        paths = io.kept_parts(source.stage_dir) if source.is_stage else source.files
        if not paths:
            raise ValueError(f"stage {ctx.name!r}, key {key!r}: {entry!r} holds no examples (no kept parts or files)")
        for path in paths:
            texts.extend(t for t in (one_line(x) for x in texts_of_file(path, ctx.name, key)) if t)
    return texts


def texts_of_file(path: Path, stage: str, key: str) -> list[str]:
    """The example texts of one file, by its suffix."""
    if path.suffix == ".parquet":
        if "text" not in pq.ParquetFile(path).schema_arrow.names:
            raise ValueError(f"stage {stage!r}, key {key!r}: {path} has no `text` column")
        return [t for t in pq.read_table(path, columns=["text"]).column("text").to_pylist() if t]
    if path.suffix in (".jsonl", ".json"):
        texts = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"stage {stage!r}, key {key!r}: {path}, line {number}: not a JSON object with `text`") from None
        return texts
    if path.suffix == ".txt":
        return path.read_text().splitlines()
    raise ValueError(f"stage {stage!r}, key {key!r}: {path}: expected .parquet, .jsonl or .txt examples")


def page_texts(site: Path) -> list[tuple[str, str]]:
    """(main content, whole page) text of every HTML page under `site`, in path order."""
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

    pages = []
    for path in sorted(site.rglob("*.html")):
        html = bytes_to_str(path.read_bytes(), detect_encoding(path.read_bytes()))
        pages.append((extract_plain_text(html, main_content=True), extract_plain_text(html, main_content=False)))
    return pages


def bundled_examples(site: Path = DATA_DIR / "sample_site") -> tuple[list[str], list[str]]:
    """(positives, negatives) made from the sample site as the module docstring says; fixed seed."""
    rng = random.Random(SEED)
    positives, negatives = [], []
    for main, whole in page_texts(site):
        paragraphs = [one_line(p) for p in main.split("\n")]
        positives += [p for p in paragraphs if len(p) >= MIN_PARAGRAPH_CHARS]
        short = [one_line(line) for line in whole.split("\n")]
        short = [line for line in short if 0 < len(line) <= NAVIGATION_MAX_LINE_CHARS]
        for start in range(0, len(short) - NAVIGATION_BLOCK_LINES + 1, NAVIGATION_BLOCK_LINES):
            negatives.append(" ".join(short[start : start + NAVIGATION_BLOCK_LINES]))
    positives = sorted(set(positives))
    for paragraph in positives:
        words = paragraph.split()
        rng.shuffle(words)
        negatives.append(" ".join(words))
    return positives, sorted(set(negatives))


def write_bundled(folder: Path = BUNDLED_DIR) -> tuple[Path, Path]:
    """Write the bundled positives and negatives, one example per line."""
    positives, negatives = bundled_examples()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / POSITIVES_FILE).write_text("\n".join(positives) + "\n")
    (folder / NEGATIVES_FILE).write_text("\n".join(negatives) + "\n")
    return folder / POSITIVES_FILE, folder / NEGATIVES_FILE


if __name__ == "__main__":
    for written in write_bundled(Path(sys.argv[1]) if len(sys.argv) > 1 else BUNDLED_DIR):
        print(written, sum(1 for _ in written.open()))
