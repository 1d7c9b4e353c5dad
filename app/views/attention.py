"""Attention statistics from the fused kernel: entropy and sink mass per layer × head, over checkpoints."""

from __future__ import annotations

import streamlit as st

from workbench.analyses.attention.analysis import ANALYSIS
from workbench.analyses.attention.figures import layer_head_heatmap, statistic_over_checkpoints
from workbench.app.data import empty_state, model_select, open_workspace_or_stop, pick, table
from workbench.attention.statistics import STAT_HOOKS

st.title("Attention statistics")
db = open_workspace_or_stop()
stats = table(db, ANALYSIS.tables[0].name)
if stats is None or stats.empty:
    empty_state(
        ANALYSIS.description, f"{ANALYSIS.command} --kernel    # e.g. MODEL = code-small, DATA = notes.txt"
    )
    st.stop()
model = model_select(stats)
rows = pick(stats[stats["model"] == model], "dataset", "prompt set")
statistic = st.radio("statistic", STAT_HOOKS, horizontal=True)
steps = sorted(int(s) for s in rows["checkpoint"].dropna().unique())
step = (
    st.select_slider("checkpoint", steps, value=steps[-1])
    if len(steps) > 1
    else (steps[0] if steps else None)
)
st.plotly_chart(layer_head_heatmap(rows, statistic, checkpoint=step), width="stretch")
if len(steps) > 1:
    st.plotly_chart(statistic_over_checkpoints(rows, statistic), width="stretch")
st.dataframe(rows, width="stretch", hide_index=True)
