"""Attribution graphs: pick a stored graph, prune it on the server at the chosen thresholds (the library's
``prune``), draw the pruned subgraph as circuit-tracer lays it out, and inspect a node's edges and head loadings."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from workbench.app.data import empty_state, model_select, open_workspace_or_stop, plain, table, workspace_path
from workbench.app.graph_explorer import (
    MAX_EDGES,
    MAX_NODES,
    StoredGraphProblem,
    Subgraph,
    graph_figure,
    stored_graph,
    subgraph,
)
from workbench.circuits.attribution.store import ANALYSIS, read_graph
from workbench.circuits.attribution.transcoders import AttributionError

st.title("Attribution graphs")
db = open_workspace_or_stop()
graphs = table(db, "attribution_graphs")
if graphs is None or graphs.empty:
    empty_state(ANALYSIS.description or "attribution graphs",
                f"{ANALYSIS.command}    # e.g. workbench circuits attribute code-tiny --transcoders "
                "code-tiny.L0-mlp-transcoder code-tiny.L1-mlp-transcoder --prompt 'def f(x):'")  # fmt: skip
    st.stop()


@st.cache_data(show_spinner=False, max_entries=4)
def _frames(path: str, mtime: float, model: str, graph: str) -> dict[str, pd.DataFrame]:
    return read_graph(workspace_path(), model, graph)


@st.cache_data(show_spinner="pruning…", max_entries=32)
def _pruned(
    path: str, mtime: float, model: str, graph: str, node_threshold: float, edge_threshold: float
) -> Subgraph:
    frames = _frames(path, mtime, model, graph)
    return subgraph(stored_graph(frames), frames["attribution_nodes"], node_threshold, edge_threshold)


left, right = st.columns([1, 3])
model = model_select(graphs, key="graph_model", container=left)
graphs = graphs[graphs["model"] == model]


def _describe(graph_id: str) -> str:
    row = graphs[graphs["graph"] == graph_id].iloc[0]
    targets = ", ".join(json.loads(row["targets"]))
    step = "" if pd.isna(row["checkpoint"]) else f" @step {int(row['checkpoint'])}"
    return f"{row['prompt'][:60]!r} → {targets[:60]}{step} [{graph_id}]"


graph_id = right.selectbox("graph", sorted(graphs["graph"]), format_func=_describe, key="graph_id")
summary = graphs[graphs["graph"] == graph_id].iloc[0]
mtime = db.stat().st_mtime
try:
    frames = _frames(str(db), mtime, model, graph_id)
except AttributionError as err:
    st.error(str(err))
    st.stop()
cols = st.columns(5)
cols[0].metric("replacement score", f"{summary['replacement_score']:.3f}")
cols[1].metric("completeness score", f"{summary['completeness_score']:.3f}")
cols[2].metric("features (of active)", f"{int(summary['n_features'])} / {int(summary['n_active'])}")
cols[3].metric("nodes stored", int(summary["n_nodes"]))
cols[4].metric("edges stored", int(summary["n_edges"]))
st.caption(f"transcoders: {', '.join(json.loads(summary['transcoders']))}")
node_col, edge_col = st.columns(2)
node_threshold = node_col.slider(
    "node threshold (share of influence kept)", 0.05, 1.0, 0.8, 0.01, key="node_t"
)
edge_threshold = edge_col.slider(
    "edge threshold (share of edge score kept)", 0.05, 1.0, 0.98, 0.01, key="edge_t"
)
try:
    shown = _pruned(str(db), mtime, model, graph_id, node_threshold, edge_threshold)
    built = stored_graph(frames)
except StoredGraphProblem as err:
    st.error(str(err))
    st.stop()
st.markdown(f"pruned: **{shown.pruned_nodes}** nodes, **{shown.pruned_edges}** edges; drawn: "
            f"**{len(shown.nodes)}** nodes, **{len(shown.edges)}** edges")  # fmt: skip
if shown.capped:
    st.warning(
        f"The pruned graph has {shown.pruned_nodes} nodes and {shown.pruned_edges} edges; only the "
        f"{len(shown.nodes)} most influential nodes (≤ {MAX_NODES}) and the {len(shown.edges)} largest edges among "
        f"them (≤ {MAX_EDGES}) are sent to the browser. Lower the thresholds to see a complete pruned graph."
    )
st.plotly_chart(graph_figure(shown, built.token_texts, built.n_layers), width="stretch", key="graph_figure")
st.caption(
    "x: prompt position (token below), y: layer (embeddings at the bottom, targets on top). Marker size: influence "
    "on the targets; grey squares: transcoder error nodes; diamonds: embeddings; stars: targets. Edges: blue "
    "positive, red negative, wider = larger |weight| (direct effect in the target's units)."
)

nodes = shown.nodes
labels = dict(zip(nodes["node"], nodes["label"], strict=True))
table_col, detail_col = st.columns([3, 2])
table_col.dataframe(nodes[["node", "kind", "label", "layer", "position", "activation", "influence"]]
                    .sort_values("influence", ascending=False), width="stretch", hide_index=True, height=420)  # fmt: skip
chosen = detail_col.selectbox(
    "node", nodes.sort_values("influence", ascending=False)["node"].tolist(), key="graph_node",
    format_func=lambda n: f"{labels[n]} (influence {float(nodes.loc[nodes['node'] == n, 'influence'].iloc[0]):.3g})",
)  # fmt: skip
all_nodes = frames["attribution_nodes"].set_index("node")
row = all_nodes.loc[chosen]
detail_col.markdown(
    f"**{plain(row['label'])}** · {row['kind']} · layer {int(row['layer'])} · position {int(row['position'])}  \n"
    f"activation {row['activation']:.4g} · value {row['value']:.4g} · influence {row['influence']:.4g}"
)
edges = frames["attribution_edges"]
heads = frames["attribution_heads"]


def _edge_table(part: pd.DataFrame, other: str) -> pd.DataFrame:
    part = part.reindex(part["weight"].abs().sort_values(ascending=False).index).head(10)
    found = part.assign(node=part[other], label=part[other].map(all_nodes["label"]),
                        position=part[other].map(all_nodes["position"]))  # fmt: skip
    return found[["node", "label", "position", "weight"]]


incoming = _edge_table(edges[edges["target"] == chosen], "source")
outgoing = _edge_table(edges[edges["source"] == chosen], "target")
detail_col.markdown("incoming (top 10 by |weight|, unpruned)")
detail_col.dataframe(incoming, width="stretch", hide_index=True)
detail_col.markdown("outgoing (top 10 by |weight|, unpruned)")
detail_col.dataframe(outgoing, width="stretch", hide_index=True)
into = edges[edges["target"] == chosen]
crossing = _edge_table(into[into["source"].map(all_nodes["position"]) != row["position"]], "source")
if not crossing.empty:
    if heads.empty:
        detail_col.info("No head loadings are stored for this graph (it was attributed without them).")
    else:
        loads = heads[(heads["target"] == chosen) & heads["source"].isin(crossing["node"])]
        loads = loads.assign(source_label=loads["source"].map(all_nodes["label"]))
        loads = loads.reindex(loads["weight"].abs().sort_values(ascending=False).index)
        detail_col.markdown("heads carrying the 10 largest incoming cross-position edges")
        detail_col.dataframe(loads[["source", "source_label", "layer", "head", "weight"]], width="stretch",
                             hide_index=True)  # fmt: skip
