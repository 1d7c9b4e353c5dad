"""Probes: results written by the analysis to the workspace's results database."""

from __future__ import annotations

import streamlit as st

from app.data import open_workspace_or_stop, table_browser

st.title("Probes")
db = open_workspace_or_stop()
table_browser(db, ["probe_results"], "probe results", "workbench probe run jobs.toml")
