"""Filters: which rule removed how much, where each signal's threshold sits in its distribution,
what another threshold would do, and what kept and removed documents look like."""

from __future__ import annotations

import numpy as np
import plotly.express as px
import streamlit as st

from gristmill.dashboards.charts import counts_bar
from gristmill.dashboards.run_data import Run, StageView, columns_of, read_columns, sample_rows
from gristmill.dashboards.stage_gate import metric, ready_stage

SIGNAL_PREFIXES = ("gopher_", "c4_", "fineweb_")
EXAMPLES = 3
EXCERPT_CHARS = 1_500


def signal_columns(stage: StageView) -> list[str]:
    """The signal columns the filter wrote (`gopher_*`, `c4_*`, `fineweb_*`)."""
    parts = stage.parts() or stage.parts("removed")
    return [c for c in columns_of(parts) if c.startswith(SIGNAL_PREFIXES)]


def passes(values: np.ndarray, bounds: dict[str, float]) -> np.ndarray:
    """Which values pass `{"min": a, "max": b}` (fail below min, fail above max; NaN passes)."""
    ok = np.ones(len(values), dtype=bool)
    with np.errstate(invalid="ignore"):
        if bounds.get("min") is not None:
            ok &= ~(values < bounds["min"])
        if bounds.get("max") is not None:
            ok &= ~(values > bounds["max"])
    return ok


def render(run: Run) -> None:
    stage = ready_stage(run, "filter", key="filter-stage")
    if stage is None:
        return
    stats = stage.stats()
    counts = stats.get("counts") or stage.status.counts
    removed_by_rule = stats.get("removed_by_rule") or {}
    n_in, n_removed = counts.get("in"), counts.get("removed")
    cols = st.columns(5)
    metric(cols[0], "documents in", n_in)
    metric(cols[1], "kept", counts.get("kept"))
    metric(cols[2], "removed", n_removed)
    metric(cols[3], "removal rate", n_removed / n_in if n_in else None, "{:.1%}")
    metric(cols[4], "rules that removed", len(removed_by_rule))
    if stats.get("annotate_only"):
        st.info("annotate_only is on: nothing was removed; `filter_reason` says what each rule would have done.")

    st.subheader("Removals per rule")
    if removed_by_rule:
        st.caption("A removed document counts once, under the first rule it failed.")
        st.plotly_chart(counts_bar(removed_by_rule, "rule", horizontal=True), width="stretch")
    else:
        st.success("No rule removed any document.")
    failed = stats.get("failed_by_rule")
    if failed:
        with st.expander("documents failing each rule (a document may fail several)"):
            st.plotly_chart(counts_bar(failed, "rule", horizontal=True), width="stretch")

    signal_explorer(stage, stats.get("thresholds") or {})
    examples(stage, removed_by_rule)


