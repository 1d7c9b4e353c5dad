"""Overview: what the workspace holds — models and checkpoint series, runs (stores, probe jobs, SAEs, codebooks),\nand which analyses have results."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from workbench.analysis import registered_analyses
from workbench.app.data import open_workspace_or_stop, plain, result_models, row_counts, workspace_path

st.title("Interpretability workbench")
workspace = workspace_path()
st.caption(f"workspace: {plain(workspace)}")
db = open_workspace_or_stop()

models_dir = workspace / "models"
series = []
if models_dir.is_dir():
    for model_dir in sorted(p for p in models_dir.iterdir() if p.is_dir()):
        steps = sorted(int(p.name[4:]) for p in model_dir.glob("step*") if p.name[4:].isdigit())
        series.append(
            {
                "model": model_dir.name,
                "identity": model_dir.name,
                "checkpoints": len(steps),
                "first step": steps[0] if steps else None,
                "last step": steps[-1] if steps else None,
                "where": "workspace models/",
            }
        )
with_results = result_models(db)
saved = {row["identity"]: row for row in series}
for row in with_results.to_dict("records"):
    if row["identity"] in saved:
        saved[row["identity"]]["tables"] = row["tables"]
    else:
        series.append({**row, "where": "results only (its checkpoints with results)"})
st.subheader("Models and checkpoint series")
if series:
    st.dataframe(pd.DataFrame(series), width="stretch", hide_index=True)
    st.caption(
        "model: the short name tables show; identity: the reference rows record (a workspace model's name, "
        "a directory's path, a hub id); tables: the result tables holding its rows"
    )
else:
    st.info(
        "No models and no results yet: `workbench zoo train code-tiny` trains one into this workspace, and any "
        "analysis of your own model (e.g. `workbench massive run DIR`) lists it here."
    )

st.subheader("Runs")
RUN_KINDS = {
    "stores": "activation store",
    "jobs": "probe job state",
    "saes": "SAE / transcoder",
    "codebooks": "codebook run",
}
runs = []
for folder, kind in RUN_KINDS.items():
    root = workspace / folder
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            if entry.name.startswith("."):
                continue
            modified = pd.Timestamp(entry.stat().st_mtime, unit="s").floor("s")
            runs.append({"kind": kind, "name": entry.name, "modified (UTC)": modified})
if runs:
    st.dataframe(pd.DataFrame(runs), width="stretch", hide_index=True)
else:
    st.info("No stores, probe jobs, SAEs or codebook runs yet: `workbench demo` makes one of each.")

st.subheader("Analyses")
summary = row_counts(db)
counts = (
    dict(zip(summary["table"], summary["rows"], strict=True))
    if not summary.empty and "rows" in summary
    else {}
)
catalogue = [
    {
        "analysis": analysis.name,
        "tables": ", ".join(analysis.table_names),
        "rows": sum(int(counts.get(t, 0)) for t in analysis.table_names),
        "command": analysis.command,
        "what": analysis.description,
    }
    for analysis in registered_analyses().values()
]
st.dataframe(pd.DataFrame(catalogue), width="stretch", hide_index=True)

st.subheader("Computed results")
if not summary.empty:
    st.dataframe(summary, width="stretch", hide_index=True)
else:
    st.info("The results database is empty: run `workbench demo` or an analysis command.")
