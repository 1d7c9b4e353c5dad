"""The "trace" control shared by the graph page and the prompt lab: a prompt, a model and saved transcoders → the
library's ``attribute`` (through ``graph_explorer.trace_prompt``), the graph stored in the workspace, then opened on
the graph page (the page picks up ``st.session_state["graph_pending"]`` before it draws its selects)."""

from __future__ import annotations

import time

import streamlit as st
from streamlit.errors import StreamlitAPIException

from workbench.app.data import workspace_path
from workbench.app.graph_explorer import trace_prompt
from workbench.circuits.sae.readout import saved_saes

GRAPH_PAGE = "views/graph.py"


def saved_transcoders() -> list[str]:
    """Ids of the workspace's saved transcoders (SAEs that write another hook than they read)."""
    return [s.sae_id for s in saved_saes(workspace_path()) if s.hook_out != s.hook_in]


def trace_form(model: str = "", prompt: str = "", *, key: str = "trace", on_graph_page: bool = True) -> None:
    """A form: model reference, transcoders (one per layer) and prompt → trace, store, open. Progress is shown per
    phase; a failure is shown as one error line and the page goes on."""
    with st.form(f"{key}_form"):
        model_ref = st.text_input(
            "model to trace",
            value=model,
            key=f"{key}_model",
            help="a workspace model name, a directory, a hub id",
        )
        chosen = st.multiselect("transcoders (one per layer)", saved_transcoders(), key=f"{key}_transcoders")
        text = st.text_area("prompt to trace", value=prompt, key=f"{key}_prompt", height=80)
        submitted = st.form_submit_button("trace")
    if not submitted:
        return
    if not model_ref or not chosen or not text:
        st.error("give a model, at least one transcoder and a prompt")
        return
    start = time.perf_counter()
    with st.status("tracing…", expanded=True) as status:
        try:
            model_id, graph_id = trace_prompt(workspace_path(), model_ref, chosen, text, step=status.write)
        except Exception as err:  # a user's model / transcoder / prompt problem: say it, keep the page
            status.update(label="trace failed", state="error")
            st.error(f"{type(err).__name__}: {err}")
            return
        status.update(
            label=f"graph {graph_id} stored in {time.perf_counter() - start:.1f}s", state="complete"
        )
    st.session_state["graph_pending"] = (model_id, graph_id)  # opened by the graph page, before its selects
    if on_graph_page:
        st.rerun()
    try:
        st.page_link(GRAPH_PAGE, label=f"open graph {graph_id} on the graph page", icon="🕸️")
    except StreamlitAPIException:  # a page run on its own (no navigation): name the page instead
        st.success(f"graph {graph_id} stored: open the Attribution graphs page, where it is selected")
