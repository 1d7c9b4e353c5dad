"""Figures of the prompt lab (plotly), for the dashboard page and notebooks: a layer × token heatmap of a residual
profile, one head's attention pattern, next-token (or class) bars clean vs intervened, and per-patch values drawn
on an image. They read what :mod:`workbench.analyses.prompt_lab.analysis` returns; none runs the model."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go
import torch


def profile_heatmap(profile: pd.DataFrame, metric: str = "max_abs") -> go.Figure:
    """Layer × token heatmap of a :func:`~workbench.analyses.prompt_lab.analysis.residual_profile` column
    (resid_norm or max_abs)."""
    grid = profile.pivot_table(index="layer", columns="position", values=metric)
    labels = profile.drop_duplicates("position").sort_values("position")["token"].map(repr).tolist()
    fig = go.Figure(
        go.Heatmap(
            z=grid.values,
            x=[f"{i}:{t}" for i, t in enumerate(labels)],
            y=grid.index,
            colorscale="Viridis",
            colorbar={"title": metric},
        )
    )
    fig.update_layout(
        title=f"{metric} per layer × token", xaxis_title="token", yaxis_title="layer", height=320
    )
    return fig


def pattern_heatmap(pattern: torch.Tensor, tokens: Sequence[str], layer: int, head: int) -> go.Figure:
    """The [query, key] pattern of one head with token labels."""
    labels = [f"{i}:{t!r}" for i, t in enumerate(tokens)]
    fig = go.Figure(go.Heatmap(z=pattern.numpy(), x=labels, y=labels, colorscale="Blues", zmin=0, zmax=1))
    fig.update_layout(
        title=f"L{layer}H{head} attention pattern",
        xaxis_title="key",
        yaxis_title="query",
        yaxis_autorange="reversed",
        height=420,
    )
    return fig


def next_token_figure(table: pd.DataFrame, title: str = "next-token probability") -> go.Figure:
    """Grouped bars of p_clean and p_intervened per output of a :class:`~workbench.analyses.prompt_lab.analysis.NextTokenComparison` table."""
    labels = table["token"].map(repr)
    fig = go.Figure(
        [
            go.Bar(name="clean", x=labels, y=table["p_clean"]),
            go.Bar(name="intervened", x=labels, y=table["p_intervened"]),
        ]
    )
    fig.update_layout(barmode="group", title=title, yaxis_title="p", height=320)
    return fig


def patch_figure(pixels: torch.Tensor, values: torch.Tensor, title: str, colorbar: str = "") -> go.Figure:
    """The image ``pixels`` [1, C, H, W] in grey with per-patch ``values`` [rows, columns] (:func:`~workbench.analyses.prompt_lab.analysis.patch_grid`)
    drawn over it, each patch's value written on it."""
    image = pixels[0].float().mean(0).numpy()  # [H, W]
    rows, cols = values.shape
    height, width = image.shape
    ys = [(r + 0.5) * height / rows - 0.5 for r in range(rows)]
    xs = [(c + 0.5) * width / cols - 0.5 for c in range(cols)]
    grid = values.numpy()
    fig = go.Figure(
        [
            go.Heatmap(z=image, colorscale="Greys", reversescale=True, showscale=False, hoverinfo="skip"),
            go.Heatmap(
                z=grid,
                x=xs,
                y=ys,
                colorscale="RdBu_r" if (grid < 0).any() else "Viridis",
                opacity=0.55,
                zmid=0 if (grid < 0).any() else None,
                colorbar={"title": colorbar},
                text=[[f"{v:.3g}" for v in row] for row in grid],
                texttemplate="%{text}",
                hovertemplate="patch (%{y:.0f}, %{x:.0f}): %{z:.4g}<extra></extra>",
            ),
        ]
    )
    fig.update_layout(
        title=title,
        height=360,
        yaxis={"autorange": "reversed", "scaleanchor": "x"},
        xaxis={"showticklabels": False},
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
    )
    fig.update_yaxes(showticklabels=False)
    return fig
