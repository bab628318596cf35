"""Work units and parts: big inputs split into units, small ones grouped, parts within their caps,
and none of it changing an id or a byte of what the stages keep and remove."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from gristmill.pipeline import io
from gristmill.pipeline.extract.archive import archive_spans
from gristmill.pipeline.extract.stage import ExtractConfig, extract_archive
from gristmill.pipeline.read import ReadConfig, file_spans, read_files
from gristmill.pipeline.runner import config_hash, run_workflow
from gristmill.pipeline.workflow import WorkflowError, load_workflow
from tests.test_extract import BASE_URL, SITE, write_site_warc

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted(SITE.rglob("*.html"))


@pytest.fixture(scope="module")
def big_warc(tmp_path_factory) -> Path:
    """A crawler's WARC (gzip member per record) of 300 pages and 6 empty ones."""
    pages = [(f"{BASE_URL}{p.relative_to(SITE)}?copy={n}", p.read_bytes()) for n in range(2) for p in PAGES[:150]]
    pages[::50] = [(f"{BASE_URL}empty/{i}", b"") for i in range(len(pages[::50]))]
    return write_site_warc(tmp_path_factory.mktemp("big") / "big.warc.gz", pages)


@pytest.fixture(scope="module")
def whole(big_warc: Path):
    config = ExtractConfig(type="extract")
    spans = archive_spans(big_warc, config.split_bytes)
    assert len(spans) == 1
    return extract_archive(spans, config)


