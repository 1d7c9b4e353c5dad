"""Figures of the massive-activation analysis (plotly): a per-input magnitude map, the top-1 / median ratio per
layer, and over a checkpoint series a layer × checkpoint heatmap and the emergence curves with their fits.

They read the frames of :mod:`workbench.analyses.massive.analysis` (``massive_layers`` rows, ``massive_fits``
rows); only :func:`magnitude_map` runs the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch

from workbench.analyses.dynamics.emergence import FAMILIES

if TYPE_CHECKING:
    from workbench.model import HookedModel


def magnitude_map(
    model: HookedModel, text: str | torch.Tensor, hooks: str = "blocks.*.hook_resid_post"
) -> go.Figure:
    """Heatmap layer × dimension of the largest |activation| over positions, for one input."""
    names = model.resolve(hooks)
    with torch.no_grad(), model.capture(names, dtype=torch.float32) as cache:
        model(text if isinstance(text, torch.Tensor) else [text])
    grid = torch.stack([cache[n][0].abs().amax(0) for n in names]).numpy()
    return px.imshow(
        grid,
        aspect="auto",
        color_continuous_scale="Viridis",
        labels={"x": "dimension", "y": "hook", "color": "max |a|"},
        y=names,
        title=f"{model.cfg.name}: max |activation| per dimension",
    )


def ratio_by_layer(layers: pd.DataFrame) -> go.Figure:
    """Top-1 / median per layer (log scale), one line per model/checkpoint."""
    frame = layers.assign(series=layers["model"] + " @ " + layers["checkpoint"].astype(str))
    return px.line(
        frame,
        x="layer",
        y="ratio",
        color="series",
        markers=True,
        log_y=True,
        title="top-1 magnitude / median per layer",
    )


def checkpoint_heatmap(layers: pd.DataFrame, metric: str = "ratio") -> go.Figure:
    """Heatmap layer × checkpoint of ``metric`` (log colour scale)."""
    grid = layers.pivot_table(index="layer", columns="checkpoint", values=metric)
    fig = px.imshow(
        np.log10(grid.clip(lower=1e-12)),
        aspect="auto",
        labels={"x": "checkpoint", "y": "layer", "color": f"log10 {metric}"},
        x=[str(c) for c in grid.columns],
        title=f"{metric} over training (log10)",
    )
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category")
    return fig


def emergence_curves(
    layers: pd.DataFrame, fits: pd.DataFrame | None = None, metric: str = "top1"
) -> go.Figure:
    """Per-layer metric over checkpoints (markers) with the fitted curves (lines) where a fit succeeded."""
    fig = go.Figure()
    for layer, group in layers.sort_values("checkpoint").groupby("layer"):
        steps = group["checkpoint"].to_numpy(dtype=float)
        fig.add_trace(
            go.Scatter(x=np.maximum(steps, 0.5), y=group[metric], mode="markers", name=f"layer {layer}")
        )
        if fits is not None:
            row = fits[(fits["layer"] == layer) & fits["status"].isin(["ok", "non_identifiable"])]
            if len(row):
                r = row.iloc[0]
                family = FAMILIES[r["family"]]
                params = [r[f"param_{p}"] for p in family.params]
                grid = np.geomspace(0.5, steps.max(), 200)
                fig.add_trace(
                    go.Scatter(
                        x=grid,
                        y=family.fn(grid, *params),
                        mode="lines",
                        name=f"layer {layer} fit ({r['status']}, R²={r['r2']:.2f})",
                        line={"dash": "solid" if r["status"] == "ok" else "dash"},
                    )
                )
    fig.update_layout(
        xaxis_type="log", xaxis_title="step", yaxis_title=metric, title=f"{metric} over training"
    )
    return fig
