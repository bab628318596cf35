"""Tokenizer training and packing: gristmill against plain Hugging Face `tokenizers`, one process.

Data: the bundled sample site's pages as text, recombined into documents of random paragraphs
(fixed seed), written as Parquet parts. Both sides get the same documents, one thread each, one
untimed warm-up each and the same interleaved rounds (benchmarks/measure.py; figures are the best
round's CPU seconds).

- train_overhead: gristmill's training path (stream Parquet parts, hold out a split by id hash,
  train, save the folder) over `Tokenizer.train_from_iterator` on the same training documents
  already in memory, same recipe (byte-level BPE). gristmill does more here (reading, splitting,
  saving): the target allows for it. The two vocabularies are compared (`train_vocab_equal`).
  Target <= 1.15.
- pack (`ratio`): gristmill's pack (read parts, encode, EOS, write shards + meta.json; one encode
  thread, engine chosen by `pack`, tiktoken when it gives the same ids) over
  `Tokenizer.encode_batch_fast` on the same texts in memory, with special-token text encoded as
  text and no added special tokens, as pack encodes. gristmill again does more (I/O, shards).
  Correctness: the shards are read back and split at EOS, and every document's ids must equal the
  reference's ids for it (`ids_equal`). Target >= 2.5.

Last line: {"benchmark": "tokenize", "train_overhead": ..., "ratio": ..., "target": 2.5, ...}
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.measure import THREADS, interleaved, pin_threads
from benchmarks.sample_pages import sample_pages
from gristmill.tokenize import recipes, shards
from gristmill.tokenize.corpus import Sample, in_split, iter_documents
from gristmill.tokenize.pack import pack, serial_map
from gristmill.tokenize.recipes import TokenizerSpec
from gristmill.tokenize.train import load_tokenizer, save_tokenizer, train_tokenizer

VAL_FRACTION = 0.01
SEED = 0


def build_corpus(folder: Path, n_docs: int, docs_per_part: int, seed: int = 0) -> list[Path]:
    """Documents of 5-40 random paragraphs from the sample site's pages, as Parquet parts."""
    paragraphs = [line for page in sample_pages() for line in page.text.split("\n") if len(line) > 40]
    rng = random.Random(seed)
    docs = [
        {"id": f"doc-{i}", "text": "\n".join(rng.choices(paragraphs, k=rng.randint(5, 40)))}
        for i in range(n_docs)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for start in range(0, n_docs, docs_per_part):
        parts.append(folder / f"part-{start // docs_per_part:05d}.parquet")
        pq.write_table(pa.Table.from_pylist(docs[start : start + docs_per_part]), parts[-1])
    return parts


def packed_documents(folder: Path, meta: dict, ids: list[str]) -> list[np.ndarray]:
    """Each document's ids read back from the shards, in input order (train and val streams split
    at EOS, then put back in place by the same id hash pack used). `ids`: the documents with text
    (pack skips empty ones; the benchmark's documents all have text)."""
    streams = {}
    for split in ("train", "val"):
        files = [folder / s["file"] for s in meta["shards"] if s["split"] == split]
        tokens = np.concatenate([np.asarray(shards.open_shard(f)) for f in files] or [np.zeros(0, np.uint32)])
        ends = np.flatnonzero(tokens == meta["eos_id"])
        streams[split] = iter(np.split(tokens, ends + 1)[:-1])
    is_val = in_split(ids, meta["val_fraction"], meta["seed"])
    return [next(streams["val" if v else "train"])[:-1] for v in is_val]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small corpus, finishes in under a minute")
    args = parser.parse_args()
    pin_threads()
    n_docs, vocab = (2000, 4000) if args.quick else (12000, 16000)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        parts = build_corpus(tmp / "corpus", n_docs, docs_per_part=250)
        spec = TokenizerSpec(name="bpe", kind="bpe", vocab_size=vocab)
        sample = Sample("train", 0.05, 0)
        texts = [x for t in iter_documents(parts, sample) for x in t["text"].to_pylist()]
        n_bytes = sum(len(t.encode()) for t in texts)
        print(f"corpus: {n_docs} documents in {len(parts)} parts; training on {len(texts)} documents, "
              f"{n_bytes / 1e6:.1f} MB; vocab {vocab}; {THREADS} thread(s) each", file=sys.stderr)

        def gristmill_train():
            save_tokenizer(train_tokenizer(spec, parts, sample), tmp / "bpe")

        def reference_train():
            tokenizer, trainer = recipes.build(spec)
            batches = (texts[i : i + 1024] for i in range(0, len(texts), 1024))
            tokenizer.train_from_iterator(batches, trainer=trainer, length=len(texts))
            tokenizer.save(str(tmp / "reference.json"))
            return tokenizer

        train = interleaved({"gristmill train": gristmill_train, "tokenizers train_from_iterator": reference_train})
        train_s, reference_train_s = train["gristmill train"].best_cpu_s, train["tokenizers train_from_iterator"].best_cpu_s
        train_overhead = train_s / reference_train_s
        vocab_equal = load_tokenizer(tmp / "bpe").get_vocab() == train["tokenizers train_from_iterator"].result.get_vocab()
        print(f"train: gristmill {train_s:.2f} CPU s, tokenizers {reference_train_s:.2f} CPU s -> overhead "
              f"{train_overhead:.3f}x; vocabularies {'equal' if vocab_equal else 'DIFFER'}", file=sys.stderr)

        table = pa.concat_tables(pq.read_table(p, columns=["id", "text"]) for p in parts)
        all_texts, all_ids = table["text"].to_pylist(), table["id"].to_pylist()
        tokenizer = load_tokenizer(tmp / "bpe")
        tokenizer.encode_special_tokens = True  # as pack: special-token text in a page is text

        def reference_encode():
            return [e.ids for e in tokenizer.encode_batch_fast(all_texts, add_special_tokens=False)]

        packs = []

        def gristmill_pack():
            out = tmp / f"pack-{len(packs)}"
            packs.append(out)
            return pack(parts, out, tmp / "bpe", serial_map, val_fraction=VAL_FRACTION, seed=SEED,
                        shard_tokens=1_000_000, threads=THREADS)

        timings = interleaved({"gristmill pack": gristmill_pack, "tokenizers encode_batch_fast": reference_encode})
        meta, reference_ids = timings["gristmill pack"].result, timings["tokenizers encode_batch_fast"].result
        ours_ids = packed_documents(packs[-1], meta, all_ids)
        differing = sum(not np.array_equal(a, b) for a, b in zip(ours_ids, reference_ids))
        n_tokens = sum(map(len, reference_ids))
        pack_s, reference_s = timings["gristmill pack"].best_cpu_s, timings["tokenizers encode_batch_fast"].best_cpu_s
        pack_ratio = reference_s / pack_s
        print(f"pack: gristmill {n_tokens / pack_s:,.0f} tokens/s (engine {meta['engine']}), encode_batch_fast "
              f"{n_tokens / reference_s:,.0f} tokens/s -> {pack_ratio:.2f}x; {len(all_ids) - differing} of "
              f"{len(all_ids)} documents with identical ids; pack's time also covers reading Parquet, the "
              "train/val split and writing shards, the reference's does not", file=sys.stderr)

    print(json.dumps({
        "benchmark": "tokenize",
        "train_overhead": round(train_overhead, 3),
        "train_overhead_target": 1.15,
        "train_vocab_equal": vocab_equal,
        "train_s": round(train_s, 3),
        "reference_train_s": round(reference_train_s, 3),
        "pack_tokens_per_s": round(n_tokens / pack_s, 1),
        "reference_tokens_per_s": round(n_tokens / reference_s, 1),
        "pack_engine": meta["engine"],
        "ids_equal": differing == 0,
        "documents_with_different_ids": differing,
        "ratio": round(pack_ratio, 2),
        "target": 2.5,
        "threads": THREADS,
        "extra_work_by_gristmill": "train: Parquet reading, split, saving; pack: Parquet reading, split, shard writing",
    }))


if __name__ == "__main__":
    main()
