"""Plotly figures shared by several pages."""

from __future__ import annotations

import plotly.graph_objects as go


def bin_labels(edges: list[float]) -> list[str]:
    """`a–b` per bin, the last one open-ended when there is one more count than bins."""
    def fmt(x: float) -> str:
        return f"{x:,.0f}" if float(x).is_integer() else f"{x:g}"

    return [f"{fmt(a)}–{fmt(b)}" for a, b in zip(edges[:-1], edges[1:])]


def binned_bar(edges: list[float], counts: list[int], x_title: str, y_title: str = "documents") -> go.Figure:
    """A bar per pre-computed bin (as stages write them in stats.json: `{"edges", "counts"}`)."""
    labels = bin_labels(edges)
    if len(counts) == len(labels) + 1:  # the last bin counts everything from the last edge up
        labels.append(f"≥ {edges[-1]:,}")
    fig = go.Figure(go.Bar(x=labels[: len(counts)], y=counts))
    fig.update_layout(xaxis_title=x_title, yaxis_title=y_title, height=320, margin=dict(t=30, b=10))
    fig.update_xaxes(type="category")
    return fig


def counts_bar(counts: dict[str, int | float], x_title: str, y_title: str = "documents",
               horizontal: bool = False, top: int = 30) -> go.Figure:
    """A bar per key of a `{name: count}` mapping, largest first, at most `top` bars."""
    items = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    names, values = [str(k) for k, _ in items], [v for _, v in items]
    if horizontal:
        fig = go.Figure(go.Bar(y=names[::-1], x=values[::-1], orientation="h"))
        fig.update_layout(xaxis_title=y_title, yaxis_title=x_title)
    else:
        fig = go.Figure(go.Bar(x=names, y=values))
        fig.update_layout(xaxis_title=x_title, yaxis_title=y_title)
        fig.update_xaxes(type="category")
    fig.update_layout(height=max(320, 22 * len(items)) if horizontal else 320, margin=dict(t=30, b=10))
    return fig
