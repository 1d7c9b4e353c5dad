"""Attention statistics from the fused kernel: entropy and sink mass per layer × head, over checkpoints."""

from __future__ import annotations

import streamlit as st

from workbench.app.data import empty_state, open_workspace_or_stop, pick, table
from workbench.attention.summary import ANALYSIS, STAT_HOOKS, layer_head_heatmap, statistic_over_checkpoints

st.title("Attention statistics")
db = open_workspace_or_stop()
stats = table(db, ANALYSIS.tables[0].name)
if stats is None or stats.empty:
    empty_state(
        ANALYSIS.description, f"{ANALYSIS.command} --kernel    # e.g. MODEL = code-small, DATA = notes.txt"
    )
    st.stop()
model = st.selectbox("model", sorted(stats["model"].unique()))
rows = pick(stats[stats["model"] == model], "dataset", "prompt set")
statistic = st.radio("statistic", STAT_HOOKS, horizontal=True)
steps = sorted(int(s) for s in rows["checkpoint"].dropna().unique())
step = (
    st.select_slider("checkpoint", steps, value=steps[-1])
    if len(steps) > 1
    else (steps[0] if steps else None)
)
st.plotly_chart(layer_head_heatmap(rows, statistic, checkpoint=step), use_container_width=True)
if len(steps) > 1:
    st.plotly_chart(statistic_over_checkpoints(rows, statistic), use_container_width=True)
st.dataframe(rows, use_container_width=True, hide_index=True)
