"""Ablations: did this data decision help? Models trained on each branch of the data, side by
side: loss curves overlaid, the evaluate stage's table (bits per byte on the same held-out sets),
and how much data each branch had."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from gristmill.dashboards.run_data import Run, read_jsonl
from gristmill.dashboards.stage_gate import metric, ready_stage
from gristmill.pipeline import io
from gristmill.pipeline.status import read_run_workflow

METRICS_FILE = "metrics.jsonl"


def branch_sizes(run: Run, models: list[str], stages: dict) -> pd.DataFrame:
    """Per model that is a train stage of this run: its pack stage and that pack's documents stage,
    with the documents and tokens each holds."""
    def inputs(stage: str) -> list[str]:
        value = (stages.get(stage) or {}).get("input") or []
        return [value] if isinstance(value, str) else list(value)

    rows = []
    for model in models:
        pack = next(iter(inputs(model)), None)
        if pack not in stages or stages[pack].get("type") != "pack":
            continue
        pack_inputs = inputs(pack)
        documents = next((s for s in pack_inputs if stages.get(s, {}).get("type") not in (None, "tokenizers")), None)
        counts = (io.read_json(run.dir / pack / io.DONE_FILE) or {}).get("counts", {})
        docs_counts = (io.read_json(run.dir / documents / io.DONE_FILE) or {}).get("counts", {}) if documents else {}
        rows.append({"model": model, "documents stage": documents, "documents": docs_counts.get("kept"),
                     "train tokens": counts.get("train_tokens"), "val tokens": counts.get("val_tokens")})
    return pd.DataFrame(rows)


def loss_curves(run: Run, models: list[str]) -> go.Figure | None:
    """Training loss of every model that logged `metrics.jsonl` in this run, on one chart."""
    fig = go.Figure()
    for model in models:
        records = [r for r in read_jsonl(run.dir / model / METRICS_FILE) if "loss" in r and "step" in r]
        if records:
            fig.add_trace(go.Scatter(x=[r["step"] for r in records], y=[r["loss"] for r in records], name=model,
                                     mode="lines"))
    if not fig.data:
        return None
    fig.update_layout(xaxis_title="step", yaxis_title="training loss", height=340, margin=dict(t=30, b=10),
                      legend=dict(orientation="h"))
    return fig


def render(run: Run) -> None:
    stage = ready_stage(run, "evaluate", key="evaluate-stage")
    if stage is None:
        return
    table = pd.DataFrame(stage.stats().get("table") or [])
    if table.empty:
        st.info(f"`{stage.name}` evaluated no model.")
        return
    models = list(dict.fromkeys(table["model"]))
    heldout = list(dict.fromkeys(table["heldout"]))
    mean_bpb = table.groupby("model", sort=False)["bits_per_byte"].mean()
    cols = st.columns(4)
    metric(cols[0], "models", len(models))
    metric(cols[1], "held-out sets", len(heldout))
    metric(cols[2], "best model (mean bits/byte)", mean_bpb.idxmin())
    metric(cols[3], "its bits per byte", float(mean_bpb.min()), "{:.4f}")
    st.caption("Bits per byte does not depend on the tokenizer: lower is better. On the bundled demo data "
               "differences show the mechanism, not a conclusion (see the ablations docs page).")

    st.subheader("Bits per byte on each held-out set")
    st.plotly_chart(px.bar(table, x="heldout", y="bits_per_byte", color="model", barmode="group", height=340),
                    width="stretch")
    st.dataframe(table[["model", "heldout", "bits_per_byte", "loss", "perplexity", "tokens", "bytes", "docs"]],
                 hide_index=True)

    st.subheader("Training loss")
    figure = loss_curves(run, models)
    if figure is None:
        st.info("None of the evaluated models was trained in this run, so there are no loss curves to overlay.")
    else:
        st.caption("Each branch's training loss is on its own data; compare models on the table above.")
        st.plotly_chart(figure, width="stretch")

    st.subheader("Data in each branch")
    sizes = branch_sizes(run, models, read_run_workflow(run.dir).get("stages") or {})
    if sizes.empty:
        st.info("No evaluated model was trained from a pack stage of this run.")
    else:
        st.dataframe(sizes, hide_index=True)
