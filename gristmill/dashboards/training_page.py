"""Training: is the loss going down, how fast, how well is the hardware used, and what does the
model write at each checkpoint? Refreshes by itself while the train stage is running."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from gristmill.dashboards.run_data import Run, StageView, UnreadableFile, read_jsonl, refresh_state
from gristmill.dashboards.stage_gate import choose_stage, explain_state, metric
from gristmill.model.config import DEFAULT_OBJECTIVE
from gristmill.pipeline.status import read_run_workflow

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
REFRESH_S = 5.0


def render(run: Run) -> None:
    stage = choose_stage(run, "train", key="train-stage")
    if stage is None:
        return
    settings = (read_run_workflow(run.dir).get("stages") or {}).get(stage.name) or {}
    if stage.state == "running":
        st.info(f"Stage `{stage.name}` is training; this page refreshes every {REFRESH_S:g} s.")
        live(stage, settings)
        return
    if stage.state == "pending":
        explain_state(stage)
        return
    if stage.state != "done":
        explain_state(stage)  # failed or interrupted: say so, then show what was logged
    show_training(stage, settings)


@st.fragment(run_every=REFRESH_S)
def live(stage: StageView, settings: dict) -> None:
    """Redraw from the files every few seconds; a full rerun once the stage stops running."""
    stage = refresh_state(stage)
    if stage.state != "running":
        st.rerun()
    show_training(stage, settings)


def _line(df: pd.DataFrame, columns: dict[str, str], y_title: str, log_y: bool = False) -> go.Figure:
    fig = go.Figure()
    for column, label in columns.items():
        if column in df and df[column].notna().any():
            points = df[["step", column]].dropna()
            fig.add_trace(go.Scatter(x=points["step"], y=points[column], name=label,
                                     mode="lines+markers" if len(points) < 30 else "lines"))
    fig.update_layout(xaxis_title="step", yaxis_title=y_title, height=300, margin=dict(t=30, b=10),
                      legend=dict(orientation="h"))
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def show_training(stage: StageView, settings: dict) -> None:
    records = read_jsonl(stage.dir / METRICS_FILE)
    if not records:
        st.info(f"`{stage.name}` has logged no training step yet ({METRICS_FILE} is empty or missing).")
        return
    df = pd.DataFrame(records)
    last = records[-1]
    try:
        stats = stage.stats() if stage.state == "done" else {}
    except UnreadableFile:
        stats = {}
    val = df["val_loss"].dropna() if "val_loss" in df else pd.Series(dtype=float)
    max_steps = settings.get("max_steps")
    cols = st.columns(6)
    metric(cols[0], "step", f"{last.get('step', '?')} / {max_steps}" if max_steps else last.get("step"))
    metric(cols[1], "loss", last.get("loss"), "{:.3f}")
    metric(cols[2], "best val loss", float(val.min()) if len(val) else None, "{:.3f}")
    metric(cols[3], "tokens/s", stats.get("tokens_per_sec") or last.get("tokens_per_sec"), "{:,.0f}")
    mfu = last.get("mfu")
    metric(cols[4], "MFU", mfu, "{:.2%}")
    metric(cols[5], "parameters", stats.get("params"))
    if max_steps and isinstance(last.get("step"), int):
        st.progress(min(1.0, last["step"] / max_steps))
    architecture = settings.get("architecture", "decoder")
    objective = settings.get("objective") or DEFAULT_OBJECTIVE.get(architecture, "causal")
    st.caption(f"architecture `{architecture}`, objective `{objective}`")

    left, right = st.columns(2)
    left.subheader("Loss")
    left.plotly_chart(_line(df, {"loss": "train", "val_loss": "validation"}, "loss"), width="stretch")
    right.subheader("Learning rate")
    right.plotly_chart(_line(df, {"lr": "lr"}, "learning rate"), width="stretch")
    if "val_accuracy" in df and df["val_accuracy"].notna().any():
        # top-1 accuracy on the objective's targets: masked tokens for MLM, next tokens or spans otherwise
        label = "masked-token accuracy" if objective == "mlm" else "target-token accuracy"
        st.subheader(f"Validation {label}")
        st.plotly_chart(_line(df, {"val_accuracy": label}, "accuracy"), width="stretch")
    left, right = st.columns(2)
    left.subheader("Tokens per second")
    left.plotly_chart(_line(df, {"tokens_per_sec": "tokens/s"}, "tokens/s"), width="stretch")
    right.subheader("MFU")
    if "mfu" in df and df["mfu"].notna().any():
        right.plotly_chart(_line(df, {"mfu": "MFU"}, "model FLOPs utilisation"), width="stretch")
    else:
        right.info("No MFU logged (the device's peak FLOPs are unknown, e.g. on CPU).")

    show_layout(last)

    st.subheader("Samples at checkpoints")
    samples = read_jsonl(stage.dir / SAMPLES_FILE)
    if not samples:
        st.info(f"No sample yet ({SAMPLES_FILE} is written at each checkpoint).")
    for sample in reversed(samples):
        with st.expander(f"step {sample.get('step', '?')}", expanded=sample is samples[-1]):
            st.caption(f"prompt: {sample.get('prompt', '')!r}")
            st.text(sample.get("text", ""))


def show_layout(last: dict) -> None:
    """How the processes split the model (the mesh shape) and what each one holds in memory."""
    layout, per_rank = last.get("layout"), last.get("memory_mb_per_rank")
    if not layout and not per_rank:
        return
    st.subheader("Layout and memory per process")
    if layout:
        shape = " x ".join(f"{layout.get(d, 1)} {d}" for d in ("pipeline", "data", "tensor"))
        st.caption(f"mesh {shape}, shard: {layout.get('shard', 'none')}")
    if per_rank:
        memory = pd.DataFrame({"rank": range(len(per_rank)), "MiB": per_rank})
        fig = go.Figure(go.Bar(x=memory["rank"], y=memory["MiB"]))
        fig.update_layout(xaxis_title="rank", yaxis_title="peak CUDA / resident MiB", height=250,
                          margin=dict(t=10, b=10))
        st.plotly_chart(fig, width="stretch")
