"""Fine-tuning: is the method working? Loss and held-out loss for every method, then what each
method adds: DPO's reward accuracy and margins, the classifier's accuracy against the majority
class and its confusion matrix; and which records were kept out, and why."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from gristmill.dashboards.run_data import Run, UnreadableFile, read_json, read_jsonl
from gristmill.dashboards.stage_gate import choose_stage, explain_state, metric
from gristmill.dashboards.training_page import METRICS_FILE
from gristmill.dashboards.training_page import _line as line_chart
from gristmill.pipeline.status import read_run_workflow

REMOVED_FILE = "removed.json"


def render(run: Run) -> None:
    stage = choose_stage(run, "finetune", key="finetune-stage")
    if stage is None:
        return
    settings = (read_run_workflow(run.dir).get("stages") or {}).get(stage.name) or {}
    if stage.state != "done":
        explain_state(stage)
    records = read_jsonl(stage.dir / METRICS_FILE)
    if not records:
        st.info(f"`{stage.name}` has logged no fine-tuning step yet ({METRICS_FILE} is empty or missing).")
        return
    df = pd.DataFrame(records)
    last, method = records[-1], settings.get("method", "?")
    evaluated = [r for r in records if "val_loss" in r]
    latest_eval = evaluated[-1] if evaluated else {}
    removed = read_json(stage.dir / REMOVED_FILE) or {}
    cols = st.columns(5)
    metric(cols[0], "method", method, "{}")
    max_steps = settings.get("max_steps")
    metric(cols[1], "step", f"{last['step']} / {max_steps}" if max_steps else last["step"], "{}")
    metric(cols[2], "loss", last.get("loss"), "{:.3f}")
    metric(cols[3], "held-out loss", latest_eval.get("val_loss"), "{:.3f}")
    metric(cols[4], "records kept out", removed.get("removed"))

    left, right = st.columns(2)
    left.subheader("Loss")
    left.plotly_chart(line_chart(df, {"loss": "train", "val_loss": "held-out"}, "loss"), width="stretch")
    right.subheader("Learning rate")
    right.plotly_chart(line_chart(df, {"lr": "lr"}, "learning rate"), width="stretch")
    if method == "dpo":
        show_dpo(df, latest_eval)
    elif method == "classify":
        show_classify(df, latest_eval, stage)
    if removed.get("reasons"):
        st.subheader("Records kept out")
        st.dataframe(pd.DataFrame([{"reason": reason, "records": count, "first seen at": ", ".join(
            removed.get("examples", {}).get(reason, []))} for reason, count in removed["reasons"].items()]),
            hide_index=True)


def show_dpo(df: pd.DataFrame, latest_eval: dict) -> None:
    cols = st.columns(3)
    metric(cols[0], "held-out reward accuracy", latest_eval.get("val_reward_accuracy"), "{:.1%}")
    metric(cols[1], "held-out reward margin", latest_eval.get("val_reward_margin"), "{:.3f}")
    metric(cols[2], "held-out log-prob margin", latest_eval.get("val_logp_margin"), "{:.2f}")
    left, right = st.columns(2)
    left.subheader("Reward accuracy")
    left.plotly_chart(line_chart(df, {"reward_accuracy": "train", "val_reward_accuracy": "held-out"}, "accuracy"),
                      width="stretch")
    right.subheader("Margins (chosen - rejected)")
    right.plotly_chart(line_chart(df, {"reward_margin": "reward", "val_reward_margin": "held-out reward",
                                       "logp_margin": "log-prob", "val_logp_margin": "held-out log-prob"}, "margin"),
                       width="stretch")


def show_classify(df: pd.DataFrame, latest_eval: dict, stage) -> None:
    cols = st.columns(2)
    metric(cols[0], "held-out accuracy", latest_eval.get("val_accuracy"), "{:.1%}")
    metric(cols[1], "majority class", latest_eval.get("val_majority_accuracy"), "{:.1%}")
    st.subheader("Accuracy")
    st.plotly_chart(line_chart(df, {"accuracy": "train", "val_accuracy": "held-out",
                                    "val_majority_accuracy": "majority class"}, "accuracy"), width="stretch")
    confusion = latest_eval.get("val_confusion")
    if confusion:
        try:
            labels = (stage.stats() if stage.state == "done" else {}).get("labels")
        except UnreadableFile:
            labels = None
        labels = labels or [str(i) for i in range(len(confusion))]
        st.subheader("Confusion matrix (held-out; rows: true label)")
        fig = go.Figure(go.Heatmap(z=confusion, x=labels, y=labels, text=confusion, texttemplate="%{text}",
                                   colorscale="Blues"))
        fig.update_layout(xaxis_title="predicted", yaxis_title="true", height=360, margin=dict(t=30, b=10))
        fig.update_yaxes(autorange="reversed")
        st.plotly_chart(fig, width="stretch")
