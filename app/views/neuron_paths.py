"""Neuron paths: joint-IG paths vs baselines, per-target neurons, and remove/enhance manipulation metrics."""

from __future__ import annotations

import plotly.express as px
import streamlit as st

from workbench.app.data import empty_state, model_select, open_workspace_or_stop, table
from workbench.circuits.neuron_path.analysis import ANALYSIS

PATHS, METRICS = (t.name for t in ANALYSIS.tables)

st.title("Neuron paths")
db = open_workspace_or_stop()
metrics = table(db, METRICS)
paths = table(db, PATHS)
if metrics is None or metrics.empty or paths is None or paths.empty:
    empty_state(
        ANALYSIS.description or "neuron paths",
        f"{ANALYSIS.command}    # e.g. workbench neuron-path run vit-digits --data zoo:digits",
    )
    st.stop()
model = model_select(metrics)
rows = metrics[metrics["model"] == model]
neurons = paths[paths["model"] == model]
for column, label in (("checkpoint", "checkpoint"), ("dataset", "dataset"), ("position", "position")):
    if column in rows and rows[column].nunique() > 1:  # several runs of this model: show one at a time
        value = st.selectbox(
            label, sorted(rows[column].dropna().unique(), key=str, reverse=column == "checkpoint")
        )
        rows, neurons = rows[rows[column] == value], neurons[neurons[column] == value]
st.subheader("Methods compared (averaged over targets)")
score_fig = px.bar(
    rows, x="method", y="joint_score", color="method", title="Joint IG score of each method's path"
)
st.plotly_chart(score_fig, width="stretch")
long = rows.melt(
    id_vars="method",
    value_vars=[
        "remove_prob_ratio",
        "enhance_prob_ratio",
        "remove_accuracy_change",
        "enhance_accuracy_change",
    ],
    var_name="metric",
)
st.plotly_chart(
    px.bar(long, x="metric", y="value", color="method", barmode="group", title="Remove (×0) / enhance (×2)"),
    width="stretch",
)
st.dataframe(rows, width="stretch", hide_index=True)
st.subheader("Path neurons per target")
method = st.radio("method", sorted(neurons["method"].unique()), horizontal=True)
chosen = neurons[neurons["method"] == method]
fig = px.scatter(
    chosen,
    x="layer",
    y="neuron",
    color=chosen["target"].astype(str),
    hover_data=["target", "rank", "joint_score"],
    title=f"{method}: neuron chosen per layer",
)
fig.update_traces(mode="lines+markers")
st.plotly_chart(fig, width="stretch")
st.dataframe(chosen.sort_values(["target", "layer", "rank"]), width="stretch", hide_index=True)
