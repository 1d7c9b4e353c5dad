"""Overview: what the workspace holds — models, checkpoint series, stores, and which analyses have results."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.data import open_workspace_or_stop, table, tables, workspace_path

st.title("Interpretability workbench")
workspace = workspace_path()
st.caption(f"workspace: `{workspace}`")
db = open_workspace_or_stop()

models_dir = workspace / "models"
series = []
if models_dir.is_dir():
    for model_dir in sorted(p for p in models_dir.iterdir() if p.is_dir()):
        steps = sorted(int(p.name[4:]) for p in model_dir.glob("step*") if p.name[4:].isdigit())
        series.append({"model": model_dir.name, "checkpoints": len(steps), "first step": steps[0] if steps else None,
                       "last step": steps[-1] if steps else None})  # fmt: skip
st.subheader("Models and checkpoint series")
if series:
    st.dataframe(pd.DataFrame(series), use_container_width=True, hide_index=True)
else:
    st.info("No models yet: `workbench zoo train code-tiny` trains one into this workspace.")

st.subheader("Computed results")
summary = []
for name in tables(db):
    rows = table(db, name)
    if rows is None:
        continue
    entry = {"table": name, "rows": len(rows)}
    for column in ("model", "checkpoint", "hook"):
        if column in rows:
            entry[f"{column}s"] = rows[column].nunique()
    summary.append(entry)
if summary:
    st.dataframe(pd.DataFrame(summary), use_container_width=True, hide_index=True)
else:
    st.info("The results database is empty: run `workbench demo` or an analysis command.")
