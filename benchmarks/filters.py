"""Quality filters: gristmill's filter stage against datatrove's filter chain, documents per CPU second.

Data: the sample site's pages as plain text (resiliparse, main content), replicated into edited
copies with a fixed seed: lines dropped, lines repeated, paragraphs of other pages appended, so
the rules see both clean and repetitive pages. Every document is judged as English by both.

Reference: datatrove's GopherRepetitionFilter -> GopherQualityFilter -> C4QualityFilter ->
FineWebQualityFilter with their defaults and datatrove's English word tokenizer (spaCy's blank
`en` model), each document going through the chain until a filter removes it, as in a datatrove
pipeline. gristmill: `filter_documents` on Arrow tables of `--part-size` documents with the same
rules: the same four families at their defaults (C4 line rewriting included), C4's own end
punctuation (. ? ! " '; gristmill's default adds 。！？) and its length, URL and language families
off (datatrove's chain has none of them).

Both get the same documents, one thread each, the same untimed warm-up (the first 10 documents)
and the same interleaved rounds (benchmarks/measure.py); `ratio` is datatrove's best round's CPU
seconds over gristmill's.

Kept sets are compared by document id. The rules are the same, but the word splitting is not:
gristmill's splitter approximates spaCy's (no contraction splitting, so "don't" is one word), which
moves word counts, mean word length and stop-word counts, and C4's sentence count is a regular
expression in gristmill, spaCy-free. Every document kept by one side only is counted under the
pair (gristmill's reason, datatrove's filter and reason) and printed; the texts of documents
kept by both (after C4's line rewriting) are compared too. With datatrove given
gristmill's word splitter the two remove exactly the same documents for the same reasons
(tests/test_filters_parity.py).

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter

import pyarrow as pa
from datatrove.data import Document
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)

from benchmarks.measure import THREADS, interleaved, pin_threads
from benchmarks.sample_pages import sample_pages
from gristmill.pipeline.filter.stage import FilterConfig, filter_documents

SEED = 1234
WARM_UP_DOCS = 10
# datatrove's rules, in gristmill's config: C4's own end punctuation; no length, URL or language rules.
SAME_RULES = {"length": {"enabled": False}, "url": {"enabled": False}, "language": {"enabled": False},
              "c4": {"end_punctuation": [".", "?", "!", '"', "'"]}}


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


def datatrove_outcomes(texts: list[str]) -> dict[str, tuple[str | None, str | None]]:
    """Document id -> the first filter of datatrove's chain that removed it and why, or, for a
    kept document, None and its text (C4 rewrites it)."""
    chain = [GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(), FineWebQualityFilter()]
    outcomes = {}
    for i, text in enumerate(texts):
        doc = Document(text=text, id=str(i))
        for step in chain:
            verdict = step.filter(doc)
            if verdict is not True:
                outcomes[doc.id] = (f"{type(step).__name__}:{verdict[1] if isinstance(verdict, tuple) else ''}", None)
                break
        else:
            outcomes[doc.id] = (None, doc.text)
    return outcomes


def parts_of(texts: list[str], part_size: int) -> list[pa.Table]:
    return [
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


def gristmill_outcomes(parts: list[pa.Table], config: FilterConfig) -> dict[str, tuple[str | None, str | None]]:
    """Document id -> the rule that removed it, or, for a kept document, None and its text."""
    outcomes = {}
    for part in parts:
        output = filter_documents(part, config)
        kept, removed = output.kept, output.removed
        outcomes.update((i, (None, t)) for i, t in zip(kept["id"].to_pylist(), kept["text"].to_pylist()))
        outcomes.update((i, (r, None)) for i, r in zip(removed["id"].to_pylist(), removed["reason"].to_pylist()))
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer documents: runs in well under a minute")
    parser.add_argument("--docs", type=int, default=None, help="documents (default 3000, 600 with --quick)")
    parser.add_argument("--part-size", type=int, default=1000, help="documents per Arrow table (a part)")
    args = parser.parse_args()
    pin_threads()
    count = args.docs or (600 if args.quick else 3000)

    texts = edited_copies(page_texts(), count)
    parts, warm_up_parts = parts_of(texts, args.part_size), parts_of(texts[:WARM_UP_DOCS], WARM_UP_DOCS)
    config = FilterConfig(type="filter", **SAME_RULES)
    print(f"{len(texts)} documents, {sum(map(len, texts)) / len(texts):.0f} characters on average; "
          f"{THREADS} thread(s) each", file=sys.stderr)
    timings = interleaved(
        {"gristmill filter": lambda: gristmill_outcomes(parts, config), "datatrove chain": lambda: datatrove_outcomes(texts)},
        warm_up={"gristmill filter": lambda: gristmill_outcomes(warm_up_parts, config),
                 "datatrove chain": lambda: datatrove_outcomes(texts[:WARM_UP_DOCS])},
    )
    ours, theirs = timings["gristmill filter"].result, timings["datatrove chain"].result
    kept_ours = {i for i, (reason, _) in ours.items() if reason is None}
    kept_theirs = {i for i, (reason, _) in theirs.items() if reason is None}
    differing = Counter((ours[i][0] or "kept", theirs[i][0] or "kept") for i in kept_ours ^ kept_theirs)
    other_text = sum(ours[i][1] != theirs[i][1] for i in kept_ours & kept_theirs)
    for (mine, reference), n in differing.most_common():
        print(f"  {n} documents: gristmill {mine}, datatrove {reference}", file=sys.stderr)
    ours_s, theirs_s = timings["gristmill filter"].best_cpu_s, timings["datatrove chain"].best_cpu_s
    print(f"gristmill filter stage: {count / ours_s:,.0f} docs/s, {len(kept_ours)} kept; datatrove chain: "
          f"{count / theirs_s:,.0f} docs/s, {len(kept_theirs)} kept; {len(kept_ours & kept_theirs)} kept by both, "
          f"{len(kept_ours - kept_theirs)} by gristmill only, {len(kept_theirs - kept_ours)} by datatrove only; "
          f"{other_text} of those kept by both with a different (C4-rewritten) text",
          file=sys.stderr)
    print(json.dumps({
        "benchmark": "filters",
        "documents": count,
        "docs_per_s": round(count / ours_s, 1),
        "reference_docs_per_s": round(count / theirs_s, 1),
        "ratio": round(theirs_s / ours_s, 1),
        "target": 10,
        "kept": len(kept_ours),
        "reference_kept": len(kept_theirs),
        "kept_by_both": len(kept_ours & kept_theirs),
        "kept_only_by_gristmill": len(kept_ours - kept_theirs),
        "kept_only_by_reference": len(kept_theirs - kept_ours),
        "kept_by_both_with_different_text": other_text,
        "threads": THREADS,
    }))


if __name__ == "__main__":
    main()
