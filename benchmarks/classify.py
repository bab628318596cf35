"""Quality classifier scoring: gristmill's classify scoring against datatrove's
FastTextClassifierFilter, documents per second, same model, same documents, scores compared.

Data: the sample site's pages as plain text (resiliparse, main content), repeated to `--docs`
documents. Model: a fastText classifier trained with gristmill's defaults on the bundled
positives and negatives (`gristmill/data/quality/`), saved once and loaded by both sides.

Reference: datatrove's `FastTextClassifierFilter(keep_labels=("hq", 0.5), newline_replacement=" ")`
(one `predict` per document, as in a datatrove pipeline) over `Document`s. gristmill:
`score_texts` on Arrow columns of `--part-size` documents (one call into fastText per part), the
function the classify stage maps over parts. One process, one core each. Both sides' scores for
every document are compared (equal to 1e-6).

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from datatrove.data import Document
from datatrove.pipeline.filters import FastTextClassifierFilter

from benchmarks.sample_pages import sample_pages
from gristmill.pipeline.classify.examples import BUNDLED_DIR, NEGATIVES_FILE, POSITIVES_FILE
from gristmill.pipeline.classify.model import FastTextSettings, load_classifier, score_texts, train_classifier


def datatrove_scores(model_path: Path, texts: list[str]) -> tuple[float, np.ndarray]:
    step = FastTextClassifierFilter(str(model_path), keep_labels=("hq", 0.5), newline_replacement=" ")
    step.filter(Document(text="warm up the model", id="warm-up"))
    documents = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
    start = time.perf_counter()
    for doc in documents:
        step.filter(doc)
    seconds = time.perf_counter() - start
    return len(texts) / seconds, np.array([d.metadata["__label__hq"] for d in documents], dtype=np.float32)


def gristmill_scores(model_path: Path, texts: list[str], part_size: int, repeats: int) -> tuple[float, np.ndarray]:
    model = load_classifier(model_path)
    parts = [pa.array(texts[i : i + part_size], pa.string()) for i in range(0, len(texts), part_size)]
    score_texts(model, parts[0][:10])
    best, scores = float("inf"), np.zeros(0)
    for _ in range(repeats):
        start = time.perf_counter()
        scores = np.concatenate([score_texts(model, part) for part in parts])
        best = min(best, time.perf_counter() - start)
    return len(texts) / best, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer documents: runs in well under a minute")
    parser.add_argument("--docs", type=int, default=None, help="documents (default 20000, 4000 with --quick)")
    parser.add_argument("--part-size", type=int, default=1000, help="documents per Arrow column (a part)")
    args = parser.parse_args()
    count = args.docs or (4000 if args.quick else 20000)
    pages = [p.text for p in sample_pages() if p.text.strip()]
    texts = [pages[i % len(pages)] for i in range(count)]
    print(f"{len(texts)} documents, {sum(map(len, texts)) / len(texts):.0f} characters on average")
    with tempfile.TemporaryDirectory() as folder:
        positives = (BUNDLED_DIR / POSITIVES_FILE).read_text().splitlines()
        negatives = (BUNDLED_DIR / NEGATIVES_FILE).read_text().splitlines()
        model_path = train_classifier(positives, negatives, FastTextSettings(), Path(folder)).path
        ours, our_scores = gristmill_scores(model_path, texts, args.part_size, repeats=3)
        print(f"gristmill score_texts:        {ours:,.0f} docs/s")
        theirs, their_scores = datatrove_scores(model_path, texts)
        print(f"datatrove FastTextClassifier: {theirs:,.0f} docs/s")
    max_diff = float(np.abs(our_scores - their_scores).max())
    print(f"largest score difference: {max_diff:.2e} over {len(texts)} documents")
    print(json.dumps({
        "benchmark": "classify",
        "docs_per_s": round(ours, 1),
        "reference_docs_per_s": round(theirs, 1),
        "ratio": round(ours / theirs, 2),
        "target": 3,
        "scores_equal": max_diff <= 1e-6,
    }))


if __name__ == "__main__":
    main()
