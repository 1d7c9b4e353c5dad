"""Neuron paths: results written by the analysis to the workspace's results database."""

from __future__ import annotations

import streamlit as st

from app.data import open_workspace_or_stop, table_browser

st.title("Neuron paths")
db = open_workspace_or_stop()
table_browser(db, ["neuron_paths"], "neuron paths", "workbench neuron-path run vit-digits")