def concat(tables: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(tables)


def test_split_warc_gives_the_same_documents_as_one_unit(big_warc, whole):
    size = big_warc.stat().st_size
    spans = archive_spans(big_warc, size // 6)
    assert len(spans) >= 5
    assert spans[0].start == 0 and spans[-1].end == size
    assert all(a.end == b.start for a, b in zip(spans, spans[1:]))
    config = ExtractConfig(type="extract")
    outputs = [extract_archive([span], config) for span in spans]
    for span, output in zip(spans, outputs):  # a unit reads only the records that start in its span
        offsets = output.kept.column("warc_offset").to_pylist() + output.removed.column("warc_offset").to_pylist()
        assert offsets and all(span.start <= offset < span.end for offset in offsets)
    assert concat([o.kept for o in outputs]).equals(whole.kept)
    assert concat([o.removed for o in outputs]).equals(whole.removed)
    assert whole.kept.num_rows == 294 and whole.removed.num_rows == 6


def test_damaged_member_in_a_split_file_loses_only_that_record(big_warc, whole, tmp_path):
    offsets = whole.kept.column("warc_offset").to_pylist()
    victim = len(offsets) // 2
    data = bytearray(big_warc.read_bytes())
    middle = offsets[victim] + 400
    data[middle : middle + 100] = bytes(b ^ 0xA5 for b in data[middle : middle + 100])
    damaged = tmp_path / "big.warc.gz"
    damaged.write_bytes(bytes(data))
    spans = archive_spans(damaged, damaged.stat().st_size // 6)
    assert len(spans) >= 5
    outputs = [extract_archive([span], ExtractConfig(type="extract")) for span in spans]
    kept = concat([o.kept for o in outputs])
    assert kept.column("id").to_pylist() == [i for n, i in enumerate(whole.kept.column("id").to_pylist()) if n != victim]
    removed = concat([o.removed for o in outputs]).to_pylist()
    assert len(removed) == whole.removed.num_rows + 1
    (row,) = [r for r in removed if r["reason"].startswith("extract:damaged")]
    assert row["reason"].startswith(f"extract:damaged ({damaged}: bytes {offsets[victim]:,}-")
    assert row["url"] == whole.kept.column("url")[victim].as_py()
    # Reading goes on at the next member: only the damaged one is skipped.
    assert sum(o.stats["skipped_bytes"] for o in outputs) == member_length(big_warc, offsets[victim])


def member_length(path: Path, offset: int) -> int:
    """Length of the gzip member at `offset` of an undamaged file."""
    data = path.read_bytes()[offset:]
    inflater = zlib.decompressobj(wbits=31)
    inflater.decompress(data)
    return len(data) - len(inflater.unused_data)


def test_one_gzip_stream_cannot_be_split_and_stats_say_why(big_warc, tmp_path):
    stream = tmp_path / "stream.warc.gz"
    stream.write_bytes(gzip.compress(gzip.decompress(big_warc.read_bytes())))
    (span,) = archive_spans(stream, 10_000)
    assert (span.start, span.end, span.layout) == (0, stream.stat().st_size, "stream")
    output = extract_archive([span], ExtractConfig(type="extract"))
    assert output.kept.num_rows == 294
    assert output.stats["unsplit_files"] == {str(stream): "gzipped as one stream: no record boundary to seek to, "
                                                          "so it is read whole"}


def jsonl_lines() -> list[bytes]:
    lines = [json.dumps({"text": f"документ {i}: " + "ünïcödé ✓ " * (i % 7), "url": f"https://x/{i}"},
                        ensure_ascii=i % 2 == 0).encode() for i in range(120)]
    lines[17] = b'{"text": "unterminated'
    lines[40] = b""
    lines[41] = b"[1, 2, 3]"
    return lines


@pytest.mark.parametrize("split_bytes", [1, 7, 100, 999, 4_000, 10**9])
def test_jsonl_split_at_any_byte_loses_and_duplicates_no_line(tmp_path, split_bytes):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b"\n".join(jsonl_lines()) + b"\n")
    config = ReadConfig(type="read")
    (single,) = file_spans(path, "docs.jsonl", "jsonl", 10**9)
    expected = read_files([single], config)
    spans = file_spans(path, "docs.jsonl", "jsonl", split_bytes)
    assert sum(span.size for span in spans) == path.stat().st_size
    outputs = [read_files([span], config) for span in spans]
    assert concat([o.kept for o in outputs]).equals(expected.kept)
    assert concat([o.removed for o in outputs]).equals(expected.removed)
    assert expected.kept.num_rows == 117 and expected.removed.num_rows == 2
    ids = expected.kept.column("id").to_pylist() + expected.removed.column("id").to_pylist()
    assert len(set(ids)) == len(ids)


def test_parquet_is_split_into_row_group_units(tmp_path):
    rows = [{"text": f"row {i:03d} " + "words " * 20, "url": f"https://x/{i}"} for i in range(95)]
    rows[33]["text"] = None
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=10)
    metadata = pq.ParquetFile(path).metadata
    group_bytes = max(metadata.row_group(g).total_byte_size for g in range(metadata.num_row_groups))
    config = ReadConfig(type="read")
    (single,) = file_spans(path, "docs.parquet", "parquet", 10**9)
    expected = read_files([single], config)
    assert expected.removed.column("reason").to_pylist() == ["read:no_text (row 33: 'text' is null)"]
    for split_bytes, units in ((1, 10), (3 * group_bytes, 4)):
        spans = file_spans(path, "docs.parquet", "parquet", split_bytes)
        assert len(spans) == units and [s.start for s in spans] == sorted({s.start for s in spans})
        outputs = [read_files([span], config) for span in spans]
        assert concat([o.kept for o in outputs]).equals(expected.kept)
        assert concat([o.removed for o in outputs]).equals(expected.removed)
    assert expected.kept.column("id")[0].as_py() == io.document_id("docs.parquet", 0)


def test_split_table_respects_both_caps():
    table = pa.table({"id": [str(i) for i in range(100)], "text": ["x" * (i * 10) for i in range(100)]})
    for max_rows, max_bytes in ((7, None), (None, 5_000), (30, 2_000), (None, 1)):
        pieces = io.split_table(table, max_rows, max_bytes)
        assert pa.concat_tables(pieces).equals(table)
        assert all(p.num_rows <= (max_rows or 100) for p in pieces)
        assert all(p.nbytes <= (max_bytes or 10**9) or p.num_rows == 1 for p in pieces)
    (empty,) = io.split_table(table.slice(0, 0), 5, 100)
    assert empty.num_rows == 0


def write_corpus(folder: Path, big_warc: Path) -> None:
    """JSONL, Parquet (several row groups), plain text and a WARC: every kind of input there is."""
    folder.mkdir()
    texts = [p.read_text() for p in PAGES[150:230]]
    (folder / "pages.jsonl").write_text(
        "".join(json.dumps({"text": t, "url": f"https://docs.example/{i}"}) + "\n" for i, t in enumerate(texts[:40]))
        + '{"broken\n')
    pq.write_table(pa.Table.from_pylist([{"text": t} for t in texts[40:70]]), folder / "pages.parquet",
                   row_group_size=4)
    for i, text in enumerate(texts[70:]):
        (folder / f"note-{i}.txt").write_text(text)
    (folder / "crawl.warc.gz").write_bytes(big_warc.read_bytes())


def corpus_stages(split_read: int | None = None, split_extract: int | None = None, **caps) -> dict:
    read = {"type": "read", "input": ["corpus/pages.jsonl", "corpus/pages.parquet", "corpus/*.txt"]}
    extract = {"type": "extract", "input": "corpus/crawl.warc.gz"}
    if split_read:
        read["split_bytes"] = split_read
    if split_extract:
        extract["split_bytes"] = split_extract
    return {
        "docs": read,
        "web": extract,
        "filter": {"type": "filter", "input": ["docs", "web"], **caps},
    }


def write_workflow(path: Path, stages: dict, **top) -> Path:
    path.write_text(yaml.safe_dump({"name": "parts", **top, "stages": stages}, sort_keys=False))
    return path


def sorted_output(stage_dir: Path) -> dict[str, pa.Table]:
    """Every part of kept/ and removed/ as one table each, sorted by id (documents from read and
    extract have different columns: the missing ones are null)."""
    return {sub: pa.concat_tables([pq.read_table(p) for p in io.list_parts(stage_dir / sub)],
                                  promote_options="default").sort_by("id")
            for sub in (io.KEPT, io.REMOVED)}


def test_ids_and_outputs_do_not_depend_on_split_bytes_or_workers(tmp_path, big_warc):
    write_corpus(tmp_path / "corpus", big_warc)
    one = write_workflow(tmp_path / "one.yaml", corpus_stages(), dask={"scheduler": "synchronous"})
    many = write_workflow(tmp_path / "many.yaml", corpus_stages(split_read=20_000, split_extract=150_000),
                          dask={"n_workers": 2}, parts={"max_part_rows": 9, "max_part_bytes": "60KiB"})
    runs = [run_workflow(w, runs_dir=tmp_path / w.stem) for w in (one, many)]
    done = [{s: json.loads((r / s / io.DONE_FILE).read_text()) for s in ("docs", "web", "filter")}
            for r in runs]
    assert done[0]["docs"]["counts"]["parts"] == 1 and done[0]["web"]["counts"]["parts"] == 1
    assert done[1]["docs"]["counts"]["parts"] > 5 and done[1]["web"]["counts"]["parts"] > 5
    stats = json.loads((runs[1] / "web" / io.STATS_FILE).read_text())
    assert stats["units"] > 3 and stats["files"] == 1
    for stage in ("docs", "web", "filter"):
        assert done[0][stage]["counts"]["in"] == done[1][stage]["counts"]["in"]
        first, second = (sorted_output(r / stage) for r in runs)
        for sub in (io.KEPT, io.REMOVED):
            assert first[sub].equals(second[sub]), f"{stage}/{sub} differs"


def test_parts_never_exceed_the_caps_and_downstream_follows_the_parts(tmp_path, big_warc):
    write_corpus(tmp_path / "corpus", big_warc)
    stages = corpus_stages(max_part_rows=4)
    stages["web"]["max_part_bytes"] = 50_000
    workflow = write_workflow(tmp_path / "caps.yaml", stages, dask={"scheduler": "synchronous"},
                              parts={"max_part_rows": 10})
    run_dir = run_workflow(workflow, runs_dir=tmp_path / "runs")
    caps = {"docs": (10, 256 * 2**20), "web": (10, 50_000), "filter": (4, 256 * 2**20)}
    for stage, (max_rows, max_bytes) in caps.items():
        parts = io.list_parts(run_dir / stage / io.KEPT) + io.list_parts(run_dir / stage / io.REMOVED)
        for part in parts:
            table = pq.read_table(part)
            assert table.num_rows <= max_rows and (table.nbytes <= max_bytes or table.num_rows == 1), part
    web = json.loads((run_dir / "web" / io.DONE_FILE).read_text())["counts"]
    assert web["parts"] >= web["kept"] / 10 and web["parts"] > 1
    filter_stats = json.loads((run_dir / "filter" / io.STATS_FILE).read_text())
    upstream_parts = sum(json.loads((run_dir / s / io.DONE_FILE).read_text())["counts"]["parts"]
                         for s in ("docs", "web"))
    assert filter_stats["units"] == upstream_parts  # one task per upstream part, not per input file


def test_workflow_part_caps_fill_stage_configs_and_count_in_their_hash(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    stages = {"docs": {"type": "read", "input": "a.jsonl"},
              "own": {"type": "read", "input": "a.jsonl", "max_part_rows": 5, "max_part_bytes": "1MiB"}}
    workflow = load_workflow(write_workflow(tmp_path / "w.yaml", stages, parts={"max_part_bytes": "2MB"}))
    assert (workflow.stages["docs"].max_part_rows, workflow.stages["docs"].max_part_bytes) == (100_000, 2_000_000)
    assert (workflow.stages["own"].max_part_rows, workflow.stages["own"].max_part_bytes) == (5, 2**20)
    other = load_workflow(write_workflow(tmp_path / "w.yaml", stages, parts={"max_part_bytes": "3MB"}))
    assert config_hash(workflow, "docs") != config_hash(other, "docs")
    assert config_hash(workflow, "own") == config_hash(other, "own")
    overridden = load_workflow(tmp_path / "w.yaml", ["parts.max_part_rows=7"])
    assert overridden.stages["docs"].max_part_rows == 7


@pytest.mark.parametrize(
    "top, stages, message",
    [
        ({"parts": {"max_rows": 5}}, {}, r"key 'parts\.max_rows': unknown key"),
        ({"parts": {"max_part_rows": 0}}, {}, r"key 'parts\.max_part_rows': Input should be greater than or equal to 1"),
        ({}, {"split_bytes": "lots"}, r"stage 'docs', key 'split_bytes'"),
        ({}, {"max_doc_chars": -1}, r"stage 'docs', key 'max_doc_chars'"),
    ],
)
def test_bad_part_and_split_settings_name_the_key(tmp_path, top, stages, message):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    path = write_workflow(tmp_path / "bad.yaml", {"docs": {"type": "read", "input": "a.jsonl", **stages}}, **top)
    with pytest.raises(WorkflowError, match=message):
        load_workflow(path)


def test_a_stage_that_writes_no_parts_refuses_part_caps(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    stages = {"docs": {"type": "read", "input": "a.jsonl"},
              "tok": {"type": "tokenizers", "input": "docs", "tokenizers": [{"name": "bpe", "kind": "bpe"}],
                      "max_part_rows": 5}}
    with pytest.raises(WorkflowError, match=r"stage 'tok', key 'max_part_rows': stage type 'tokenizers' writes no"):
        load_workflow(write_workflow(tmp_path / "tok.yaml", stages))


def test_resume_after_sigkill_with_split_inputs_gives_identical_parts(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [json.dumps({"text": p.read_text(), "url": f"https://docs.example/{i}"}) for i, p in enumerate(PAGES[:60])]
    (corpus / "pages.jsonl").write_text("\n".join(lines) + "\n")
    stages = {"pages": {"type": "read", "input": "corpus/pages.jsonl", "split_bytes": 100_000, "max_part_rows": 7},
              "copy": {"type": "slow_copy", "input": "pages", "drop_shorter_than": 20_000, "seconds_per_part": 0.4,
                       "max_part_rows": 3}}
    workflow = write_workflow(tmp_path / "resume.yaml", stages, imports=["tests.runner_stages"],
                              dask={"scheduler": "synchronous"})
    command = [sys.executable, "-m", "gristmill.cli", "run", str(workflow), "--runs-dir", str(tmp_path / "killed")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state_dir = tmp_path / "killed" / "parts" / "copy" / io.PARTS_STATE_DIR
    deadline = time.monotonic() + 60
    while not (state_dir.exists() and len(list(state_dir.glob("*.json"))) >= 2):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the run never reached the middle of the copy stage"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed = tmp_path / "killed" / "parts"
    assert not (killed / "copy" / io.DONE_FILE).exists()
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
    clean = run_workflow(workflow, runs_dir=tmp_path / "clean")

    pages = json.loads((clean / "pages" / io.STATS_FILE).read_text())
    assert pages["units"] > 2 and pages["counts"]["parts"] > pages["units"]
    assert json.loads((killed / "copy" / io.STATS_FILE).read_text())["resumed"] is True
    for stage in ("pages", "copy"):
        parts = {f"{sub}/{p.name}": p.read_bytes() for sub in (io.KEPT, io.REMOVED)
                 for p in io.list_parts(clean / stage / sub)}
        assert len(parts) > 4
        assert {f"{sub}/{p.name}": p.read_bytes() for sub in (io.KEPT, io.REMOVED)
                for p in io.list_parts(killed / stage / sub)} == parts


def test_arc_gzipped_record_by_record_is_split_like_warc(tmp_path):
    desc = b"1 0 InternetArchive\nURL IP-address Archive-date Content-type Archive-length\n"
    records = [b"filedesc://big.arc 0.0.0.0 20240101000000 text/plain %d\n" % len(desc) + desc + b"\n"]
    for i, page in enumerate(PAGES[:40]):
        block = b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + page.read_bytes()
        records.append(b"%s?n=%d 127.0.0.1 20240102030405 text/html %d\n" % (BASE_URL.encode(), i, len(block))
                       + block + b"\n")
    path = tmp_path / "big.arc.gz"
    path.write_bytes(b"".join(gzip.compress(record) for record in records))
    config = ExtractConfig(type="extract")
    (single,) = archive_spans(path, config.split_bytes)
    whole = extract_archive([single], config)
    assert single.layout == "arc_members" and whole.kept.num_rows == 40
    spans = archive_spans(path, path.stat().st_size // 4)
    assert len(spans) >= 3 and all(span.layout == "arc_members" for span in spans)
    outputs = [extract_archive([span], config) for span in spans]
    assert all(o.kept.num_rows for o in outputs)
    assert concat([o.kept for o in outputs]).equals(whole.kept)
