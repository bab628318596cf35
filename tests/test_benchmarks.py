"""The benchmarks compare like with like: the checks behind their equal-work claims, on small data.

Timings are not asserted (speed targets are the benchmarks' own output); what is asserted is that
both sides get the same warm-up and rounds, and that the outputs each benchmark calls equal are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks import dedup, filters, scale, tokenizer_pack
from benchmarks.measure import interleaved
from gristmill.pipeline import io
from gristmill.pipeline.dedup import minhash as mh
from gristmill.pipeline.runner import run_workflow
from gristmill.tokenize.corpus import Sample
from gristmill.tokenize.pack import pack, serial_map
from gristmill.tokenize.recipes import TokenizerSpec
from gristmill.tokenize.train import load_tokenizer, save_tokenizer, train_tokenizer


def test_interleaved_warms_every_side_up_once_then_alternates_the_same_rounds():
    calls = []
    timings = interleaved(
        {"ours": lambda: calls.append("ours") or len(calls), "theirs": lambda: calls.append("theirs") or len(calls)},
        rounds=3,
        warm_up={"theirs": lambda: calls.append("theirs warm-up")},
    )
    assert calls == ["ours", "theirs warm-up"] + ["ours", "theirs"] * 3
    assert [len(t.cpu_s) for t in timings.values()] == [3, 3]
    assert [len(t.wall_s) for t in timings.values()] == [3, 3]
    assert timings["theirs"].result == len(calls)  # the last round's return value
    assert timings["ours"].best_cpu_s == min(timings["ours"].cpu_s)


def test_dedup_equal_work_scheme_gives_datasketch_signatures_and_the_check_catches_others():
    docs = dedup.labelled_set(dedup.page_texts()[:4], copies=1)
    hashes, offsets = mh.shingle_hashes(mh.normalise_texts(pa.array(docs), mh.Normalisation()), "word", dedup.NGRAM)
    permutations = mh.signatures_for(hashes, offsets, "datasketch", dedup.NUM_PERM, 1)
    one_permutation = mh.signatures_for(hashes, offsets, "one_permutation", dedup.NUM_PERM, 1)
    assert dedup.signatures_match_datasketch(hashes, offsets, permutations)
    assert not dedup.signatures_match_datasketch(hashes, offsets, one_permutation)


def test_dedup_verification_keeps_exactly_the_pairs_at_the_threshold():
    docs = dedup.labelled_set(dedup.page_texts()[:6], copies=2)
    hashes, offsets = mh.shingle_hashes(mh.normalise_texts(pa.array(docs), mh.Normalisation()), "word", dedup.NGRAM)
    truth = dedup.true_pairs(hashes, offsets, dedup.THRESHOLD)
    every_pair = {(a, b) for a in range(len(docs)) for b in range(a + 1, len(docs))}
    assert truth and dedup.verified(every_pair, hashes, offsets) == truth


def test_pack_benchmark_reads_back_per_document_the_ids_encode_batch_fast_gives(tmp_path: Path):
    parts = tokenizer_pack.build_corpus(tmp_path / "corpus", n_docs=120, docs_per_part=50)
    trained = train_tokenizer(TokenizerSpec(name="bpe", kind="bpe", vocab_size=400), parts, Sample("train", 0.05, 0))
    save_tokenizer(trained, tmp_path / "bpe")
    meta = pack(parts, tmp_path / "pack", tmp_path / "bpe", serial_map, val_fraction=0.2, threads=1)
    table = pa.concat_tables(pq.read_table(p, columns=["id", "text"]) for p in parts)
    tokenizer = load_tokenizer(tmp_path / "bpe")
    tokenizer.encode_special_tokens = True
    reference = tokenizer.encode_batch_fast(table["text"].to_pylist(), add_special_tokens=False)
    packed = tokenizer_pack.packed_documents(tmp_path / "pack", meta, table["id"].to_pylist())
    assert meta["documents"]["val"] > 0  # both streams are put back in place
    assert len(packed) == len(reference) == 120
    assert all(np.array_equal(ours, theirs.ids) for ours, theirs in zip(packed, reference))


def test_filters_benchmark_gives_both_tools_the_same_documents_and_compares_kept_texts():
    texts = filters.edited_copies(filters.page_texts(), 16)
    config = filters.FilterConfig(type="filter", **filters.SAME_RULES)
    ours = filters.gristmill_outcomes(filters.parts_of(texts, 6), config)
    theirs = filters.datatrove_outcomes(texts)
    assert set(ours) == set(theirs) == {str(i) for i in range(16)}
    kept_by_both = [i for i in ours if ours[i][0] is None and theirs[i][0] is None]
    removed_by_both = [i for i in ours if ours[i][0] is not None and theirs[i][0] is not None]
    assert kept_by_both and removed_by_both
    assert all(ours[i][1] == theirs[i][1] for i in kept_by_both)  # C4 rewrites the same lines


def test_scale_benchmark_crawl_is_one_warc_that_extract_splits_into_units_reading_every_page(tmp_path: Path):
    warc = scale.write_crawl(tmp_path / "crawl", pages=80)
    assert [p.name for p in (tmp_path / "crawl").iterdir()] == [warc.name]  # one file
    workflow = scale.workflow_file(tmp_path / "scale.yaml", warc, warc.stat().st_size // scale.UNITS_AT_1X)
    run_dir = run_workflow(workflow, runs_dir=tmp_path / "runs", scheduler="synchronous", until="extract")
    stats = io.read_json(run_dir / "extract" / io.STATS_FILE)
    assert stats["units"] == scale.UNITS_AT_1X
    assert (stats["counts"]["kept"], stats["counts"]["removed"], stats["counts"]["parts"]) == (80, 0, scale.UNITS_AT_1X)
    texts = pa.concat_tables(pq.read_table(p, columns=["text"]) for p in sorted((run_dir / "extract" / "kept").glob("*.parquet")))
    assert len(set(texts["text"].to_pylist())) == 80  # recombined pages, near-duplicates edited: no two alike
