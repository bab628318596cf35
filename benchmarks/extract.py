"""WARC -> clean text: gristmill's extract stage against datatrove's `WarcReader` + `Trafilatura`.

Data: one gzipped WARC as a crawler writes it (a request and a response record per page), built
from the bundled sample site's pages (English, French, German, Japanese, Chinese, Russian, ...),
each page written `--copies` times in an order shuffled with a fixed seed.

Both tools read the same file in this one process, one core each: gristmill's stage function
(`extract_archive`: FastWARC, charset detection, resiliparse main-content extraction, and language
identification, which datatrove's two steps do not do) and datatrove's reader feeding its
Trafilatura extractor (with a per-document timeout long enough that no page is skipped, and without
trafilatura's cross-document deduplication, which would drop the text of the repeated copies:
both sides extract every page of every copy).

Like for like (benchmarks/measure.py): one thread each, the same untimed warm-up (both tools on
a one-copy WARC, so that one-time costs of a worker process stay out of the figures), then
`--rounds` interleaved rounds (gristmill, datatrove, gristmill, ...) so that a slow spell of the
machine hits both. The figure per side is its best round's CPU seconds (this process plus its
finished children: datatrove runs Trafilatura in a sandbox subprocess, which ends inside its
timing), so it does not depend on how many other jobs share the machine's cores; `ratio` is
datatrove's over gristmill's. Wall times are printed as well.

Outputs: the kept documents of both are compared by URL. The extractors differ (resiliparse main
content against Trafilatura), so a page one of them finds no text in can be kept by the other:
every such page is printed and counted (`kept_only_by_gristmill`, `kept_only_by_reference`).

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import io as bytes_io
import json
import random
import sys
import tempfile
from pathlib import Path

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from benchmarks.measure import THREADS, interleaved, pin_threads
from gristmill import DATA_DIR
from gristmill.pipeline.extract.archive import archive_spans
from gristmill.pipeline.extract.stage import ExtractConfig, extract_archive

SITE = DATA_DIR / "sample_site"


def build_warc(path: Path, copies: int, seed: int = 0) -> int:
    """Write the sample site `copies` times over into one WARC; returns the number of pages."""
    pages = [(f"http://127.0.0.1:8000/{p.relative_to(SITE)}", p.read_bytes()) for p in sorted(SITE.rglob("*.html"))]
    entries = [(f"{url}?copy={i}", body) for i in range(copies) for url, body in pages]
    random.Random(seed).shuffle(entries)
    with open(path, "wb") as handle:
        writer = WARCWriter(handle, gzip=True)
        for url, body in entries:
            request = StatusAndHeaders("GET / HTTP/1.1", [("Host", "127.0.0.1")], is_http_request=True)
            writer.write_record(writer.create_warc_record(url, "request", http_headers=request))
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            record = writer.create_warc_record(url, "response", payload=bytes_io.BytesIO(body), http_headers=headers)
            record.rec_headers.add_header("WARC-Identified-Payload-Type", "text/html")
            writer.write_record(record)
    return len(entries)


def run_gristmill(path: Path) -> set[str]:
    """The URLs of the documents gristmill's extract stage keeps."""
    config = ExtractConfig(type="extract")
    return set(extract_archive(archive_spans(path, config.split_bytes), config).kept.column("url").to_pylist())


def run_datatrove(folder: Path) -> set[str]:
    """The URLs of the documents datatrove's reader + Trafilatura yield; the sandbox process ends
    inside the call."""
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.readers import WarcReader
    from loguru import logger

    logger.remove()  # datatrove logs every step; keep the benchmark's output to its figures
    reader = WarcReader(str(folder), glob_pattern="*.warc.gz")
    extractor = Trafilatura(favour_precision=True, timeout=30.0, deduplicate=False)
    return {doc.metadata["url"] for doc in extractor.run(reader.run())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small WARC, under a minute in all")
    parser.add_argument("--copies", type=int, default=None, help="copies of the sample site (default 8, quick 2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of both tools (default 3)")
    args = parser.parse_args()
    pin_threads()
    copies = args.copies or (2 if args.quick else 8)
    with tempfile.TemporaryDirectory(prefix="gristmill-bench-extract-") as tmp:
        warm_up = Path(tmp) / "warm-up"
        warm_up.mkdir()
        build_warc(warm_up / "sample.warc.gz", copies=1)
        folder = Path(tmp) / "timed"
        folder.mkdir()
        path = folder / "sample.warc.gz"
        records = build_warc(path, copies)
        print(f"WARC: {records} response records, {path.stat().st_size / 1e6:.1f} MB gzipped; "
              f"{THREADS} thread(s) each", file=sys.stderr)
        timings = interleaved(
            {"gristmill extract": lambda: run_gristmill(path), "datatrove WarcReader+Trafilatura": lambda: run_datatrove(folder)},
            rounds=args.rounds,
            warm_up={"gristmill extract": lambda: run_gristmill(warm_up / "sample.warc.gz"),
                     "datatrove WarcReader+Trafilatura": lambda: run_datatrove(warm_up)},
        )
    ours, theirs = timings["gristmill extract"], timings["datatrove WarcReader+Trafilatura"]
    for url in sorted(ours.result ^ theirs.result):
        print(f"  kept only by {'gristmill' if url in ours.result else 'datatrove'}: {url}", file=sys.stderr)
    round_ratios = [round(r / o, 1) for o, r in zip(ours.cpu_s, theirs.cpu_s)]
    print("gristmill also identifies each page's language (datatrove's reader and extractor do not); "
          "its time includes that", file=sys.stderr)
    print(f"gristmill {records / ours.best_cpu_s:.0f} docs/s, {len(ours.result)} kept; datatrove "
          f"{records / theirs.best_cpu_s:.1f} docs/s, {len(theirs.result)} kept; per-round ratios {round_ratios}",
          file=sys.stderr)
    result = {
        "benchmark": "extract",
        "documents": records,
        "docs_per_s": round(records / ours.best_cpu_s, 1),
        "reference_docs_per_s": round(records / theirs.best_cpu_s, 1),
        "ratio": round(theirs.best_cpu_s / ours.best_cpu_s, 1),
        "round_ratios": round_ratios,
        "target": 10,
        "kept": len(ours.result),
        "reference_kept": len(theirs.result),
        "kept_only_by_gristmill": len(ours.result - theirs.result),
        "kept_only_by_reference": len(theirs.result - ours.result),
        "threads": THREADS,
        "extra_work_by_gristmill": "language identification",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
