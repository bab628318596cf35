"""PII: how much personal data of each type was found and replaced, and what the text looked like
before and after, with the replaced spans marked."""

from __future__ import annotations

import html

import streamlit as st

from gristmill.dashboards.charts import counts_bar
from gristmill.dashboards.run_data import Run, StageView, sample_rows
from gristmill.dashboards.stage_gate import metric, ready_stage

EXAMPLE_DOCS = 5
CONTEXT_CHARS = 80  # characters shown either side of a span in the document view
_BEFORE = '<mark style="background:#ffcdd2" title="{t}">{s}</mark>'
_AFTER = '<mark style="background:#c8e6c9" title="{t}">{s}</mark>'
_PANE = ('<div style="white-space: pre-wrap; font-family: monospace; font-size: 0.8rem; border: 1px solid #ddd; '
         'border-radius: 4px; padding: 0.5rem">{}</div>')


def highlight_spans(scrubbed: str, spans: list[dict]) -> tuple[str, str]:
    """(before, after) as HTML around each span, the found value and its replacement marked.

    `spans` are the `pii_spans` of a document: offsets into the text before replacement, in
    order, with `original` (null when the stage did not store originals: shown as `?`)."""
    before, after = [], []
    shift = 0  # offset in the scrubbed text minus offset in the original
    previous_end = 0  # in the scrubbed text
    for span in spans:
        start = span["start"] + shift
        end = start + len(span["replacement"])
        gap = scrubbed[previous_end:start]
        if len(gap) > 2 * CONTEXT_CHARS and previous_end:
            gap = gap[:CONTEXT_CHARS] + " … " + gap[-CONTEXT_CHARS:]
        elif not previous_end and len(gap) > CONTEXT_CHARS:
            gap = "… " + gap[-CONTEXT_CHARS:]
        gap = html.escape(gap)
        original = span.get("original")
        before += [gap, _BEFORE.format(t=html.escape(span["type"]), s=html.escape(original if original is not None else "?"))]
        after += [gap, _AFTER.format(t=html.escape(span["type"]), s=html.escape(span["replacement"]))]
        shift += len(span["replacement"]) - (span["end"] - span["start"])
        previous_end = end
    tail = scrubbed[previous_end:]
    tail = html.escape(tail[:CONTEXT_CHARS] + (" …" if len(tail) > CONTEXT_CHARS else ""))
    return "".join(before) + tail, "".join(after) + tail


def render(run: Run) -> None:
    stage = ready_stage(run, "pii", key="pii-stage")
    if stage is None:
        return
    stats = stage.stats()
    found = stats.get("found") or {}
    docs = stats.get("documents") or stage.status.counts.get("kept")
    with_pii = stats.get("documents_with_pii")
    cols = st.columns(4)
    metric(cols[0], "documents scanned", docs)
    metric(cols[1], "documents with PII", with_pii)
    metric(cols[2], "share with PII", with_pii / docs if docs and with_pii is not None else None, "{:.1%}")
    metric(cols[3], "spans replaced", sum(found.values()) if found else None)

    st.subheader("Found per type")
    if any(found.values()):
        left, right = st.columns(2)
        left.plotly_chart(counts_bar({k: v for k, v in found.items() if v}, "type", "spans"), width="stretch")
        by_doc = {k: v for k, v in (stats.get("documents_by_type") or {}).items() if v}
        if by_doc:
            right.plotly_chart(counts_bar(by_doc, "type", "documents"), width="stretch")
    else:
        st.success("No personal data was found.")
    policies = stats.get("policies")
    if policies:
        st.caption("policy per type: " + ", ".join(f"{k} → {v}" for k, v in policies.items()))
    documents_view(stage)


def documents_view(stage: StageView) -> None:
    """Random documents with at least one span, before and after, spans marked."""
    st.subheader("Before and after")
    seed = st.session_state.setdefault("pii-seed", 0)
    if st.button("Other documents", key="pii-resample"):
        st.session_state["pii-seed"] = seed = seed + 1
    rows = sample_rows(stage.parts(), ["id", "url", "text", "pii_spans"], k=EXAMPLE_DOCS, seed=seed,
                       nonempty="pii_spans").to_pylist()
    if not rows:
        st.info("No kept document has a replaced span.")
        return
    for row in rows:
        types = sorted({s["type"] for s in row["pii_spans"]})
        st.markdown(f"**{row['url'] or row['id']}** · {len(row['pii_spans'])} spans · {', '.join(types)}")
        before, after = highlight_spans(row["text"] or "", row["pii_spans"])
        left, right = st.columns(2)
        left.caption("before")
        left.html(_PANE.format(before))
        right.caption("after")
        right.html(_PANE.format(after))
