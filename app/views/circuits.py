"""Transcoder circuits: the greedy path search from a target feature or from the next-token logits, drawn over
layer × position, with its table."""

from __future__ import annotations

import streamlit as st

from workbench.app.data import empty_state, model_select, open_workspace_or_stop, table
from workbench.circuits.transcoder_circuits import ANALYSIS, NODE_COLUMNS, CircuitGraph

(CIRCUITS,) = (t.name for t in ANALYSIS.tables)

st.title("Transcoder circuits")
db = open_workspace_or_stop()
rows = table(db, CIRCUITS)
if rows is None or rows.empty:
    empty_state(ANALYSIS.description or "transcoder circuits",
                f"{ANALYSIS.command}    # e.g. workbench sae circuit code-tiny --data zoo:python-stdlib "
                "--transcoder code-tiny.L0-mlp-transcoder --transcoder code-tiny.L1-mlp-transcoder")  # fmt: skip
    st.stop()
left, right = st.columns(2)
model = model_select(rows, container=left)
rows = rows[rows["model"] == model]
for column in ("checkpoint", "dataset"):
    if column in rows and rows[column].nunique() > 1:  # several runs of this model: show one at a time
        value = st.selectbox(
            column, sorted(rows[column].dropna().unique(), key=str, reverse=column == "checkpoint")
        )
        rows = rows[rows[column] == value]
target = right.selectbox(
    "root (L<layer>#<feature>@<position> or logits@<position>)", sorted(rows["target"].unique())
)
rows = rows[rows["target"] == target]
prompt = st.selectbox("prompt", sorted(rows["prompt"].unique()), format_func=lambda p: p[:80])
nodes = rows[rows["prompt"] == prompt].sort_values("id")
st.code(prompt, language="python")
root = nodes[nodes["parent"] < 0].iloc[0]
cols = st.columns(3)
if root["kind"] == "logit":
    cols[0].metric(f'logit of "{root["output"]}" (demeaned)', f"{root['attribution']:.3f}",
                   f"p = {root['probability']:.3f}", delta_color="off")  # fmt: skip
else:
    cols[0].metric("target pre-activation", f"{root['attribution']:.3f}")
cols[1].metric("nodes", len(nodes))
cols[2].metric("checkpoint", str(root["checkpoint"]))
graph = CircuitGraph(nodes[[c for c in NODE_COLUMNS if c in nodes]].reset_index(drop=True))
st.plotly_chart(graph.figure(), width="stretch")
st.caption(
    "Attributions are in units of the root's pre-activation (a feature) or demeaned logit (the final norm frozen "
    "at the prompt): transcoder features (activation × pullback), attention heads from a source position "
    "(pattern-weighted OV), token embeddings, transcoder errors. Export a logit-rooted circuit for circuit-tracer's "
    "viewer with `workbench circuits export MODEL --data DATA --transcoder ID ... --out DIR`."
)
shown = ["id", "parent", "node", "kind", "layer", "index", "position", "token", "attribution"]
st.dataframe(graph.labelled()[shown], width="stretch", hide_index=True)