def signal_explorer(stage: StageView, thresholds: dict[str, dict[str, float]]) -> None:
    """Histogram of one signal with its threshold drawn, and a slider to preview another one."""
    st.subheader("Signals and thresholds")
    signals = signal_columns(stage)
    if not signals:
        st.info("The documents carry no signal columns.")
        return
    table = read_columns(stage.parts() + stage.parts("removed"), signals)
    columns = {s: np.asarray(table.column(s).to_numpy(zero_copy_only=False), dtype=np.float64) for s in signals}
    failing = {s: int((~passes(columns[s], thresholds.get(s, {}))).sum()) for s in signals}
    # The signals whose threshold fails most documents first; those without a threshold last.
    ordered = sorted(signals, key=lambda s: (s not in thresholds, -failing[s]))
    signal = st.selectbox("signal", ordered, key="filter-signal",
                          format_func=lambda s: f"{s} · fails {failing[s]:,}" if s in thresholds else s)
    values = columns[signal]
    finite = values[np.isfinite(values)]
    if not len(finite):
        st.info(f"`{signal}` has no values.")
        return
    bounds = {side: float(v) for side, v in thresholds.get(signal, {}).items()}
    top = float(finite.max())
    # The chart stops at the 99th percentile (or a threshold inside the data); the slider spans
    # the thresholds too, even one far outside the data.
    hi = max([float(np.percentile(finite, 99)), *(v for v in bounds.values() if v <= top)])
    lo = min([float(finite.min()), *bounds.values()])
    slider_hi = float(max([hi, *bounds.values()]))
    preview = dict(bounds)
    if bounds and slider_hi > lo:
        step = (slider_hi - lo) / 200
        if "min" in bounds and "max" in bounds:
            a, b = st.slider("preview thresholds (min, max)", lo, slider_hi,
                             (bounds["min"], bounds["max"]), step=step, key=f"slider-{signal}")
            preview = {"min": a, "max": b}
        else:
            side = "min" if "min" in bounds else "max"
            preview = {side: st.slider(f"preview {side} threshold", lo, slider_hi, bounds[side], step=step,
                                       key=f"slider-{signal}")}
    now, then = passes(values, bounds), passes(values, preview)
    cols = st.columns(4)
    metric(cols[0], "documents measured", len(values))
    metric(cols[1], "pass now", int(now.sum()))
    metric(cols[2], "would pass at preview", int(then.sum()), "{:,}")
    metric(cols[3], "change", int(then.sum() - now.sum()), "{:+,}")
    if not bounds:
        st.caption(f"No threshold is set on `{signal}`; it is measured for inspection only.")
    fig = px.histogram(x=np.clip(finite, lo, hi), nbins=50, labels={"x": signal})
    fig.update_layout(yaxis_title="documents", height=320, margin=dict(t=30, b=10), bargap=0.05)
    for side, value in bounds.items():
        if value > hi:
            continue
        fig.add_vline(x=value, line_color="#c62828", line_dash="dash", annotation_text=f"{side} {value:g}")
    for side, value in preview.items():
        if value != bounds.get(side) and value <= hi:
            fig.add_vline(x=value, line_color="#2e7d32", annotation_text=f"preview {value:g}",
                          annotation_position="bottom right")
    st.plotly_chart(fig, width="stretch")
    beyond = [f"{side} {value:g}" for side, value in bounds.items() if value > hi]
    st.caption(f"Values above {hi:.3g} (the 99th percentile or the threshold) are counted in the last bin. "
               + (f"The threshold {', '.join(beyond)} lies beyond the chart. " if beyond else "")
               + "'would pass' counts this signal's rule alone; other rules still apply.")


def examples(stage: StageView, removed_by_rule: dict[str, int]) -> None:
    """Random removed documents of one rule, and random kept ones, with their signals."""
    st.subheader("Examples")
    signals = signal_columns(stage)
    seed = st.session_state.setdefault("filter-seed", 0)
    if st.button("Other examples", key="filter-resample"):
        st.session_state["filter-seed"] = seed = seed + 1
    left, right = st.columns(2)
    with left:
        st.markdown("**Removed**")
        if not removed_by_rule:
            st.info("Nothing was removed.")
        else:
            rule = st.selectbox("rule", sorted(removed_by_rule, key=lambda r: -removed_by_rule[r]), key="filter-rule")
            family = rule.split(":")[0].split("_")[0] + "_"
            shown = [c for c in signals if c.startswith(family)]
            rows = sample_rows(stage.parts("removed"), ["id", "url", "reason", "text", *shown], k=EXAMPLES,
                               seed=seed, where=("reason", rule)).to_pylist()
            for row in rows:
                show_document(row, shown)
    with right:
        st.markdown("**Kept**")
        rows = sample_rows(stage.parts(), ["id", "url", "text", *signals], k=EXAMPLES, seed=seed).to_pylist()
        if not rows:
            st.info("Nothing was kept.")
        for row in rows:
            show_document(row, signals)


def show_document(row: dict, signals: list[str]) -> None:
    title = row.get("url") or row.get("id")
    with st.expander(f"{title}" + (f" · {row['reason']}" if row.get("reason") else ""), expanded=False):
        values = {s: row.get(s) for s in signals if row.get(s) is not None}
        if values:
            st.caption(" · ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()))
        st.text((row.get("text") or "")[:EXCERPT_CHARS])
