"""Transcoder circuits: the greedy path search from a target feature, drawn over layer × position, with its table."""

from __future__ import annotations

import streamlit as st

from app.data import empty_state, open_workspace_or_stop, table
from circuits.transcoder_circuits import CIRCUIT_TABLE, CircuitGraph

st.title("Transcoder circuits")
db = open_workspace_or_stop()
rows = table(db, CIRCUIT_TABLE)
if rows is None or rows.empty:
    empty_state("transcoder circuits", "workbench demo    # or: circuits.transcoder_circuits.find_paths(...)")
    st.stop()
left, right = st.columns(2)
model = left.selectbox("model", sorted(rows["model"].unique()))
rows = rows[rows["model"] == model]
target = right.selectbox("target feature (layer#feature@position)", sorted(rows["target"].unique()))
rows = rows[rows["target"] == target]
prompt = st.selectbox("prompt", sorted(rows["prompt"].unique()), format_func=lambda p: p[:80])
nodes = rows[rows["prompt"] == prompt].sort_values("id")
st.code(prompt, language="python")
root = nodes[nodes["kind"] == "target"].iloc[0]
cols = st.columns(3)
cols[0].metric("target pre-activation", f"{root['attribution']:.3f}")
cols[1].metric("nodes", len(nodes))
cols[2].metric("checkpoint", str(root["checkpoint"]))
columns = ["id", "parent", "depth", "kind", "layer", "index", "position", "text", "attribution"]
st.plotly_chart(CircuitGraph(nodes[columns].reset_index(drop=True)).figure(), use_container_width=True)
st.caption(
    "Attributions are in units of the target's pre-activation: transcoder features (activation × pullback), "
    "attention heads from a source position (pattern-weighted OV), token embeddings."
)
st.dataframe(nodes[columns], use_container_width=True, hide_index=True)
