"""Massive activations: layer × checkpoint heatmap, top dimensions and tokens, fitted emergence curves."""

from __future__ import annotations

import streamlit as st

from workbench.analyses.massive.analysis import ANALYSIS
from workbench.analyses.massive.figures import checkpoint_heatmap, emergence_curves, ratio_by_layer
from workbench.app.data import empty_state, model_select, open_workspace_or_stop, pick, table

LAYERS, TOP, FITS = (t.name for t in ANALYSIS.tables)

st.title("Massive activations")
db = open_workspace_or_stop()
layers = table(db, LAYERS)
if layers is None or layers.empty:
    empty_state(ANALYSIS.description, f"{ANALYSIS.command}    # e.g. MODEL = code-small, DATA = notes.txt")
    st.stop()
model = model_select(layers)
rows = pick(layers[layers["model"] == model], "dataset", "prompt set")
dataset = rows["dataset"].iloc[0] if "dataset" in rows else None
metric = st.radio(
    "metric", ["ratio", "top1", "median"], horizontal=True, help="ratio = top-1 magnitude / median"
)
checkpoints = rows["checkpoint"].dropna().unique()
if len(checkpoints) > 1:
    st.plotly_chart(checkpoint_heatmap(rows, metric), width="stretch")
    fits = table(db, FITS)
    if fits is not None:
        fits = fits[(fits["model"] == model) & ((fits["dataset"] == dataset) if "dataset" in fits else True)]
    st.plotly_chart(emergence_curves(rows, fits, metric="top1"), width="stretch")
    if fits is not None and not fits.empty:
        st.subheader("Emergence fits per layer")
        columns = [
            c
            for c in fits.columns
            if c.startswith(
                (
                    "layer",
                    "family",
                    "status",
                    "r2",
                    "aic",
                    "param_",
                    "stderr_",
                    "peak_",
                    "emergence_",
                    "steady_",
                )
            )
        ]
        st.dataframe(fits[columns].sort_values("layer"), width="stretch", hide_index=True)
else:
    st.plotly_chart(ratio_by_layer(rows), width="stretch")
st.subheader("Top dimensions and tokens")
top = table(db, TOP)
if top is not None and not top.empty:
    top = top[(top["model"] == model) & ((top["dataset"] == dataset) if "dataset" in top else True)]
    step = st.selectbox(
        "checkpoint",
        sorted(top["checkpoint"].dropna().unique().tolist()) or [None],
        index=None,
        placeholder="latest",
    )
    if step is None and top["checkpoint"].notna().any():
        step = top["checkpoint"].max()
    shown = top if step is None else top[top["checkpoint"] == step]
    st.dataframe(
        shown[
            [
                "hook",
                "rank",
                "magnitude",
                "dim",
                "token",
                "position",
                "ratio",
                "spread",
                "occurrences",
                "massive",
            ]
        ],
        width="stretch",
        hide_index=True,
    )
