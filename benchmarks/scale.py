"""Scale: does the pipeline's speed follow the workers, and its memory stay flat as the data grows?

Data: a synthetic web crawl built with a fixed seed from the bundled sample site's paragraphs. Each
page draws a language (weighted by how many paragraphs the site has in it), then 6-18 of that
language's paragraphs (no paragraph twice), wrapped in HTML; a fifth of the pages carry an e-mail
address and a phone number (work for `pii`), and `NEAR_DUPLICATES` (15%) of them are copies of an
earlier page with 1% of the words (at least one) edited (work for `dedup`). The pages are written by
gristmill's crawler writer (`WarcRoller`: request + response records, one gzip member per record)
into ONE WARC file, the 1x corpus holding `--pages` pages and the 4x corpus four times as many,
drawn the same way.

`split_bytes` of the extract stage is set to the 1x WARC's size / `UNITS_AT_1X` (8), for both
corpora, so the one big file becomes 8 work units at 1x and about 32 at 4x: parallelism follows the
data, and every unit (hence every part and every task downstream) has the same size at 1x and 4x.

Measured, each run on a fresh LocalCluster (1 thread per worker, workers in their own processes),
after an untimed warm-up run of the same workflow on that cluster (imports, models) on a small WARC
cut into 8 units, so that every worker has run every stage before the timed run:

- Scaling: docs/s of the workflow extract -> filter -> dedup -> pii (defaults, through
  `run_workflow`; docs = response records in the WARC, wall time of the whole run) on the 4x corpus
  with 1 worker and with 2 workers; `efficiency` = docs/s(2) / (2 x docs/s(1)), target >= 0.85.
  The machine may be shared: the load average before and after each run, and CPU/wall (CPU seconds
  of this process and all its descendants, i.e. client, scheduler and workers, over wall seconds;
  2.0 would be two cores busy throughout) are printed, so a reader can judge how much of a shortfall
  is the machine's; CPU seconds are printed per process too. `cpu_efficiency` = CPU seconds(1 worker) / CPU seconds(2 workers) is the part
  of the shortfall that other jobs cannot cause: the extra work that running on two workers costs.
- Memory: the peak resident memory (psutil, sampled every 0.2 s by a thread) of the client (this
  process, which also hosts the scheduler) and of each worker, in the 2-worker runs on the 1x and 4x
  corpora; `rss_growth` is the largest peak(4x) / peak(1x) over those processes, target <= 1.25.
- The one serial step before the extract tasks: indexing the one WARC (a single task inflates every
  gzip member to find the record boundaries), timed here in this process on the 4x WARC
  (`index_4x_s`, and its share of the 2-worker run's wall time).
- Dedup alone at `--dedup-docs N` short documents (`benchmarks.dedup.memory`: 2 workers, 40,000
  documents a part): client peak <= 1.5 GB, each worker's <= 3 GB, and its docs/s.

`--quick`: 600 pages at 1x and 20,000 dedup documents (about two minutes on two idle cores);
defaults: 3,000 pages and 2,000,000 dedup documents. Exits 0 whatever the figures.

Last line: {"benchmark": "scale", "efficiency": ..., "rss_growth": ..., "dedup_client_gb": ...,
"dedup_worker_gb": ..., "ratio": <efficiency>, "target": 0.85, ...}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime, timezone
from html import escape
from pathlib import Path

import psutil
import yaml

from benchmarks.dedup import PeakRSS, edit, memory
from benchmarks.measure import pin_threads
from benchmarks.sample_pages import sample_pages
from gristmill.pipeline import io
from gristmill.pipeline.crawl.warc import Exchange, WarcRoller
from gristmill.pipeline.extract.archive import archive_spans

UNITS_AT_1X = 8
NEAR_DUPLICATES = 0.15
PII_SHARE = 0.2
STAGES = ("extract", "filter", "dedup", "pii")


def paragraphs_by_language() -> dict[str, list[str]]:
    """The sample site's paragraphs of at least 8 words, by the language of their page."""
    paragraphs: dict[str, list[str]] = defaultdict(list)
    for page in sample_pages(main_content=False):
        paragraphs[page.lang].extend(line.strip() for line in page.text.split("\n") if len(line.split()) >= 8)
    return dict(paragraphs)


