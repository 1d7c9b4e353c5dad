"""Training dynamics: metrics × layers over steps with fits and emergence steps, the emergence order, per-head sink
vs massive magnitude, and the architecture sweep's predicted vs fitted parameters."""

from __future__ import annotations

import streamlit as st

from workbench.analyses.dynamics.analysis import ANALYSIS, METRICS, NO_HEAD, describe_order
from workbench.analyses.dynamics.figures import (
    metric_curves,
    order_chart,
    predicted_vs_fitted,
    sink_vs_massive,
)
from workbench.app.data import empty_state, model_select, open_workspace_or_stop, pick, table

METRIC_TABLE, FITS, ORDER, _, PREDICTOR, PREDICTIONS = ANALYSIS.table_names

st.title("Training dynamics")
db = open_workspace_or_stop()
metrics = table(db, METRIC_TABLE)
if metrics is None or metrics.empty:
    empty_state(
        ANALYSIS.description, f"{ANALYSIS.command}    # e.g. SERIES = code-small, DATA = zoo:python-stdlib"
    )
    st.stop()
model = model_select(metrics)
rows = pick(metrics[metrics["model"] == model], "dataset", "prompt set")
dataset = rows["dataset"].iloc[0]
fits = table(db, FITS)
if fits is not None:
    fits = fits[(fits["model"] == model) & (fits["dataset"] == dataset)]
order = table(db, ORDER)
if order is not None:
    order = order[(order["model"] == model) & (order["dataset"] == dataset)].sort_values("rank")

if order is not None and not order.empty:
    st.subheader("Emergence order")
    st.plotly_chart(order_chart(order), width="stretch")
    st.text(describe_order(order))

st.subheader("Metrics over training")
available = [m for m in METRICS if m in set(rows["metric"])] + sorted(set(rows["metric"]) - set(METRICS))
metric = str(
    st.radio(
        "metric",
        available,
        horizontal=True,
        format_func=lambda m: METRICS[m].phenomenon if m in METRICS else m,
    )
)
head: int | None = None
heads = sorted(int(h) for h in rows.loc[rows["metric"] == metric, "head"].unique() if h != NO_HEAD)
if heads:
    choice = st.selectbox("head", ["mean over heads", *map(str, heads)])
    head = None if choice == "mean over heads" else int(str(choice))
st.plotly_chart(metric_curves(rows, fits, metric, head=head), width="stretch")
if fits is not None and not fits.empty:
    shown = fits[fits["metric"] == metric]
    if head is not None:
        shown = shown[shown["head"] == head]
    columns = [
        c
        for c in shown.columns
        if c.startswith(
            (
                "layer",
                "head",
                "family",
                "status",
                "message",
                "r2",
                "condition_",
                "param_",
                "stderr_",
                "emergence_",
                "low_emergence",
                "high_emergence",
                "steady_",
                "low_steady",
                "high_steady",
                "selected",
            )
        )
    ]
    st.dataframe(shown[columns].sort_values(["layer", "head"]), width="stretch", hide_index=True)

if {"sink_mass", "massive_top1"} <= set(rows["metric"]):
    st.subheader("Per head: sink mass vs massive magnitude")
    st.plotly_chart(sink_vs_massive(rows), width="stretch")

scores = table(db, PREDICTOR)
predictions = table(db, PREDICTIONS)
st.subheader("Architecture sweep: predicted vs fitted parameters")
if scores is None or scores.empty or predictions is None:
    empty_state(
        "the architecture sweep", "workbench dynamics sweep SWEEP.toml    # e.g. examples/dynamics_sweep.toml"
    )
else:
    scores = pick(scores, "sweep", "sweep", key="sweep")
    sweep = scores["sweep"].iloc[0]
    scores = pick(scores, "metric", "fitted metric", key="sweep_metric")
    chosen = scores["metric"].iloc[0]
    st.dataframe(
        scores[["target", "r2", "n_rows", "n_architectures", "learnt_as", "claim", "note"]],
        width="stretch",
        hide_index=True,
    )
    shown = predictions[(predictions["sweep"] == sweep) & (predictions["metric"] == chosen)]
    if not shown.empty:
        st.plotly_chart(predicted_vs_fitted(shown, scores), width="stretch")
