"""Dedup: how big the duplicate clusters are, which hosts duplicate most, and how a survivor
differs from the documents removed as its duplicates."""

from __future__ import annotations

import difflib
import html
import re
from collections import Counter

import streamlit as st

from gristmill.dashboards.charts import binned_bar, counts_bar
from gristmill.dashboards.run_data import Run, StageView, find_rows, host_of, read_columns
from gristmill.dashboards.stage_gate import metric, ready_stage

DIFF_TOKENS = 4_000  # words compared per side; longer texts are cut for the diff
BROWSABLE_CLUSTERS = 200
TOP_HOSTS = 20
_WORDS = re.compile(r"(\s+)")
_PANE = ('<div style="white-space: pre-wrap; font-family: monospace; font-size: 0.8rem; max-height: 480px; '
         'overflow-y: auto; border: 1px solid #ddd; border-radius: 4px; padding: 0.5rem">{}</div>')


def word_diff(a: str, b: str) -> tuple[str, str]:
    """HTML of `a` with the words missing from `b` struck red, and of `b` with its additions green."""
    left, right = _WORDS.split(a)[: 2 * DIFF_TOKENS], _WORDS.split(b)[: 2 * DIFF_TOKENS]
    out_a, out_b = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, left, right, autojunk=False).get_opcodes():
        ta, tb = html.escape("".join(left[i1:i2])), html.escape("".join(right[j1:j2]))
        if op == "equal":
            out_a.append(ta)
            out_b.append(tb)
            continue
        if ta:
            out_a.append(f'<del style="background:#ffcdd2">{ta}</del>')
        if tb:
            out_b.append(f'<ins style="background:#c8e6c9; text-decoration:none">{tb}</ins>')
    return "".join(out_a), "".join(out_b)


def duplicate_rate_by_host(stage: StageView) -> dict[str, float]:
    """Removed / (kept + removed) per host, for the hosts with the most removed documents."""
    kept = Counter(host_of(u) for u in read_columns(stage.parts(), ["url"]).column("url").to_pylist())
    removed = Counter(host_of(u) for u in read_columns(stage.parts("removed"), ["url"]).column("url").to_pylist())
    top = [h for h, _ in removed.most_common(TOP_HOSTS)]
    return {h: removed[h] / (removed[h] + kept[h]) for h in top}


def render(run: Run) -> None:
    stage = ready_stage(run, "dedup", key="dedup-stage")
    if stage is None:
        return
    stats = stage.stats()
    counts = stats.get("counts") or stage.status.counts
    rate = stats.get("duplicate_rate")
    if rate is None and counts.get("in"):
        rate = counts.get("removed", 0) / counts["in"]
    cols = st.columns(5)
    metric(cols[0], "documents in", counts.get("in"))
    metric(cols[1], "duplicates removed", counts.get("removed"))
    metric(cols[2], "duplicate rate", rate, "{:.1%}")
    metric(cols[3], "clusters", stats.get("clusters"))
    metric(cols[4], "largest cluster", stats.get("largest_cluster"))

    left, right = st.columns(2)
    with left:
        st.subheader("Cluster sizes")
        hist = stats.get("cluster_size_histogram")
        if hist and hist.get("counts"):
            st.plotly_chart(binned_bar(hist["edges"], hist["counts"], "documents per cluster", "clusters"),
                            width="stretch")
        else:
            st.info("This stage's stats have no cluster size histogram.")
        reasons = stats.get("removed_by_reason")
        if reasons:
            st.caption("removed by reason: " + ", ".join(f"{k} {v:,}" for k, v in reasons.items()))
    with right:
        st.subheader("Duplicate rate by host")
        by_host = duplicate_rate_by_host(stage)
        if by_host:
            st.plotly_chart(counts_bar(by_host, "host", "duplicate rate", horizontal=True), width="stretch")
        else:
            st.info("No duplicates were removed.")
    cluster_browser(stage)


def cluster_browser(stage: StageView) -> None:
    """Pick a cluster, then a duplicate: survivor and duplicate side by side, differences marked."""
    st.subheader("Cluster browser")
    removed = stage.parts("removed")
    clusters = Counter(c for c in read_columns(removed, ["dup_cluster"]).column("dup_cluster").to_pylist() if c)
    if not clusters:
        st.info("No duplicate clusters to browse.")
        return
    names = [c for c, _ in clusters.most_common(BROWSABLE_CLUSTERS)]
    cluster = st.selectbox("cluster (largest first)", names, key="dedup-cluster",
                           format_func=lambda c: f"{c} · {clusters[c]} removed")
    columns = ["id", "url", "text", "dup_cluster", "dup_survivor"]
    members = find_rows(stage.parts() + removed, "dup_cluster", [cluster], columns + ["reason"]).to_pylist()
    survivor_id = next((m["dup_survivor"] for m in members if m["dup_survivor"]), None)
    survivor = next((m for m in members if m["id"] == survivor_id), None)
    duplicates = [m for m in members if m["id"] != survivor_id]
    if survivor is None:
        st.info(f"The survivor `{survivor_id}` is not in this run (kept by an earlier run's index); "
                "showing the removed documents only.")
        for m in duplicates:
            st.markdown(f"- `{m['id']}` {m['url']} · {m['reason']}")
        return
    pick = st.selectbox("duplicate", range(len(duplicates)), key="dedup-duplicate",
                        format_func=lambda i: f"{duplicates[i]['url'] or duplicates[i]['id']} · {duplicates[i]['reason']}")
    duplicate = duplicates[pick]
    a, b = word_diff(survivor["text"] or "", duplicate["text"] or "")
    if survivor["text"] == duplicate["text"]:
        st.caption("The two texts are identical.")
    left, right = st.columns(2)
    with left:
        st.markdown(f"**Survivor** · {survivor['url'] or survivor['id']}")
        st.html(_PANE.format(a))
    with right:
        st.markdown(f"**Duplicate** · {duplicate['url'] or duplicate['id']} · `{duplicate['reason']}`")
        st.html(_PANE.format(b))
