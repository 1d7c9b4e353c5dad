"""Figures of the probe results (plotly): a layer × checkpoint heatmap of one metric and the held-out score per layer
over training next to its control. Both read ``probe_results`` rows (the frame ``probes.analysis.run`` returns)."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from workbench.probes.linear import ProbeError


def probe_heatmap(
    rows: pd.DataFrame, label_set: str, metric: str = "score", model: str | None = None
) -> go.Figure:
    """Heatmap layer × checkpoint of ``metric`` (score, selectivity, control_score, …) for one label set."""
    frame = _select(rows, label_set, model)
    grid = frame.pivot_table(index="layer", columns="checkpoint", values=metric)
    fig = px.imshow(
        grid,
        aspect="auto",
        origin="lower",
        color_continuous_scale="Viridis",
        labels={"x": "checkpoint", "y": "layer", "color": metric},
        title=f"{frame['model'].iloc[0]} · {label_set} · {metric}",
    )
    fig.update_xaxes(type="category")
    fig.update_yaxes(dtick=1)
    return fig


def probe_over_checkpoints(rows: pd.DataFrame, label_set: str, model: str | None = None) -> go.Figure:
    """Held-out score (solid) and control score (dotted) per layer over checkpoints, log-scaled steps."""
    frame = _select(rows, label_set, model).sort_values("checkpoint")
    fig = go.Figure()
    for layer, group in frame.groupby("layer"):
        steps = group["checkpoint"].clip(lower=0) + 1
        fig.add_scatter(x=steps, y=group["score"], mode="lines+markers", name=f"layer {layer}")
        fig.add_scatter(
            x=steps,
            y=group["control_score"],
            mode="lines",
            line={"dash": "dot"},
            name=f"layer {layer} control",
            legendgroup=str(layer),
            showlegend=True,
        )
    baseline = float(frame["majority_score"].mean())
    fig.add_hline(y=baseline, line_dash="dash", annotation_text="majority")
    fig.update_layout(
        xaxis={"type": "log", "title": "checkpoint step + 1"},
        yaxis_title=frame["metric"].iloc[0],
        title=f"{frame['model'].iloc[0]} · {label_set} over training",
    )
    return fig


def _select(rows: pd.DataFrame, label_set: str, model: str | None) -> pd.DataFrame:
    frame = rows[rows["label_set"] == label_set]
    if model is not None:
        frame = frame[frame["model"] == model]
    if frame.empty:
        have = sorted(rows["label_set"].unique())
        raise ProbeError(
            f"no probe rows for label set {label_set!r}"
            + (f" and model {model!r}" if model else "")
            + f"; label sets present: {have}"
        )
    if frame["model"].nunique() > 1:
        raise ProbeError(f"rows hold several models {sorted(frame['model'].unique())}; pass model=")
    return frame
