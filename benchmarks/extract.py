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

Per-core figure: throughput is response records in / CPU seconds (this process plus its finished
children: datatrove runs Trafilatura in a sandbox subprocess, which ends inside its timing), so the
figure does not depend on how many other jobs share the machine's cores. The two sides run in
`--rounds` interleaved rounds (gristmill, datatrove, gristmill, ...) so that a slow spell of the
machine hits both; `ratio` is the reference's total CPU seconds over gristmill's, and every
round's own ratio is printed too. Before them both tools run once, untimed, on a one-copy WARC, so
that one-time costs of a worker process stay out of the figures. Wall times are printed as well.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import io as bytes_io
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

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


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have finished."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def run_gristmill(path: Path) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, documents kept)."""
    config = ExtractConfig(type="extract")
    cpu, wall = cpu_seconds(), time.perf_counter()
    output = extract_archive(archive_spans(path, config.split_bytes), config)
    return cpu_seconds() - cpu, time.perf_counter() - wall, output.kept.num_rows


def run_datatrove(folder: Path) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, documents kept); the sandbox process ends inside the timing."""
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.readers import WarcReader
    from loguru import logger

    logger.remove()  # datatrove logs every step; keep the benchmark's output to its figures
    reader = WarcReader(str(folder), glob_pattern="*.warc.gz")
    extractor = Trafilatura(favour_precision=True, timeout=30.0, deduplicate=False)
    cpu, wall = cpu_seconds(), time.perf_counter()
    kept = sum(1 for _ in extractor.run(reader.run()))
    return cpu_seconds() - cpu, time.perf_counter() - wall, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small WARC, under a minute in all")
    parser.add_argument("--copies", type=int, default=None, help="copies of the sample site (default 8, quick 2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of both tools (default 3)")
    args = parser.parse_args()
    copies = args.copies or (2 if args.quick else 8)
    ours_total = ref_total = 0.0
    round_ratios = []
    with tempfile.TemporaryDirectory(prefix="gristmill-bench-extract-") as tmp:
        # Warm-up, untimed: what a worker pays once per process (imports, the language model,
        # pyarrow importing pandas for its first table) stays out of the per-file figures.
        warm_up = Path(tmp) / "warm-up"
        warm_up.mkdir()
        build_warc(warm_up / "sample.warc.gz", copies=1)
        run_gristmill(warm_up / "sample.warc.gz")
        run_datatrove(warm_up)
        folder = Path(tmp) / "timed"
        folder.mkdir()
        path = folder / "sample.warc.gz"
        records = build_warc(path, copies)
        print(f"WARC: {records} response records, {path.stat().st_size / 1e6:.1f} MB gzipped", file=sys.stderr)
        for round_ in range(1, args.rounds + 1):
            ours_s, ours_wall, ours_kept = run_gristmill(path)
            ref_s, ref_wall, ref_kept = run_datatrove(folder)
            ours_total, ref_total = ours_total + ours_s, ref_total + ref_s
            round_ratios.append(round(ref_s / ours_s, 1))
            print(f"round {round_}: gristmill extract {ours_s:.2f} CPU s ({ours_wall:.2f} wall s), "
                  f"{records / ours_s:.0f} docs/s, {ours_kept} kept; datatrove WarcReader+Trafilatura "
                  f"{ref_s:.2f} CPU s ({ref_wall:.2f} wall s), {records / ref_s:.1f} docs/s, {ref_kept} kept; "
                  f"ratio {ref_s / ours_s:.1f}", file=sys.stderr)
    result = {
        "benchmark": "extract",
        "docs_per_s": round(records * args.rounds / ours_total, 1),
        "reference_docs_per_s": round(records * args.rounds / ref_total, 1),
        "ratio": round(ref_total / ours_total, 1),
        "round_ratios": round_ratios,
        "target": 10,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
