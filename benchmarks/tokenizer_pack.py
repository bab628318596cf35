"""Tokenizer training and packing: gristmill against plain Hugging Face `tokenizers`, one process.

Data: the bundled sample site's pages as text, recombined into documents of random paragraphs
(fixed seed), written as Parquet parts.

- train_overhead: gristmill's training path (stream Parquet parts, hold out a split by id hash,
  train, save the folder) over `Tokenizer.train_from_iterator` on the same documents already in
  memory, same recipe (byte-level BPE). Target <= 1.15.
- pack_ratio: tokens/s of gristmill's pack (read parts, encode, EOS, write shards + meta.json) over
  `Tokenizer.encode_batch` on the same texts in memory. Target >= 2.5.

Last line: {"benchmark": "tokenize", "train_overhead": ..., "pack_ratio": ..., "ratio": ..., "target": 2.5}
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.sample_pages import sample_pages
from gristmill.tokenize import recipes
from gristmill.tokenize.corpus import Sample, iter_documents
from gristmill.tokenize.pack import pack, serial_map
from gristmill.tokenize.recipes import TokenizerSpec
from gristmill.tokenize.train import load_tokenizer, save_tokenizer, train_tokenizer


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


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small corpus, finishes in under a minute")
    args = parser.parse_args()
    n_docs, vocab, repeats = (3000, 4000, 3) if args.quick else (12000, 16000, 3)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        parts = build_corpus(tmp / "corpus", n_docs, docs_per_part=250)
        spec = TokenizerSpec(name="bpe", kind="bpe", vocab_size=vocab)
        sample = Sample("train", 0.05, 0)
        texts = [x for t in iter_documents(parts, sample) for x in t["text"].to_pylist()]
        n_bytes = sum(len(t.encode()) for t in texts)
        print(f"corpus: {n_docs} documents in {len(parts)} parts; training on {len(texts)} documents, "
              f"{n_bytes / 1e6:.1f} MB; vocab {vocab}", file=sys.stderr)

        def gristmill_train():
            save_tokenizer(train_tokenizer(spec, parts, sample), tmp / "bpe")

        def reference_train():
            tokenizer, trainer = recipes.build(spec)
            batches = (texts[i : i + 1024] for i in range(0, len(texts), 1024))
            tokenizer.train_from_iterator(batches, trainer=trainer, length=len(texts))
            tokenizer.save(str(tmp / "reference.json"))

        train_s, reference_train_s = [], []
        for _ in range(repeats):  # alternate so both see the same machine load
            reference_train_s.append(best_of(1, reference_train))
            train_s.append(best_of(1, gristmill_train))
        train_overhead = min(train_s) / min(reference_train_s)
        print(f"train: gristmill {min(train_s):.2f}s, tokenizers {min(reference_train_s):.2f}s "
              f"-> overhead {train_overhead:.3f}x", file=sys.stderr)

        all_texts = [x for p in parts for x in pq.read_table(p, columns=["text"])["text"].to_pylist()]
        tokenizer = load_tokenizer(tmp / "bpe")
        n_tokens = sum(len(e.ids) for e in tokenizer.encode_batch(all_texts))
        reference_s = best_of(repeats, lambda: tokenizer.encode_batch(all_texts))
        metas = []

        def gristmill_pack():
            out = tmp / f"pack-{len(metas)}"
            metas.append(pack(parts, out, tmp / "bpe", serial_map, val_fraction=0.01, shard_tokens=1_000_000))

        pack_s = best_of(repeats, gristmill_pack)
        packed = sum(metas[-1]["tokens"].values()) - n_docs  # minus one EOS per document
        assert packed == n_tokens, f"pack wrote {packed} tokens, encode_batch {n_tokens}"
        pack_tps, reference_tps = (n_tokens + n_docs) / pack_s, n_tokens / reference_s
        pack_ratio = pack_tps / reference_tps
        print(f"pack: gristmill {pack_tps:,.0f} tokens/s (engine {metas[-1]['engine']}), encode_batch "
              f"{reference_tps:,.0f} tokens/s -> {pack_ratio:.2f}x", file=sys.stderr)

    print(json.dumps({
        "benchmark": "tokenize",
        "train_overhead": round(train_overhead, 3),
        "pack_ratio": round(pack_ratio, 2),
        "ratio": round(pack_ratio, 2),
        "target": 2.5,
        "train_s": round(min(train_s), 3),
        "reference_train_s": round(min(reference_train_s), 3),
        "pack_tokens_per_s": round(pack_tps, 1),
        "reference_tokens_per_s": round(reference_tps, 1),
        "pack_engine": metas[-1]["engine"],
        "train_overhead_target": 1.15,
    }))


if __name__ == "__main__":
    main()
