"""Quality filters: gristmill's filter stage against datatrove's filter chain, documents per second.

Data: the sample site's pages as plain text (resiliparse, main content), replicated into edited
copies with a fixed seed: lines dropped, lines repeated, paragraphs of other pages appended, so
the rules see both clean and repetitive pages. Every document is judged as English by both.

Reference: datatrove's GopherRepetitionFilter -> GopherQualityFilter -> C4QualityFilter ->
FineWebQualityFilter with their defaults and datatrove's English word tokenizer (spaCy's blank
`en` model), each document going through the chain until a filter removes it, as in a datatrove
pipeline. gristmill: `filter_documents` on Arrow tables of `--part-size` documents with its
default config (all families on, including C4 line rewriting). One process, one core each.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import pyarrow as pa
from datatrove.data import Document
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)

from benchmarks.sample_pages import sample_pages
from gristmill.pipeline.filter.stage import FilterConfig, filter_documents

SEED = 1234


def page_texts() -> list[str]:
    return [p.text for p in sample_pages() if p.text.strip()]


def edited_copies(pages: list[str], count: int, seed: int = SEED) -> list[str]:
    """`count` documents: each a page with ~10 % of lines dropped, ~5 % repeated, and sometimes
    a paragraph of another page appended."""
    rng = random.Random(seed)
    docs = []
    for i in range(count):
        lines = pages[i % len(pages)].split("\n")
        edited = []
        for line in lines:
            roll = rng.random()
            if roll < 0.10:
                continue
            edited.append(line)
            if roll > 0.95:
                edited.append(line)
        if rng.random() < 0.3:
            edited.extend(rng.choice(pages).split("\n\n")[:2])
        docs.append("\n".join(edited))
    return docs


def datatrove_docs_per_s(texts: list[str]) -> float:
    chain = [GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(), FineWebQualityFilter()]
    chain[1].filter(Document(text="warm up the tokenizer model", id="warm-up"))
    documents = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
    start = time.perf_counter()
    for doc in documents:
        for step in chain:
            if step.filter(doc) is not True:
                break
    return len(texts) / (time.perf_counter() - start)


def gristmill_docs_per_s(texts: list[str], part_size: int, repeats: int) -> tuple[float, int]:
    parts = [
        pa.table({
            "id": [str(i) for i in range(start, start + len(chunk))],
            "url": pa.array([None] * len(chunk), type=pa.string()),
            "text": chunk,
            "lang": ["en"] * len(chunk),
            "lang_score": pa.array([None] * len(chunk), type=pa.float64()),
        })
        for start in range(0, len(texts), part_size)
        for chunk in [texts[start : start + part_size]]
    ]
    config = FilterConfig(type="filter")
    filter_documents(parts[0].slice(0, 10), config)  # imports and first-call set-up
    best = float("inf")
    kept = 0
    for _ in range(repeats):
        start = time.perf_counter()
        kept = sum(filter_documents(part, config).kept.num_rows for part in parts)
        best = min(best, time.perf_counter() - start)
    return len(texts) / best, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer documents: runs in well under a minute")
    parser.add_argument("--docs", type=int, default=None, help="documents (default 5000, 1000 with --quick)")
    parser.add_argument("--part-size", type=int, default=1000, help="documents per Arrow table (a part)")
    args = parser.parse_args()
    count = args.docs or (1000 if args.quick else 5000)

    texts = edited_copies(page_texts(), count)
    print(f"{len(texts)} documents, {sum(map(len, texts)) / len(texts):.0f} characters on average")
    ours, kept = gristmill_docs_per_s(texts, args.part_size, repeats=3)
    print(f"gristmill filter stage: {ours:,.0f} docs/s ({kept} kept)")
    reference_texts = texts if not args.quick else texts[: max(count // 2, 1)]
    theirs = datatrove_docs_per_s(reference_texts)
    print(f"datatrove chain:        {theirs:,.0f} docs/s ({len(reference_texts)} documents)")
    print(json.dumps({
        "benchmark": "filters",
        "docs_per_s": round(ours, 1),
        "reference_docs_per_s": round(theirs, 1),
        "ratio": round(ours / theirs, 1),
        "target": 10,
    }))


if __name__ == "__main__":
    main()