def synthetic_pages(n: int, seed: int = 0) -> list[str]:
    """`n` HTML pages recombined from the sample site's paragraphs; `NEAR_DUPLICATES` of them are
    copies of an earlier page with 1% of its words (at least one) edited."""
    rng = random.Random(seed)
    paragraphs = paragraphs_by_language()
    languages = sorted(paragraphs)
    weights = [len(paragraphs[lang]) for lang in languages]
    bodies: list[list[str]] = []
    for i in range(n):
        if bodies and rng.random() < NEAR_DUPLICATES:
            body = [p.split() for p in rng.choice(bodies)]
            for _ in range(max(1, round(0.01 * sum(map(len, body))))):  # 1% of the page's words, at least one
                k = rng.choices(range(len(body)), [len(words) for words in body])[0]
                body[k] = edit(body[k], 1 / len(body[k]), rng)
            body = [" ".join(words) for words in body]
        else:
            lang = rng.choices(languages, weights)[0]
            body = rng.sample(paragraphs[lang], min(rng.randrange(6, 19), len(paragraphs[lang])))
            if rng.random() < PII_SHARE:
                body.append(f"Write to reader{i}@mailbox{i % 97}.net or call +1 415 555 {i % 10_000:04d}.")
        bodies.append(body)
    return [
        f"<!doctype html><html><head><title>{escape(body[0][:60])}</title></head><body><nav><a href='/'>Home</a>"
        f"</nav><article>{''.join(f'<p>{escape(p)}</p>' for p in body)}</article></body></html>"
        for body in bodies
    ]


def write_crawl(folder: Path, pages: int, seed: int = 0) -> Path:
    """One WARC file of `pages` crawled pages, written as gristmill's crawler writes them."""
    roller = WarcRoller(folder, "crawl", max_bytes=1 << 62, position=None)
    fetched = datetime(2024, 1, 1, tzinfo=timezone.utc)
    for i, html in enumerate(synthetic_pages(pages, seed)):
        roller.write(Exchange(
            url=f"http://site{i % 50}.example/page/{i}", fetch_time=fetched, ip_address="93.184.216.34",
            request_line=f"GET /page/{i} HTTP/1.1", request_headers=[("Host", f"site{i % 50}.example")],
            status=200, reason="OK", http_version="HTTP/1.1",
            response_headers=[("Content-Type", "text/html; charset=utf-8")], body=html.encode(),
            declared_type="text/html",
        ))
    roller.close()
    (path,) = roller.files
    return path


def workflow_file(path: Path, warc: Path, split_bytes: int) -> Path:
    """The workflow extract -> filter -> dedup -> pii over `warc`, stage defaults but `split_bytes`."""
    path.write_text(yaml.safe_dump({"name": "scale", "stages": {
        "extract": {"type": "extract", "input": str(warc), "split_bytes": split_bytes},
        "filter": {"type": "filter", "input": "extract"},
        "dedup": {"type": "dedup", "input": "filter"},
        "pii": {"type": "pii", "input": "dedup"},
    }}))
    return path


def tree_cpu_seconds() -> dict[int, float]:
    """CPU seconds of this process and of each of its living descendants (nannies, workers), by pid."""
    seconds = {}
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            times = process.cpu_times()
            seconds[process.pid] = times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return seconds


def run(workflow: Path, warm_up: Path, workers: int, folder: Path) -> dict:
    """Run `workflow` once untimed on `warm_up`, then timed, on a fresh LocalCluster of `workers`
    one-thread workers: docs/s, CPU/wall, load averages and peak RSS per process."""
    from distributed import Client, LocalCluster

    from gristmill.pipeline.runner import run_workflow

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=40) as cluster, Client(cluster) as client:
        client.run(pin_threads)
        address = cluster.scheduler_address
        run_workflow(warm_up, runs_dir=folder / f"warm-up-{workers}", scheduler=address)
        pids = {f"worker-{i}": pid for i, pid in enumerate(client.run(os.getpid).values())}
        load_before = os.getloadavg()[0]
        with PeakRSS({"client": os.getpid(), **pids}) as rss:
            before, started = tree_cpu_seconds(), time.perf_counter()
            run_dir = run_workflow(workflow, runs_dir=folder / f"runs-{workers}", scheduler=address)
            wall, after = time.perf_counter() - started, tree_cpu_seconds()
        load_after = os.getloadavg()[0]
    names = {pid: name for name, pid in {"client": os.getpid(), **pids}.items()}
    cpu_by_process: dict[str, float] = defaultdict(float)
    for pid, seconds in after.items():
        cpu_by_process[names.get(pid, "other")] += seconds - before.get(pid, 0.0)
    cpu = sum(cpu_by_process.values())
    extract = io.read_json(run_dir / "extract" / io.STATS_FILE)
    counts = {stage: io.read_json(run_dir / stage / io.STATS_FILE)["counts"] for stage in STAGES}
    docs = counts["extract"]["kept"] + counts["extract"]["removed"]
    result = {
        "workers": workers, "docs": docs, "units": extract["units"], "wall_s": round(wall, 2),
        "docs_per_s": round(docs / wall, 1), "cpu_s": round(cpu, 2), "cpu_per_wall": round(cpu / wall, 2),
        "cpu_s_by_process": {name: round(seconds, 2) for name, seconds in cpu_by_process.items()},
        "load_before": round(load_before, 2), "load_after": round(load_after, 2),
        "peak_gb": {name: round(peak / 2**30, 3) for name, peak in rss.peaks.items()},
        "kept": {stage: counts[stage]["kept"] for stage in STAGES},
    }
    print(f"{workflow.stem}, {workers} worker(s): {json.dumps(result)}", file=sys.stderr)
    return result


