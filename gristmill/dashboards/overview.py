"""Run overview: is every stage done, how many documents survive each step, where did time go?"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
import yaml

from gristmill.dashboards.run_data import Run, StageView, UnreadableFile, discover_runs, load_run, text_bytes
from gristmill.dashboards.stage_gate import metric

STATE_COLOURS = {"done": "#2e7d32", "failed": "#c62828", "running": "#f9a825", "interrupted": "#8e24aa",
                 "stale": "#ef6c00", "pending": "#9e9e9e"}
# The page that shows each stage type (keys of app.PAGES).
PAGE_OF_TYPE = {"crawl": "crawl", "extract": "extract", "filter": "filters", "dedup": "dedup", "pii": "pii",
                "tokenizers": "tokenizers", "pack": "tokenizers", "train": "training"}


def dag_dot(stages: list[StageView]) -> str:
    """Graphviz DOT of the workflow DAG, each stage coloured by its state."""
    lines = ["digraph run {", "rankdir=LR;", 'node [shape=box, style="rounded,filled", fontcolor=white, '
             'fontname="sans-serif"];']
    for s in stages:
        label = f"{s.name}\\n{s.status.type} · {s.state}"
        lines.append(f'"{s.name}" [label="{label}", fillcolor="{STATE_COLOURS.get(s.state, "#607d8b")}"];')
    names = {s.name for s in stages}
    for s in stages:
        for source in s.status.inputs:
            if source in names:
                lines.append(f'"{source}" -> "{s.name}";')
    lines.append("}")
    return "\n".join(lines)


def stage_table(stages: list[StageView]) -> pd.DataFrame:
    """One row per stage: state, the runner's counts and wall time."""
    rows = []
    for s in stages:
        counts = s.status.counts
        rows.append({
            "stage": s.name, "type": s.status.type, "input": ", ".join(s.status.inputs), "state": s.state,
            "in": counts.get("in"), "kept": counts.get("kept"), "removed": counts.get("removed"),
            "other counts": ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                                      for k, v in counts.items() if k not in ("in", "kept", "removed")),
            "wall s": s.status.wall_time_s if s.state == "done" else None,
        })
    return pd.DataFrame(rows)


def funnel(stages: list[StageView]) -> pd.DataFrame:
    """Documents and text bytes kept after each done document stage, then the packed tokens."""
    rows = []
    for s in stages:
        counts = s.status.counts
        if s.state != "done":
            continue
        if "kept" in counts:
            if not rows and "in" in counts:
                rows.append({"step": f"{s.name} (in)", "documents": counts["in"], "text bytes": None,
                             "tokens": None})
            rows.append({"step": s.name, "documents": counts["kept"], "text bytes": text_bytes(s.parts()),
                         "tokens": None})
        elif "train_tokens" in counts:
            rows.append({"step": s.name, "documents": counts.get("documents"), "text bytes": None,
                         "tokens": counts["train_tokens"] + counts.get("val_tokens", 0)})
    return pd.DataFrame(rows, columns=["step", "documents", "text bytes", "tokens"])


def _goto(page: str) -> None:
    st.session_state["page"] = page


def render(run: Run) -> None:
    stages = run.stages
    done = [s for s in stages if s.state == "done"]
    flow = funnel(stages)
    documents = flow["documents"].dropna()
    cols = st.columns(5)
    metric(cols[0], "stages done", f"{len(done)} / {len(stages)}")
    metric(cols[1], "documents in", int(documents.iloc[0]) if len(documents) else None)
    metric(cols[2], "documents out", int(documents.iloc[-1]) if len(documents) else None)
    tokens = flow["tokens"].dropna()
    metric(cols[3], "tokens packed", int(tokens.iloc[-1]) if len(tokens) else None)
    metric(cols[4], "wall time", sum(s.status.wall_time_s or 0 for s in done), "{:,.1f} s")
    for s in stages:
        if s.state == "failed":
            st.error(f"Stage `{s.name}` failed: {s.status.error or 'see its _FAILED.json'}")
        elif s.state == "interrupted":
            st.warning(f"Stage `{s.name}` was interrupted; `gristmill run` resumes it.")
        elif s.state == "stale":
            st.warning(f"Stage `{s.name}`'s output changed since it finished; `gristmill run` redoes it. "
                       f"{s.status.error}")

    st.subheader("DAG")
    st.graphviz_chart(dag_dot(stages))
    st.dataframe(stage_table(stages), hide_index=True, width="stretch")

    left, right = st.columns(2)
    with left:
        st.subheader("Document funnel")
        docs = flow.dropna(subset=["documents"])
        if docs.empty:
            st.info("No document stage is done yet.")
        else:
            fig = go.Figure(go.Funnel(y=docs["step"], x=docs["documents"], textinfo="value+percent initial"))
            fig.update_layout(height=320, margin=dict(t=30, b=10))
            st.plotly_chart(fig, width="stretch")
            st.dataframe(flow, hide_index=True, width="stretch")
    with right:
        st.subheader("Wall time per stage")
        if not done:
            st.info("No stage is done yet.")
        else:
            fig = go.Figure(go.Bar(x=[s.name for s in done], y=[s.status.wall_time_s or 0 for s in done]))
            fig.update_layout(yaxis_title="seconds", height=320, margin=dict(t=30, b=10))
            st.plotly_chart(fig, width="stretch")

    st.subheader("Open a stage")
    buttons = st.columns(max(1, len(stages)))
    for column, s in zip(buttons, stages):
        page = PAGE_OF_TYPE.get(s.status.type)
        if page:
            column.button(s.name, key=f"open-{s.name}", on_click=_goto, args=(page,))

    others = [r for r in run.runs if r != run.dir]
    if others:
        compare(run, others)


def _flat_settings(run_dir) -> dict[str, str]:
    """`stage.key` -> value of every stage setting in the run's workflow.yaml."""
    workflow = yaml.safe_load((run_dir / "workflow.yaml").read_text()) or {}
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = str(value)

    walk("", workflow.get("stages") or {})
    return flat


def compare(run: Run, others: list) -> None:
    """Two runs side by side: counts and wall time per stage, and the settings that differ."""
    st.subheader("Compare with another run")
    other_dir = st.selectbox("other run", others, format_func=lambda p: p.name, key="compare-run")
    try:
        other = load_run(discover_runs(other_dir)[0])
    except (FileNotFoundError, UnreadableFile, ValueError) as error:
        st.warning(f"Cannot read {other_dir}: {error}")
        return
    mine = {s.name: s for s in run.stages}
    theirs = {s.name: s for s in other}
    rows = []
    for name in list(mine) + [n for n in theirs if n not in mine]:
        a, b = mine.get(name), theirs.get(name)
        row = {"stage": name}
        for tag, s in ((run.dir.name, a), (other_dir.name, b)):
            row[f"state · {tag}"] = s.state if s else "absent"
            row[f"kept · {tag}"] = s.status.counts.get("kept") if s else None
            row[f"wall s · {tag}"] = s.status.wall_time_s if s and s.state == "done" else None
        rows.append(row)
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    a, b = _flat_settings(run.dir), _flat_settings(other_dir)
    diff = [{"setting": k, run.dir.name: a.get(k), other_dir.name: b.get(k)}
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
        st.caption("settings that differ")
        st.dataframe(pd.DataFrame(diff), hide_index=True, width="stretch")
    else:
        st.caption("Both runs used the same settings.")
