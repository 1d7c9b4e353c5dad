"""Figures of the attention statistics (plotly): a layer × head heatmap of one statistic and its head-averaged
value per layer over training. Both read ``attention_stats`` rows (or an ``attention_statistics`` frame)."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go


def layer_head_heatmap(
    table: pd.DataFrame, statistic: str = "entropy", checkpoint: int | None = None
) -> go.Figure:
    """Heatmap layer × head of one statistic (the latest checkpoint unless ``checkpoint`` is given)."""
    if checkpoint is None and table["checkpoint"].notna().any():
        checkpoint = int(table["checkpoint"].max())
    rows = table if checkpoint is None else table[table["checkpoint"] == checkpoint]
    grid = rows.pivot_table(index="layer", columns="head", values=statistic)
    title = f"attention {statistic} per layer × head" + (
        f" (step {checkpoint})" if checkpoint is not None else ""
    )
    return px.imshow(grid, labels={"x": "head", "y": "layer", "color": statistic}, title=title, aspect="auto")


def statistic_over_checkpoints(table: pd.DataFrame, statistic: str = "sink") -> go.Figure:
    """One line per layer: the head-averaged statistic against training step (log x axis)."""
    per_layer = table.groupby(["checkpoint", "layer"], as_index=False)[statistic].mean()
    # step 0 has no place on a log axis: it is drawn at half the first positive step, labelled "0"
    positive = per_layer.loc[per_layer["checkpoint"] > 0, "checkpoint"]
    zero_at = float(positive.min()) / 2 if len(positive) else 1.0
    per_layer["step_axis"] = per_layer["checkpoint"].astype(float).where(per_layer["checkpoint"] > 0, zero_at)
    fig = px.line(
        per_layer,
        x="step_axis",
        y=statistic,
        color="layer",
        markers=True,
        log_x=True,
        hover_data={"checkpoint": True, "step_axis": False},
        title=f"mean attention {statistic} over training",
        labels={"step_axis": "step"},
    )
    return fig
