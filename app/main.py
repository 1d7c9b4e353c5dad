"""Workbench dashboard: `workbench dashboard [--workspace DIR]` (binds 127.0.0.1 unless told otherwise)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

VIEWS = Path(__file__).parent / "views"

st.set_page_config(
    page_title="Interpretability workbench", page_icon="🔬", layout="wide"
)  # no icon fetched from a CDN


pages = [
    st.Page(VIEWS / "overview.py", title="Overview", icon=":material/home:", default=True),
    st.Page(VIEWS / "massive.py", title="Massive activations", icon=":material/bolt:"),
    st.Page(VIEWS / "attention.py", title="Attention statistics", icon=":material/visibility:"),
    st.Page(VIEWS / "dynamics.py", title="Training dynamics", icon=":material/timeline:"),
    st.Page(VIEWS / "probes.py", title="Probes", icon=":material/science:"),
    st.Page(VIEWS / "sae.py", title="SAE features", icon=":material/scatter_plot:"),
    st.Page(VIEWS / "graph.py", title="Attribution graphs", icon=":material/account_tree:"),
    st.Page(VIEWS / "codebooks.py", title="Codebooks", icon=":material/grid_view:"),
    st.Page(VIEWS / "neuron_paths.py", title="Neuron paths", icon=":material/route:"),
    st.Page(VIEWS / "prompt_lab.py", title="Prompt lab", icon=":material/edit_note:"),
]
st.navigation(pages).run()
