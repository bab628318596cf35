"""Extract & language: which languages, how long the texts are, why records were dropped, and
what one page looked like before and after extraction."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from gristmill.dashboards.charts import binned_bar, counts_bar
from gristmill.dashboards.run_data import Run, StageView, read_columns, sample_rows
from gristmill.dashboards.stage_gate import metric, ready_stage

VIEWER_CHARS = 20_000  # characters of HTML and text shown in the page viewer
SAMPLE_PAGES = 25


def source_html(row: dict) -> str:
    """The raw page behind a document: its WARC record when the row points at one, else the
    source file itself (documents read from files)."""
    if row.get("warc_file") and row.get("warc_offset") is not None:
        from gristmill.pipeline.extract.stage import read_record_html

        return read_record_html(row["warc_file"], int(row["warc_offset"]))
    source = row.get("source")
    if source and Path(source).is_file():
        return Path(source).read_text(errors="replace")
    raise ValueError(f"document {row.get('id')}: no WARC record or source file to read the page from")


def render(run: Run) -> None:
    stage = ready_stage(run, "extract", key="extract-stage")
    if stage is None:
        return
    stats = stage.stats()
    counts = stats.get("counts") or stage.status.counts
    languages = stats.get("languages")
    if not languages:
        langs = read_columns(stage.parts(), ["lang"]).column("lang").to_pylist()
        languages = {str(lang): langs.count(lang) for lang in set(langs)}
    cols = st.columns(5)
    metric(cols[0], "records", counts.get("in"))
    metric(cols[1], "documents kept", counts.get("kept"))
    metric(cols[2], "removed", counts.get("removed"))
    metric(cols[3], "languages", len(languages))
    metric(cols[4], "payload bytes", stats.get("payload_bytes"))

    left, right = st.columns(2)
    with left:
        st.subheader("Languages")
        if languages:
            st.plotly_chart(counts_bar(languages, "language"), width="stretch")
        else:
            st.info("No kept document has a language.")
    with right:
        st.subheader("Text length")
        hist = stats.get("text_chars")
        if hist and hist.get("edges") and hist.get("counts"):
            st.plotly_chart(binned_bar(hist["edges"], hist["counts"], "characters of text"), width="stretch")
        else:
            st.info("This stage's stats have no text length histogram.")
    reasons = stats.get("removed_by_reason") or {}
    if reasons:
        st.subheader("Why records were removed")
        st.plotly_chart(counts_bar(reasons, "reason", horizontal=True), width="stretch")
    page_viewer(stage)


def page_viewer(stage: StageView) -> None:
    """A sampled document: the source HTML beside the extracted text."""
    st.subheader("Page viewer")
    parts = stage.parts()
    if not parts:
        st.info("No kept documents to show.")
        return
    seed = st.session_state.setdefault("extract-seed", 0)
    if st.button("Other pages", key="extract-resample"):
        st.session_state["extract-seed"] = seed = seed + 1
    columns = ["id", "url", "title", "lang", "lang_score", "source", "warc_file", "warc_offset", "text"]
    sample = sample_rows(parts, columns, k=SAMPLE_PAGES, seed=seed).to_pylist()
    if not sample:
        st.info("No kept documents to show.")
        return
    labels = [f"{row['url'] or row['id']} ({row['lang']})" for row in sample]
    index = st.selectbox("document", range(len(sample)), format_func=lambda i: labels[i], key="extract-doc")
    row = sample[index]
    st.caption(f"id `{row['id']}` · language {row['lang']} ({(row['lang_score'] or 0):.2f}) · "
               f"{len(row['text'] or ''):,} characters of text")
    left, right = st.columns(2)
    with left:
        st.markdown("**Source HTML**")
        try:
            html = source_html(row)
        except (OSError, ValueError) as error:
            st.warning(f"Cannot read the source page: {error}")
        else:
            st.code(html[:VIEWER_CHARS], language="html", wrap_lines=True, height=500)
    with right:
        st.markdown("**Extracted text**")
        st.code((row["text"] or "")[:VIEWER_CHARS], language="text", wrap_lines=True, height=500)
