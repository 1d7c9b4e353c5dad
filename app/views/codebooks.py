"""Codebooks: results written by the analysis to the workspace's results database."""

from __future__ import annotations

import streamlit as st

from app.data import open_workspace_or_stop, table_browser

st.title("Codebooks")
db = open_workspace_or_stop()
table_browser(
    db, ["codebook_codes", "codebook_purity"], "codebook results", "workbench codebook train fsm-tiny"
)
