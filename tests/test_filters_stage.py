"""The filter stage on real pages: through the runner, and fair to languages written without spaces."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from gristmill.pipeline import io
from gristmill.pipeline.filter.stage import FilterConfig, filter_documents
from gristmill.pipeline.runner import run_workflow
from tests.test_filters_parity import extracted_pages

CJK_PAGES = {
    "handbook/ja-JP/sect.who-is-this-book-for.html": "ja",
    "handbook/ja-JP/sect.selected-approach.html": "ja",
    "handbook/zh-CN/sect.who-is-this-book-for.html": "zh",
    "handbook/zh-CN/sect.selected-approach.html": "zh",
}


def page_table(pages: list[tuple[str, str]], langs: list[str]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {"id": name, "url": f"https://docs.example/{name}", "text": text, "source": "sample_site",
             "fetch_time": None, "lang": lang, "lang_score": 0.9}
            for (name, text), lang in zip(pages, langs)
        ],
        schema=io.DOCUMENT_SCHEMA,
    )


def test_japanese_and_chinese_pages_are_judged_in_their_language_not_removed_as_non_english():
    pages = [p for p in extracted_pages(english_only=False) if p[0] in CJK_PAGES]
    assert len(pages) == 4
    config = FilterConfig(type="filter", annotate_only=True)
    as_english = filter_documents(page_table(pages, ["en"] * 4), config).kept
    in_language = filter_documents(page_table(pages, [CJK_PAGES[name] for name, _ in pages]), config).kept
    # read as English, every page fails on word length; read in its language, they pass it
    assert as_english.column("filter_reason").to_pylist() == ["gopher_quality:mean_word_length"] * 4
    reasons = in_language.column("filter_reason").to_pylist()
    assert all(r is None or not r.startswith("gopher_quality:mean_word_length") for r in reasons)
    assert reasons.count(None) >= 3
    assert min(in_language.column("gopher_stop_words").to_pylist()) >= 2


def test_filter_stage_through_the_runner_writes_kept_removed_and_stats(tmp_path: Path):
    pages = extracted_pages(english_only=True)[:60]
    inputs = tmp_path / "pages"
    inputs.mkdir()
    for i in range(2):
        part = pages[i * 30 : (i + 1) * 30]
        pq.write_table(page_table(part, ["en"] * len(part)), inputs / f"part-{i}.parquet")
    workflow = tmp_path / "filters.yaml"
    workflow.write_text(yaml.safe_dump({
        "name": "filters",
        "dask": {"scheduler": "synchronous"},
        "stages": {"filter": {"type": "filter", "input": str(inputs / "*.parquet"),
                              "gopher_quality": {"min_doc_words": 40}}},
    }))
    run_dir = run_workflow(workflow, runs_dir=tmp_path / "runs")
    stage = run_dir / "filter"
    kept = pq.read_table(io.kept_parts(stage))
    removed = pq.read_table(io.removed_parts(stage))
    assert kept.num_rows + removed.num_rows == 60
    assert kept.num_rows > 0 and removed.num_rows > 0
    assert all(r.split(":")[0] in {"gopher_repetition", "gopher_quality", "c4", "fineweb"}
               for r in removed.column("reason").to_pylist())
    for table in (kept, removed):
        assert {"gopher_words", "gopher_dup_10_gram_char_frac", "c4_sentences", "fineweb_list_ratio"} <= set(
            table.column_names)
    by_id = {row["id"]: row["text"] for row in kept.select(["id", "text"]).to_pylist()}
    originals = dict(pages)
    assert all(len(by_id[i]) <= len(originals[i]) for i in by_id)  # C4 drops lines, never adds
    assert any(len(by_id[i]) < len(originals[i]) for i in by_id)

    stats = json.loads((stage / "stats.json").read_text())
    body = stats.get("stats", stats)
    assert sum(body["removed_by_rule"].values()) == removed.num_rows
    assert sum(body["histograms"]["gopher_words"]["counts"]) == 60
    assert body["thresholds"]["gopher_words"]["min"] == 40
    assert body["c4"]["docs_rewritten"] > 0 and body["c4"]["chars_removed"] > 0

    # annotate-only from the command line's --set: same signals, nothing removed
    run_dir = run_workflow(workflow, runs_dir=tmp_path / "runs", overrides=["filter.annotate_only=true"])
    annotated = pq.read_table(io.kept_parts(run_dir / "filter"))
    assert annotated.num_rows == 60 and io.count_rows(io.removed_parts(run_dir / "filter")) == 0
    flagged = sum(r is not None for r in annotated.column("filter_reason").to_pylist())
    assert flagged == removed.num_rows
