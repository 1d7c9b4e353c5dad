"""Figures of the training-dynamics analysis (plotly): one metric over training with its fits, the emergence order,
per head sink mass against the massive magnitude entering its layer, and the architecture sweep's predicted vs
fitted parameters.

They read the frames of :mod:`workbench.analyses.dynamics.analysis` (``dynamics_metrics``, ``dynamics_fits``,
``dynamics_order`` rows) and of the sweep (``dynamics_predictions``, ``dynamics_predictor``); none runs a model.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from workbench.analyses.dynamics.analysis import METRICS, NO_HEAD
from workbench.analyses.dynamics.emergence import FAMILIES


def _step_axis(steps: Iterable[float]) -> tuple[np.ndarray, float]:
    """Steps [n] as x on a log axis (step 0 drawn at half the first positive step) and that position of step 0."""
    values = np.asarray(list(steps), dtype=float)
    positive = values[values > 0]
    zero_at = float(positive.min()) / 2 if len(positive) else 0.5
    return np.where(values > 0, values, zero_at), zero_at


def metric_curves(
    metrics: pd.DataFrame, fits: pd.DataFrame | None, metric: str, head: int | None = None
) -> go.Figure:
    """One metric over training, one trace per layer: markers with standard errors, the selected fit as a line
    (dashed when non-identifiable) and its emergence step as a dotted vertical line. A per-head metric shows one
    ``head`` with its fits, or (``head=None``) the mean over heads without fits. Step 0 is drawn at half the first
    positive step on the log axis."""
    rows = metrics[metrics["metric"] == metric]
    per_head = bool((rows["head"] != NO_HEAD).any())
    if per_head and head is not None:
        rows = rows[rows["head"] == head]
    per_layer = rows.groupby(["layer", "checkpoint"], as_index=False).agg(
        value=("value", "mean"), sem=("sem", "mean")
    )
    fig = go.Figure()
    if per_layer.empty:
        return fig
    _, zero_at = _step_axis(per_layer["checkpoint"])
    grid = np.geomspace(zero_at, float(per_layer["checkpoint"].max()), 200)
    show_fits = fits is not None and not fits.empty and (not per_head or head is not None)
    for i, (layer, group) in enumerate(per_layer.groupby("layer")):
        colour = _colour(i)
        x, _ = _step_axis(group["checkpoint"])
        label = "embedding" if layer < 0 else f"layer {layer}"
        fig.add_trace(
            go.Scatter(
                x=x,
                y=group["value"],
                mode="markers",
                name=label,
                marker={"color": colour},
                error_y={"type": "data", "array": group["sem"], "visible": True},
            )
        )
        if not show_fits:
            continue
        assert fits is not None
        chosen = fits[
            (fits["metric"] == metric)
            & (fits["layer"] == layer)
            & fits["selected"].astype(bool)
            & (fits["head"] == (head if per_head else NO_HEAD))
        ]
        for _, fit in chosen.iterrows():
            family = FAMILIES[fit["family"]]
            with np.errstate(all="ignore"):
                curve = family.fn(grid, *[fit[f"param_{p}"] for p in family.params])
            dash = "solid" if fit["status"] == "ok" else "dash"
            fig.add_trace(
                go.Scatter(
                    x=grid,
                    y=curve,
                    mode="lines",
                    line={"color": colour, "dash": dash},
                    name=f"{label} {fit['family']} ({fit['status']}, R²={fit['r2']:.2f})",
                )
            )
            if np.isfinite(fit["emergence_step"]):
                fig.add_vline(
                    x=max(float(fit["emergence_step"]), zero_at), line={"color": colour, "dash": "dot"}
                )
    where = f" (head {head})" if per_head and head is not None else (" (mean over heads)" if per_head else "")
    fig.update_layout(
        xaxis_type="log",
        xaxis_title="step",
        yaxis_title=metric,
        title=f"{metric}{where}: {METRICS[metric].description if metric in METRICS else metric}",
    )
    return fig


def _colour(i: int) -> str:
    palette = px.colors.qualitative.Plotly
    return palette[i % len(palette)]


def order_chart(order: pd.DataFrame) -> go.Figure:
    """Emergence steps of the phenomena with their bootstrap intervals (log step axis), earliest at the top."""
    shown = order[np.isfinite(order["emergence_step"].astype(float))]
    low = shown.get("low_emergence_step", shown["emergence_step"])
    high = shown.get("high_emergence_step", shown["emergence_step"])
    labels = [
        f"{r['phenomenon']} (L{int(r['layer'])}" + (f" H{int(r['head'])})" if r["head"] != NO_HEAD else ")")
        for _, r in shown.iterrows()
    ]
    fig = go.Figure(
        go.Scatter(
            x=shown["emergence_step"],
            y=labels,
            mode="markers",
            error_x={
                "type": "data",
                "symmetric": False,
                "array": (high - shown["emergence_step"]).fillna(0),
                "arrayminus": (shown["emergence_step"] - low).fillna(0),
            },
        )
    )
    fig.update_layout(
        xaxis_type="log",
        xaxis_title="emergence (half-rise) step",
        title="emergence order",
        yaxis={"autorange": "reversed"},
    )
    return fig


def sink_vs_massive(metrics: pd.DataFrame, checkpoint: int | None = None) -> go.Figure:
    """Per head: its sink mass against the massive (top-1) magnitude of the residual stream entering its layer
    (the embedding for layer 0), over every checkpoint (or one), coloured by log10 step."""
    sink = metrics[metrics["metric"] == "sink_mass"][["checkpoint", "layer", "head", "value"]]
    top = metrics[metrics["metric"] == "massive_top1"][["checkpoint", "layer", "value"]]
    top = top.assign(layer=top["layer"] + 1).rename(columns={"value": "massive_top1_in"})
    joined = sink.merge(top, on=["checkpoint", "layer"]).rename(columns={"value": "sink_mass"})
    if checkpoint is not None:
        joined = joined[joined["checkpoint"] == checkpoint]
    joined = joined.assign(
        log10_step=np.log10(joined["checkpoint"].clip(lower=0) + 1),
        head_label="L" + joined["layer"].astype(str) + " H" + joined["head"].astype(str),
    )
    return px.scatter(
        joined,
        x="massive_top1_in",
        y="sink_mass",
        color="log10_step",
        symbol="layer",
        hover_data=["checkpoint", "head_label"],
        log_x=True,
        title="per head: sink mass vs the massive magnitude entering its layer",
    )


def predicted_vs_fitted(predictions: pd.DataFrame, scores: pd.DataFrame | None = None) -> go.Figure:
    """The sweep's out-of-fold predicted vs fitted value per target (one panel each), with the identity line."""
    fig = px.scatter(
        predictions,
        x="fitted",
        y="predicted",
        color="model",
        facet_col="target",
        facet_col_wrap=3,
        hover_data=["layer"],
        title="architecture → parameter predictor (leave one architecture out)",
    )
    fig.update_xaxes(matches=None)
    fig.update_yaxes(matches=None)
    if scores is not None:
        r2 = dict(zip(scores["target"], scores["r2"], strict=True))
        fig.for_each_annotation(
            lambda a: a.update(
                text=f"{a.text.split('=')[-1]} (R²={r2.get(a.text.split('=')[-1], np.nan):.2f})"
            )
        )
    return fig
