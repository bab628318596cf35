"""Quality classifier: how well the model separates its held-out examples, where documents' scores
fall, what another threshold would keep, and the best- and worst-scored documents."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pyarrow.compute as pc
import streamlit as st

from gristmill.dashboards.run_data import Run, read_columns
from gristmill.dashboards.stage_gate import metric, ready_stage
from gristmill.pipeline import io

SCORE_COLUMN = "quality_score"  # the classify stage's column (rooms are not imported by pages)
EXAMPLES = 3
EXCERPT_CHARS = 800


def render(run: Run) -> None:
    stage = ready_stage(run, "classify", key="classify-stage")
    if stage is None:
        return
    stats = stage.stats()
    model = stats.get("model") or {}
    counts = stats.get("counts") or stage.status.counts
    cols = st.columns(5)
    metric(cols[0], "documents in", counts.get("in"))
    metric(cols[1], "kept", counts.get("kept"))
    metric(cols[2], "threshold", stats.get("threshold"), "{:.3f}")
    metric(cols[3], "held-out accuracy", model.get("accuracy"), "{:.1%}")
    metric(cols[4], "precision / recall",
           f"{model['precision']:.0%} / {model['recall']:.0%}" if "precision" in model else None)
    if model.get("source") == "trained":
        st.caption(f"Trained on {model.get('positives')} positive and {model.get('negatives')} negative examples; "
                   f"measured on {model.get('holdout_examples')} held out.")
    elif model.get("source"):
        st.caption(f"Model loaded from `{model['source']}`.")

    table = read_columns(stage.parts(io.KEPT) + stage.parts(io.REMOVED), [SCORE_COLUMN, "text", "url"])
    scores = table.column(SCORE_COLUMN).to_numpy(zero_copy_only=False).astype(float)
    scored = scores[~np.isnan(scores)]
    if not len(scored):
        st.info("No document was scored.")
        return
    st.subheader("Scores")
    default = float(stats.get("threshold") or 0.5)
    threshold = st.slider("threshold", 0.0, 1.0, min(max(default, 0.0), 1.0), 0.01, key="classify-threshold")
    keeps = int((scored >= threshold).sum())
    st.caption(f"At {threshold:.2f}, {keeps:,} of {len(scored):,} documents shown here would be kept "
               f"({keeps / len(scored):.1%}); the stage kept {counts.get('kept', 0):,}.")
    fig = go.Figure(go.Histogram(x=scored, xbins=dict(start=0, end=1, size=0.025)))
    fig.add_vline(x=threshold, line_dash="dash", annotation_text="threshold")
    fig.update_layout(xaxis_title=SCORE_COLUMN, yaxis_title="documents", height=320, margin=dict(t=30, b=10))
    st.plotly_chart(fig, width="stretch")

    table = table.filter(pc.is_valid(table.column(SCORE_COLUMN)))
    valid = pc.sort_indices(table, [(SCORE_COLUMN, "descending")]).to_numpy()
    for title, rows in (("Best-scored documents", valid[:EXAMPLES]), ("Worst-scored documents", valid[::-1][:EXAMPLES])):
        st.subheader(title)
        for row in rows:
            record = table.slice(int(row), 1).to_pylist()[0]
            with st.expander(f"{record[SCORE_COLUMN]:.3f} · {record.get('url') or '(no url)'}"):
                st.text((record.get("text") or "")[:EXCERPT_CHARS])
