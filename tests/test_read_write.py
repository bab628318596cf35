"""The `read` and `write` stages: files in, documents out, and back to files."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from gristmill import DATA_DIR
from gristmill.pipeline import io
from gristmill.pipeline.runner import StageError, run_workflow

PAGES = sorted((DATA_DIR / "sample_site" / "handbook").rglob("*.html"))[:6]


def workflow(tmp_path, stages: dict):
    path = tmp_path / "rw.yaml"
    path.write_text(yaml.safe_dump({"name": "rw", "dask": {"scheduler": "synchronous"}, "stages": stages}))
    return path


def test_language_labels_in_jsonl_and_parquet_survive_reading(tmp_path):
    rows = [{"text": p.read_text(), "lang": p.parent.name[:2], "lang_score": 0.9, "id": f"doc-{i}"}
            for i, p in enumerate(PAGES)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    pq.write_table(pa.Table.from_pylist(rows[3:]), tmp_path / "b.parquet")
    run_dir = run_workflow(workflow(tmp_path, {"docs": {"type": "read", "input": ["a.jsonl", "b.parquet"],
                                                         "id_key": "id"}}), runs_dir=tmp_path / "runs")
    kept = pq.read_table(run_dir / "docs" / io.KEPT).to_pylist()
    assert [(d["id"], d["lang"], d["lang_score"]) for d in kept] == [
        (r["id"], r["lang"], 0.9) for r in rows
    ]
    assert {d["source"] for d in kept} == {"a.jsonl", "b.parquet"}


def test_a_parquet_file_without_the_text_column_names_the_file_and_the_key(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(StageError, match=r"c\.parquet: no column 'text' \(columns: body\); set `text_key`"):
        run_workflow(workflow(tmp_path, {"docs": {"type": "read", "input": "c.parquet"}}), runs_dir=tmp_path / "runs")


def test_write_exports_every_kept_document_as_gzipped_jsonl(tmp_path):
    for page in PAGES:
        (tmp_path / f"{page.parent.name}-{page.stem}.txt").write_text(page.read_text())
    stages = {"docs": {"type": "read", "input": "*.txt", "files_per_part": 4},
              "out": {"type": "write", "input": "docs", "gzip": True, "columns": ["id", "text"]}}
    run_dir = run_workflow(workflow(tmp_path, stages), runs_dir=tmp_path / "runs")
    files = sorted((run_dir / "out" / "export").glob("*.jsonl.gz"))
    assert [f.name for f in files] == ["part-00000.jsonl.gz", "part-00001.jsonl.gz"]
    exported = [json.loads(line) for f in files for line in gzip.decompress(f.read_bytes()).splitlines()]
    assert sorted(d["text"] for d in exported) == sorted(p.read_text() for p in PAGES)
    assert all(set(d) == {"id", "text"} for d in exported)


def test_a_50_mb_single_line_document_is_removed_without_being_held(tmp_path):
    import tracemalloc

    from gristmill.pipeline.read import ReadConfig, file_spans, read_files

    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as handle:
        handle.write(b'{"text": "a normal page"}\n{"text": "')
        for _ in range(50):
            handle.write(b"fifty megabytes of one line " * 37_450)
        handle.write(b'"}\n{"text": "the page after it"}\n')
    config = ReadConfig(type="read")
    tracemalloc.start()
    output = read_files(file_spans(path, "huge.jsonl", "jsonl", config.split_bytes), config)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert output.kept.column("text").to_pylist() == ["a normal page", "the page after it"]
    (reason,) = output.removed.column("reason").to_pylist()
    length = path.stat().st_size - 26 - len('{"text": "the page after it"}\n')
    assert reason == f"read:too_long (line at byte 26: {length:,} bytes > 12 x max_doc_chars 1,000,000)"
    assert peak < 30 * 2**20  # the line is read in pieces of at most 12 x max_doc_chars, never whole


def test_documents_over_max_doc_chars_are_removed_rows_in_every_format(tmp_path):
    long_text, short_text = "long " * 400, "short enough"
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": long_text}) + "\n" + json.dumps({"text": short_text}) + "\n")
    pq.write_table(pa.table({"text": [short_text, long_text]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text(long_text)
    (tmp_path / "d.txt").write_text("x" * 5_000)  # over 4 bytes a character allows: not read whole
    stages = {"docs": {"type": "read", "input": ["a.jsonl", "b.parquet", "c.txt", "d.txt"], "max_doc_chars": 1_000}}
    run_dir = run_workflow(workflow(tmp_path, stages), runs_dir=tmp_path / "runs")
    kept = pq.read_table(run_dir / "docs" / io.KEPT)
    removed = pq.read_table(run_dir / "docs" / io.REMOVED).to_pylist()
    assert kept.column("text").to_pylist() == [short_text, short_text]
    assert [(r["source"], r["reason"]) for r in removed] == [
        ("a.jsonl", "read:too_long (line at byte 0: 2,000 characters > max_doc_chars 1,000)"),
        ("b.parquet", "read:too_long (row 1: 2,000 characters > max_doc_chars 1,000)"),
        ("c.txt", "read:too_long (2,000 characters > max_doc_chars 1,000)"),
        ("d.txt", "read:too_long (5,000 bytes > 4 x max_doc_chars 1,000)"),
    ]
    assert all(len(r["text"]) <= 10_000 for r in removed)
    stats = json.loads((run_dir / "docs" / io.STATS_FILE).read_text())
    assert stats["removed_by_reason"] == {"read:too_long": 4} and stats["files"] == 4
