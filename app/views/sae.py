"""SAE features: results written by the analysis to the workspace's results database."""

from __future__ import annotations

import streamlit as st

from app.data import open_workspace_or_stop, table_browser

st.title("SAE features")
db = open_workspace_or_stop()
table_browser(
    db,
    ["sae_evals", "sae_features"],
    "SAE evaluations and feature pages",
    "workbench sae train MODEL --hook blocks.0.hook_resid_post",
)