def pipeline(pages: int) -> dict:
    """The 1x and 4x corpora through the workflow: scaling efficiency at 4x, RSS growth 1x -> 4x."""
    with tempfile.TemporaryDirectory(prefix="gristmill-bench-scale-") as tmp:
        folder = Path(tmp)
        warcs = {name: write_crawl(folder / name, n, seed) for name, n, seed in
                 (("1x", pages, 0), ("4x", 4 * pages, 0), ("warm-up", 80, 1))}
        sizes = {name: path.stat().st_size for name, path in warcs.items()}
        split_bytes = sizes["1x"] // UNITS_AT_1X
        started = time.perf_counter()
        spans = archive_spans(warcs["4x"], split_bytes)
        index_s = time.perf_counter() - started
        print(f"one WARC each: {sizes} bytes; split_bytes {split_bytes}; indexing the 4x WARC (one task, "
              f"before any extract task starts): {index_s:.2f} s, {len(spans)} spans", file=sys.stderr)
        workflows = {name: workflow_file(folder / f"{name}.yaml", path, split_bytes) for name, path in warcs.items()}
        # The warm-up file is cut into as many units as the 1x file, so that every worker gets work in every stage.
        workflows["warm-up"] = workflow_file(folder / "warm-up.yaml", warcs["warm-up"], sizes["warm-up"] // UNITS_AT_1X)
        one = run(workflows["4x"], workflows["warm-up"], 1, folder / "4x-1")
        two = run(workflows["4x"], workflows["warm-up"], 2, folder / "4x-2")
        small = run(workflows["1x"], workflows["warm-up"], 2, folder / "1x-2")
    growth = {name: round(two["peak_gb"][name] / small["peak_gb"][name], 3) for name in small["peak_gb"]}
    return {
        "efficiency": round(two["docs_per_s"] / (2 * one["docs_per_s"]), 3),
        "rss_growth": max(growth.values()),
        "cpu_efficiency": round(one["cpu_s"] / two["cpu_s"], 3),
        "rss_growth_by_process": growth,
        "warc_bytes": {"1x": sizes["1x"], "4x": sizes["4x"]},
        "split_bytes": split_bytes,
        "index_4x_s": round(index_s, 3),
        "index_4x_share_of_2_worker_wall": round(index_s / two["wall_s"], 4),
        "runs": {"4x_1_worker": one, "4x_2_workers": two, "1x_2_workers": small},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="600 pages and 20,000 dedup documents, ~2 minutes")
    parser.add_argument("--pages", type=int, default=None, help="pages of the 1x corpus (default 3,000, quick 600)")
    parser.add_argument("--dedup-docs", type=int, default=None,
                        help="documents for the dedup memory check (default 2,000,000, quick 20,000)")
    args = parser.parse_args()
    pin_threads()
    pages = args.pages or (600 if args.quick else 3_000)
    n = args.dedup_docs or (20_000 if args.quick else 2_000_000)
    scale = pipeline(pages)
    dedup = memory(n)
    print(json.dumps({
        "benchmark": "scale",
        "efficiency": scale["efficiency"],
        "rss_growth": scale["rss_growth"],
        "dedup_client_gb": dedup["client_gb"],
        "dedup_worker_gb": dedup["worker_gb"],
        "ratio": scale["efficiency"],
        "target": 0.85,
        "rss_growth_target": 1.25,
        "dedup_client_target_gb": dedup["client_target_gb"],
        "dedup_worker_target_gb": dedup["worker_target_gb"],
        "pages_1x": pages,
        **{k: v for k, v in scale.items() if k not in ("efficiency", "rss_growth")},
        "dedup_docs": n,
        "dedup_docs_per_s": dedup["docs_per_s"],
        "dedup_rounds": dedup["rounds"],
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpu_cores": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
