"""Near-duplicate detection: gristmill's MinHash/LSH against datasketch `MinHash` + `MinHashLSH`.

Data: the sample site's pages as plain text, plus edited copies of each at known edit rates
(word substitutions, deletions and insertions), built with a fixed seed. Truth: the exact Jaccard
similarity of the word 5-gram shingle sets of every pair (one sparse matrix product), a pair being
a duplicate at Jaccard >= 0.8. Both tools get the same documents, normalised once, and the same
word 5-gram shingles.

Speed (`ratio`, equal work): signatures per CPU second on the same documents, from normalised
text to finished signatures, shingling and hashing included, one thread each (benchmarks/measure.py:
one untimed warm-up each, then interleaved rounds, best round per side). Both compute 128
`affine32` permutations, datasketch 2's default scheme: gristmill's `scheme: datasketch` against
`datasketch.MinHash(num_perm=128, seed=1).update_batch` over the shingle strings. The shingle hash
differs (gristmill: vectorised tabulation hashing of words; datasketch: SHA-1 of each shingle
string, its default), each hashing every shingle once to 32 bits. Equal outputs are checked: given
gristmill's 32-bit shingle hashes (an identity `hashfunc`), datasketch computes the same
signature as gristmill for every document (`signatures_equal`).

gristmill's default scheme, one-permutation hashing with optimal densification, does less work
(one hash per shingle instead of 128): its speed-up is the separate `one_permutation_ratio`.

Quality: precision, recall and F1 of the pairs each reports, with and without verification by
exact Jaccard (>= 0.8) of the same shingles. gristmill: its dedup stage's defaults
(`one_permutation`, LSH shape weighted to recall, verified by default: `f1`; its raw LSH candidates:
`f1_unverified`). datasketch: `MinHashLSH(threshold=0.8).query` as returned (`reference_f1`) and
those pairs verified the same way (`reference_f1_verified`).

`--memory`: dedup of 200k short documents (`--documents N`) through the stage on a 2-worker
LocalCluster: docs/s and the peak resident memory of the client and of each worker (psutil);
`benchmarks/scale.py --dedup-docs N` runs the same.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import sparse

from benchmarks.measure import THREADS, interleaved, pin_threads
from benchmarks.sample_pages import sample_pages
from gristmill.pipeline import io
from gristmill.pipeline.dedup import minhash as mh
from gristmill.pipeline.dedup.stage import DedupConfig

THRESHOLD = 0.8
NUM_PERM = 128
NGRAM = 5
EDIT_RATES = [0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12]


def page_texts(min_words: int = 100) -> list[str]:
    return [p.text for p in sample_pages(main_content=False) if len(p.text.split()) >= min_words]


def edit(words: list[str], rate: float, rng: random.Random) -> list[str]:
    """Apply `rate * len(words)` random word edits: a third each substitutions, deletions, insertions."""
    words = list(words)
    for _ in range(int(round(rate * len(words)))):
        op = rng.randrange(3)
        i = rng.randrange(len(words))
        if op == 0:
            words[i] = f"w{rng.randrange(10**6)}"
        elif op == 1 and len(words) > 1:
            del words[i]
        else:
            words.insert(i, f"w{rng.randrange(10**6)}")
    return words


def labelled_set(texts: list[str], copies: int, seed: int = 0) -> list[str]:
    """Every page plus `copies` edited copies of it, at edit rates drawn from EDIT_RATES."""
    rng = random.Random(seed)
    docs = []
    for text in texts:
        docs.append(text)
        words = text.split()
        for _ in range(copies):
            docs.append(" ".join(edit(words, rng.choice(EDIT_RATES), rng)))
    rng.shuffle(docs)
    return docs


def true_pairs(hashes: np.ndarray, offsets: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    """Exact Jaccard of all pairs via a sparse document x shingle matrix: pairs at >= threshold."""
    n = len(offsets) - 1
    doc = np.repeat(np.arange(n), np.diff(offsets))
    pairs_unique = np.unique(np.stack([doc, hashes.view(np.int64)], axis=1), axis=0)
    _, column = np.unique(pairs_unique[:, 1], return_inverse=True)
    matrix = sparse.csr_matrix((np.ones(len(column), np.int32), (pairs_unique[:, 0], column)), shape=(n, column.max() + 1))
    sizes = np.asarray(matrix.sum(axis=1)).ravel()
    common = sparse.triu(matrix @ matrix.T, k=1).tocoo()
    jaccard = common.data / (sizes[common.row] + sizes[common.col] - common.data)
    keep = jaccard >= threshold
    return set(zip(common.row[keep].tolist(), common.col[keep].tolist()))


def scores(found: set, truth: set) -> dict[str, float]:
    hits = len(found & truth)
    precision = hits / len(found) if found else 1.0
    recall = hits / len(truth) if truth else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4)}


def shingle_strings(text: str) -> list[bytes]:
    """What a datasketch user writes: the word 5-grams of a normalised text, as bytes."""
    words = text.split()
    return [" ".join(words[i : i + NGRAM]).encode() for i in range(max(len(words) - NGRAM + 1, 1))] if words else []


def datasketch_signatures(normalised: list[str]) -> list:
    """datasketch's own path: shingle strings, SHA-1 hashed, 128 `affine32` permutations."""
    from datasketch import MinHash

    signatures = []
    for text in normalised:
        m = MinHash(num_perm=NUM_PERM, seed=1)
        m.update_batch(shingle_strings(text))
        signatures.append(m)
    return signatures


