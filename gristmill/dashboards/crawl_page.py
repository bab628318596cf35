"""Crawl: what was fetched, when, with which status and content type, from which hosts, and what failed."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from gristmill.dashboards.charts import counts_bar
from gristmill.dashboards.run_data import Run, host_of, read_columns
from gristmill.dashboards.stage_gate import choose_stage, explain_state, metric

CRAWL_LOG = "crawl_log.parquet"
LOG_PARTS = "crawl_log"  # parts written while the crawl runs
ERRORS_SHOWN = 500
LOG_COLUMNS = ["url", "status", "content_type", "bytes", "fetch_time", "elapsed_s", "depth", "error"]


def render(run: Run) -> None:
    stage = choose_stage(run, "crawl", key="crawl-stage")
    if stage is None:
        return
    live_parts = sorted((stage.dir / LOG_PARTS).glob("part-*.parquet"))
    if stage.state == "running" and live_parts:
        # A running crawl writes its log in parts as it goes: show what it has fetched so far.
        st.warning(f"Stage `{stage.name}` is running: showing the {len(live_parts)} log parts written so far "
                   "(reload the page for more).")
        draw_log(read_columns(live_parts, LOG_COLUMNS).to_pandas(), counts={}, stats={})
        return
    if not explain_state(stage):
        return
    stats = stage.stats()
    log_path = stage.dir / CRAWL_LOG
    if not log_path.exists():
        st.warning(f"`{stage.name}` has no {CRAWL_LOG}; showing its stats only.")
        st.json(stats)
        return
    # the stage's own counts when it wrote them, else the log's
    draw_log(read_columns([log_path], LOG_COLUMNS).to_pandas(), stage.status.counts, stats)


def draw_log(log: pd.DataFrame, counts: dict, stats: dict) -> None:
    """Metrics, charts and errors of a crawl log (finished, or the parts of a running crawl)."""
    status = pd.to_numeric(log["status"], errors="coerce")
    errors = log[log["error"].notna() | (status.fillna(0) >= 400)]
    fetched = log[status.between(200, 299) & log["error"].isna() & log["depth"].notna()]  # not robots.txt
    log["host"] = [host_of(u) for u in log["url"]]

    cols = st.columns(6)
    metric(cols[0], "pages fetched", counts.get("pages_fetched", len(fetched)))
    metric(cols[1], "URLs tried", counts.get("fetch_attempts", len(log)))
    metric(cols[2], "errors", counts.get("errors", len(errors)))
    metric(cols[3], "bytes", counts.get("bytes", int(pd.to_numeric(fetched["bytes"], errors="coerce").sum())))
    metric(cols[4], "hosts", log["host"].nunique())
    metric(cols[5], "robots.txt disallowed", counts.get("robots_disallowed"))

    times = pd.to_datetime(fetched["fetch_time"], errors="coerce", utc=True).dropna()
    if len(times):
        st.subheader("Pages fetched over time")
        fig = px.histogram(x=times, nbins=min(60, max(10, len(times) // 5)), labels={"x": "fetch time"})
        fig.update_layout(yaxis_title="pages", height=300, margin=dict(t=30, b=10))
        st.plotly_chart(fig, width="stretch")

    left, middle, right = st.columns(3)
    with left:
        st.subheader("Status codes")
        codes = status.fillna(-1).astype(int).astype(str).replace("-1", "no response")
        st.plotly_chart(counts_bar(codes.value_counts().to_dict(), "status", "URLs"), width="stretch")
    with middle:
        st.subheader("Content types")
        types = log["content_type"].fillna("(none)").str.split(";").str[0]
        st.plotly_chart(counts_bar(types.value_counts().to_dict(), "content type", "URLs"), width="stretch")
    with right:
        st.subheader("Top hosts")
        st.plotly_chart(counts_bar(log["host"].value_counts().to_dict(), "host", "URLs", horizontal=True, top=15),
                        width="stretch")

    st.subheader("Errors")
    if errors.empty:
        st.success("No fetch failed.")
    else:
        st.dataframe(errors[["url", "status", "error", "depth"]].head(ERRORS_SHOWN), hide_index=True, width="stretch")
    other = {k: v for k, v in stats.items() if k not in ("stage", "type", "counts", "wall_time_s")}
    if other:
        with st.expander("all crawl stats"):
            st.json(other)
