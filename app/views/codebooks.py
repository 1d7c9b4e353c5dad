"""Codebooks: per-code usage, code ↔ label purity and mutual information, top tokens and contexts per code."""

from __future__ import annotations

import plotly.express as px
import streamlit as st

from workbench.app.data import empty_state, model_select, open_workspace_or_stop, plain, table
from workbench.circuits.codebook import ANALYSIS, CODES_TABLE, PURITY_TABLE, TRAIN_COMMAND

st.title("Codebooks")
db = open_workspace_or_stop()
codes = table(db, CODES_TABLE)
if codes is None or codes.empty:
    empty_state(
        ANALYSIS.description or "codebook results",
        f"{TRAIN_COMMAND}    # e.g. fsm-tiny --data zoo:tokfsm\n{ANALYSIS.command}",
    )
    st.stop()
model = model_select(codes)
codes = codes[codes["model"] == model]
selected = {"model": model}
for column in ("checkpoint", "dataset", "run"):  # several runs of this model: show one at a time
    if column in codes and codes[column].nunique() > 1:
        selected[column] = st.selectbox(
            column, sorted(codes[column].dropna().unique(), key=str, reverse=column == "checkpoint")
        )
        codes = codes[codes[column] == selected[column]]
site = st.selectbox("site", sorted(codes["site"].dropna().unique()))
selected["site"] = site
codes = codes[codes["site"] == site].sort_values("count", ascending=False)
if "loss_gap" in codes and codes["loss_gap"].notna().any():
    st.metric("loss gap (codebook − original, nats)", f"{codes['loss_gap'].dropna().iloc[0]:+.3f}")
st.metric("live codes", len(codes))
usage = px.bar(
    codes,
    x=codes["code"].astype(str),
    y="count",
    hover_data=["top_tokens"],
    labels={"x": "code"},
    title="Code usage (sorted by count)",
)
usage.update_xaxes(type="category", categoryorder="total descending")
st.plotly_chart(usage, width="stretch")
purity = table(db, PURITY_TABLE)
if purity is not None and not purity.empty:
    for column, value in selected.items():
        if column in purity:
            purity = purity[purity[column] == value]
if purity is not None and not purity.empty:
    label_set = st.selectbox("label set", sorted(purity["label_set"].unique()))
    rows = purity[purity["label_set"] == label_set].sort_values("label")
    st.metric(f"mean best-code purity per {plain(label_set)} label", f"{rows['purity'].mean():.3f}")
    if "purity_ceiling" in rows and rows["purity_ceiling"].notna().any():
        st.metric(
            "ceiling (a code per exact state posterior)", f"{rows['purity_ceiling'].dropna().iloc[0]:.3f}"
        )
    st.caption(
        "Best code of a label = the code chosen most often on that label's tokens; purity = P(label | best code), "
        "recall = P(best code | label)."
    )
    st.plotly_chart(
        px.scatter(
            rows,
            x="label",
            y="purity",
            size="label_count",
            color="mi",
            hover_data=["best_code", "recall"],
            title=f"Best code per {label_set} label: purity (colour = MI, nats)",
        ),
        width="stretch",
    )
    st.subheader("Best code per label")
    st.dataframe(
        rows[["label", "best_code", "purity", "recall", "mi", "label_count"]],
        width="stretch",
        hide_index=True,
    )
else:
    empty_state(
        "code ↔ label purity (the dataset carried no per-token labels)",
        f"{ANALYSIS.command} --labels SOURCE    # e.g. fsm-tiny --data zoo:tokfsm",
    )
st.subheader("Codes (top contexts: highest code-input similarity first)")
columns = [
    c
    for c in ("code", "head", "count", "frequency", "best_label", "purity", "top_tokens", "top_contexts")
    if c in codes
]
st.dataframe(codes[columns], width="stretch", hide_index=True)