def signatures_match_datasketch(hashes: np.ndarray, offsets: np.ndarray, ours: np.ndarray) -> bool:
    """Does datasketch, given gristmill's 32-bit shingle hashes, compute gristmill's signatures?"""
    from datasketch import MinHash

    folded = mh.fold32(hashes)
    for i in range(len(offsets) - 1):
        m = MinHash(num_perm=NUM_PERM, seed=1, hashfunc=int)
        m.update_batch(folded[offsets[i] : offsets[i + 1]].tolist())
        if offsets[i + 1] > offsets[i] and not np.array_equal(m.hashvalues.astype(np.uint32), ours[i]):
            return False
    return True


def verified(pairs: set, hashes: np.ndarray, offsets: np.ndarray) -> set[tuple[int, int]]:
    """The pairs whose exact Jaccard of shingles is at least THRESHOLD."""
    ordered = sorted(pairs)
    if not ordered:
        return set()
    a, b = np.array(ordered).T
    return {pair for pair, j in zip(ordered, mh.jaccard_pairs(hashes, offsets, a, b)) if j >= THRESHOLD}


def compare(quick: bool) -> dict:
    pin_threads()
    texts = page_texts()
    docs = labelled_set(texts, copies=3 if quick else 11)
    normalised = mh.normalise_texts(pa.array(docs), mh.Normalisation())
    texts_normalised = normalised.to_pylist()
    hashes, offsets = mh.shingle_hashes(normalised, "word", NGRAM)
    truth = true_pairs(hashes, offsets, THRESHOLD)
    print(f"{len(docs)} documents from {len(texts)} pages; {len(truth)} pairs at Jaccard >= {THRESHOLD}", file=sys.stderr)

    config = DedupConfig(type="dedup", num_perm=NUM_PERM, threshold=THRESHOLD, ngram=NGRAM)

    def gristmill(scheme: str):
        def sign() -> np.ndarray:
            h, o = mh.shingle_hashes(normalised, "word", NGRAM)
            return mh.signatures_for(h, o, scheme, NUM_PERM, config.seed)
        return sign

    timings = interleaved({
        "gristmill scheme datasketch": gristmill("datasketch"),
        "gristmill scheme one_permutation": gristmill("one_permutation"),
        "datasketch MinHash": lambda: datasketch_signatures(texts_normalised),
    })
    permutations_cpu = timings["gristmill scheme datasketch"].best_cpu_s
    one_permutation_cpu = timings["gristmill scheme one_permutation"].best_cpu_s
    reference_cpu = timings["datasketch MinHash"].best_cpu_s
    equal = signatures_match_datasketch(hashes, offsets, timings["gristmill scheme datasketch"].result)

    bands, rows = config.bands_rows()
    signed = np.flatnonzero(np.diff(offsets) > 0)
    signatures = timings["gristmill scheme one_permutation"].result
    candidates = {(int(signed[a]), int(signed[b])) for a, b in mh.candidate_pairs(mh.band_hashes(signatures[signed], bands, rows))}

    from datasketch import MinHashLSH

    minhashes = timings["datasketch MinHash"].result
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    for i, m in enumerate(minhashes):
        lsh.insert(i, m)
    reference = {(min(i, j), max(i, j)) for i, m in enumerate(minhashes) for j in lsh.query(m) if j != i}

    ours, ours_raw = scores(verified(candidates, hashes, offsets), truth), scores(candidates, truth)
    theirs, theirs_verified = scores(reference, truth), scores(verified(reference, hashes, offsets), truth)
    print(f"gristmill LSH {bands}x{rows} (stage defaults): {len(candidates)} candidates; unverified {ours_raw}; "
          f"verified {ours}", file=sys.stderr)
    print(f"datasketch LSH {lsh.b}x{lsh.r}: {len(reference)} candidates; unverified {theirs}; verified "
          f"{theirs_verified}", file=sys.stderr)
    print(f"signatures per CPU second on the same {len(docs)} documents: gristmill 128 permutations "
          f"{len(docs) / permutations_cpu:,.0f}, gristmill one-permutation {len(docs) / one_permutation_cpu:,.0f}, "
          f"datasketch 128 permutations {len(docs) / reference_cpu:,.0f}; datasketch given gristmill's shingle "
          f"hashes computes {'the same' if equal else 'DIFFERENT'} signatures", file=sys.stderr)
    return {
        "benchmark": "dedup",
        "documents": len(docs),
        "signatures_per_s": round(len(docs) / permutations_cpu, 1),
        "reference_signatures_per_s": round(len(docs) / reference_cpu, 1),
        "ratio": round(reference_cpu / permutations_cpu, 2),
        "signatures_equal": equal,
        "one_permutation_signatures_per_s": round(len(docs) / one_permutation_cpu, 1),
        "one_permutation_ratio": round(reference_cpu / one_permutation_cpu, 2),
        "f1": ours["f1"],
        "precision": ours["precision"],
        "recall": ours["recall"],
        "f1_unverified": ours_raw["f1"],
        "reference_f1": theirs["f1"],
        "reference_precision": theirs["precision"],
        "reference_recall": theirs["recall"],
        "reference_f1_verified": theirs_verified["f1"],
        "threads": THREADS,
        "target": 10,
        "f1_target": 0.97,
    }


