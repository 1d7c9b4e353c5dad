"""Probes: accuracy and selectivity per layer × checkpoint, curves over training, per-label-set details."""

from __future__ import annotations

import streamlit as st

from workbench.app.data import empty_state, model_select, open_workspace_or_stop, pick, table
from workbench.probes.analysis import ANALYSIS
from workbench.probes.figures import probe_heatmap, probe_over_checkpoints

METRICS = {
    "score": "held-out probe accuracy (R² for regression)",
    "selectivity": "accuracy − control-task accuracy (Hewitt & Liang)",
    "control_score": "control-task accuracy: a random label per token type",
    "token_identity_score": "best lookup from token type to the label",
    "random_init_score": "the same probe on a randomly initialised model",
}

st.title("Probes")
db = open_workspace_or_stop()
rows = table(db, ANALYSIS.tables[0].name)
if rows is None or rows.empty:
    empty_state(
        ANALYSIS.description or "probes",
        f"{ANALYSIS.command}    # e.g. workbench probe jobs run examples/zoo_probes.toml",
    )
    st.stop()
left, right = st.columns(2)
model = model_select(rows, container=left)
rows = rows[rows["model"] == model]
label_set = right.selectbox("label set", sorted(rows["label_set"].unique()))
rows = rows[rows["label_set"] == label_set]
rows = pick(rows, "dataset")
available = [m for m in METRICS if m in rows and rows[m].notna().any()]
metric = st.radio(
    "metric",
    available,
    horizontal=True,
    format_func=lambda m: m.replace("_", " "),
    help="; ".join(f"{m}: {METRICS[m]}" for m in available),
)
if rows["checkpoint"].nunique() > 1:
    st.plotly_chart(probe_heatmap(rows, label_set, metric), width="stretch")
    st.plotly_chart(probe_over_checkpoints(rows, label_set), width="stretch")
last = rows[rows["checkpoint"] == rows["checkpoint"].max()] if rows["checkpoint"].notna().any() else rows
if last["score"].isna().all():
    st.warning(
        "Every probe of the last checkpoint failed to score (NaN); see `workbench probe jobs status JOB.toml`."
    )
    st.stop()
best = last.loc[last["score"].idxmax()]
cols = st.columns(4)
cols[0].metric("best layer (last checkpoint)", str(best["hook"]))
cols[1].metric("accuracy", f"{best['score']:.3f}")
cols[2].metric(
    "selectivity", f"{best['selectivity']:.3f}" if best["selectivity"] == best["selectivity"] else "–"
)
cols[3].metric("majority baseline", f"{best['majority_score']:.3f}")
st.caption(
    "On small vocabularies (the zoo's) token identity is linearly decodable everywhere, so the control task "
    "saturates; compare the score with the token-identity and random-init baselines."
)
st.subheader("All rows")
declared = ANALYSIS.tables[0].columns  # the scores and fit facts, in the table's declared order
shown = [c for c in ("checkpoint", "hook", "layer", *declared[declared.index("score") :]) if c in rows]
st.dataframe(rows[shown].sort_values(["checkpoint", "layer"]), width="stretch", hide_index=True)