def short_documents(n: int, folder: Path, parts: int, seed: int = 0) -> None:
    """`n` short documents in `parts` Parquet files: 2-5 random sentences of the sample pages each
    (about 30-100 words), a fifth of them exact or 2%-edited repeats of earlier documents."""
    rng = random.Random(seed)
    sentences = [s.strip() for t in page_texts() for s in t.replace("\n", " ").split(". ") if len(s.split()) >= 8]
    docs: list[str] = []
    for _ in range(n):
        if docs and rng.random() < 0.2:
            docs.append(" ".join(edit(rng.choice(docs).split(), rng.choice([0.0, 0.02]), rng)))
        else:
            docs.append(". ".join(rng.choice(sentences) for _ in range(rng.randrange(2, 6))))
    folder.mkdir(parents=True, exist_ok=True)
    per_part = (n + parts - 1) // parts
    for p in range(parts):
        chunk = docs[p * per_part : (p + 1) * per_part]
        ids = [io.document_id("bench", p * per_part + i) for i in range(len(chunk))]
        pq.write_table(pa.table({"id": ids, "url": [None] * len(chunk), "text": chunk}), folder / f"part-{p:03d}.parquet")


class PeakRSS:
    """Peak resident memory of some processes, sampled by a background thread every `interval` s."""

    def __init__(self, pids: dict[str, int], interval: float = 0.2):
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peaks = dict.fromkeys(pids, 0)
        self.interval, self.stopped = interval, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self.stopped.wait(self.interval):
            for name, process in self.processes.items():
                self.peaks[name] = max(self.peaks[name], process.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()


def memory(n: int, parts: int | None = None) -> dict:
    """Dedup `n` short documents through the stage on a 2-worker LocalCluster: docs/s and the peak
    resident memory of the client (this process, which also hosts the scheduler) and of each worker,
    sampled with psutil. The documents are written by a separate process first, so the client's
    figure is the stage's alone. Targets: client <= 1.5 GB, each worker <= 3 GB at 2,000,000."""
    import yaml
    from distributed import Client, LocalCluster

    from gristmill.pipeline.runner import run_workflow

    parts = parts or max(8, n // 40_000)  # 40,000 documents a part: per-task memory as at 2,000,000
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        maker = multiprocessing.get_context("spawn").Process(target=short_documents, args=(n, folder / "in", parts))
        maker.start()
        maker.join()
        if maker.exitcode != 0:
            raise RuntimeError(f"writing {n} documents failed (exit code {maker.exitcode})")
        workflow = folder / "memory.yaml"
        workflow.write_text(yaml.safe_dump({"name": "memory", "stages": {
            "dedup": {"type": "dedup", "input": str(folder / "in" / "*.parquet")}}}))
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                          memory_limit="4GB") as cluster, Client(cluster) as client:
            workers = {f"worker-{i}": pid for i, pid in enumerate(client.run(os.getpid).values())}
            with PeakRSS({"client": os.getpid(), **workers}) as rss:
                started = time.perf_counter()
                run_dir = run_workflow(workflow, runs_dir=folder / "runs", scheduler=cluster.scheduler_address)
                wall = time.perf_counter() - started
            stats = io.read_json(run_dir / "dedup" / io.STATS_FILE)
    gb = {name: round(peak / 2**30, 3) for name, peak in rss.peaks.items()}
    print(f"{n} documents in {parts} parts: {stats['counts']}, {wall:.1f}s, rounds {stats['components']['rounds']}, "
          f"timings {stats['timings_s']}, peak RSS {gb}", file=sys.stderr)
    return {"benchmark": "dedup_memory", "documents": n, "parts": parts, "removed": stats["counts"]["removed"],
            "rounds": stats["components"]["rounds"], "wall_s": round(wall, 1), "docs_per_s": round(n / wall, 1),
            "client_gb": gb["client"], "worker_gb": max(v for k, v in gb.items() if k != "client"),
            "client_target_gb": 1.5, "worker_target_gb": 3.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller set, under a minute")
    parser.add_argument("--memory", action="store_true", help="docs/s and peak client and worker memory for 200k short documents")
    parser.add_argument("--documents", type=int, default=200_000, help="documents for --memory")
    args = parser.parse_args()
    result = memory(args.documents) if args.memory else compare(args.quick)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
