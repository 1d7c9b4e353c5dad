"""Attribution graphs: pick a stored graph (or trace a prompt into a new one), prune it on the server at the chosen
thresholds, draw the pruned subgraph as circuit-tracer lays it out; click a node for its feature page; pin nodes,
see the paths between them, group them into supernodes, write notes (saved in the results database), export the
view to circuit-tracer JSON, and intervene on pinned features."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import streamlit as st

from workbench.app.data import empty_state, model_select, open_workspace_or_stop, plain, table, workspace_path
from workbench.app.graph_explorer import (
    INTERVENTION_MODES,
    MAX_EDGES,
    MAX_NODES,
    Annotations,
    Opened,
    StoredGraph,
    StoredGraphProblem,
    Subgraph,
    decoder_directions,
    export_view,
    feature_logits,
    feature_page,
    graph_figure,
    intervene,
    load_stored_graph,
    open_graph_parts,
    paths_between,
    read_annotations,
    subgraph,
    suggest_supernodes,
    write_annotations,
)
from workbench.app.trace_control import trace_form
from workbench.circuits.attribution.store import ANALYSIS

TRACE_HINT = (
    f"{ANALYSIS.command}    # e.g. workbench circuits attribute code-tiny --transcoders "
    "code-tiny.L0-mlp-transcoder code-tiny.L1-mlp-transcoder --prompt 'def f(x):'"
)

st.title("Attribution graphs")
db = open_workspace_or_stop()


@st.cache_resource(show_spinner="reading the stored graph…", max_entries=2)
def _stored(path: str, model: str, graph: str, created: str) -> StoredGraph:
    """The sparse stored graph, kept once per (graph, its creation time) across reruns and sessions."""
    return load_stored_graph(workspace_path(), model, graph)


@st.cache_data(show_spinner="pruning…", max_entries=64)
def _pruned(
    path: str, model: str, graph: str, created: str, node_threshold: float, edge_threshold: float
) -> Subgraph:
    return subgraph(_stored(path, model, graph, created), node_threshold, edge_threshold)


@st.cache_resource(show_spinner="loading the model and transcoders…", max_entries=2)
def _opened(path: str, model: str, graph: str, created: str) -> Opened | str:
    """The graph's model and transcoders, or the message saying why they cannot be loaded."""
    try:
        return open_graph_parts(workspace_path(), _stored(path, model, graph, created))
    except StoredGraphProblem as err:
        return str(err)


def _trace_form(default_model: str = "") -> None:
    with st.expander("trace a prompt into a new graph", expanded=False):
        trace_form(default_model, key="trace")


graphs = table(db, ANALYSIS.table("attribution_graphs").name)
if graphs is None or graphs.empty:
    empty_state(ANALYSIS.description or "attribution graphs", TRACE_HINT)
    _trace_form()
    st.stop()

pending = st.session_state.pop("graph_pending", None)
if pending is not None and pending[0] in set(graphs["model"]):
    st.session_state["graph_model"], st.session_state["graph_id"] = pending
left, right = st.columns([1, 3])
model = model_select(graphs, key="graph_model", container=left)
graphs = graphs[graphs["model"] == model]


def _describe(graph_id: str) -> str:
    row = graphs[graphs["graph"] == graph_id].iloc[0]
    try:
        targets = ", ".join(json.loads(row["targets"]))
    except (TypeError, ValueError):
        targets = "?"
    step = "" if pd.isna(row.get("checkpoint")) else f" @step {int(row['checkpoint'])}"
    return f"{str(row['prompt'])[:60]!r} → {targets[:60]}{step} [{graph_id}]"


if st.session_state.get("graph_id") not in set(graphs["graph"]):
    st.session_state.pop("graph_id", None)
graph_id = right.selectbox("graph", sorted(graphs["graph"]), format_func=_describe, key="graph_id")
summary = graphs[graphs["graph"] == graph_id].iloc[0]
_trace_form(model)
created = str(summary.get("created_at", ""))
key = (str(db), model, graph_id, created)
try:
    stored = _stored(*key)
except StoredGraphProblem as err:
    st.error(str(err))
    st.stop()


def _metric(column, label: str, name: str, fmt: str = "{:.3f}") -> None:
    value = summary.get(name)
    column.metric(label, "—" if value is None or pd.isna(value) else fmt.format(value))


cols = st.columns(5)
_metric(cols[0], "replacement score", "replacement_score")
_metric(cols[1], "completeness score", "completeness_score")
cols[2].metric("features (of active)", f"{stored.n_features} / {summary.get('n_active', stored.n_features)}")
cols[3].metric("nodes stored", stored.n_nodes)
cols[4].metric("edges stored", stored.adjacency.nnz)
st.caption(f"transcoders: {', '.join(stored.transcoders) or 'not recorded'}")
if stored.n_features == 0 or stored.adjacency.nnz == 0:
    st.warning(
        f"graph {graph_id} has no {'features' if stored.n_features == 0 else 'edges'}: nothing to prune or "
        "draw. Trace another prompt, or raise --max-feature-nodes."
    )
    st.stop()

# ------------------------------------------------------------------ annotations, restored per graph
if st.session_state.get("annotations_of") != graph_id:
    st.session_state["annotations_of"] = graph_id
    st.session_state["annotations"] = read_annotations(workspace_path(), stored)
    view = st.session_state["annotations"].view
    st.session_state["node_t"] = float(view.get("node_threshold", 0.8))
    st.session_state["edge_t"] = float(view.get("edge_threshold", 0.98))
    st.session_state.pop("graph_node", None)
    st.session_state.pop("intervention_result", None)
notes: Annotations = st.session_state["annotations"]


def _save() -> None:
    notes.view = {
        "node_threshold": float(st.session_state["node_t"]),
        "edge_threshold": float(st.session_state["edge_t"]),
    }
    write_annotations(workspace_path(), stored, notes)


node_col, edge_col = st.columns(2)
node_threshold = node_col.slider(
    "node threshold (share of influence kept)", 0.05, 1.0, step=0.01, key="node_t"
)
edge_threshold = edge_col.slider(
    "edge threshold (share of edge score kept)", 0.05, 1.0, step=0.01, key="edge_t"
)
try:
    shown = _pruned(*key, node_threshold, edge_threshold)
except ValueError as err:
    st.error(f"graph {graph_id} cannot be pruned: {err}")
    st.stop()
st.markdown(
    f"pruned: **{shown.pruned_nodes}** nodes, **{shown.pruned_edges}** edges; drawn: "
    f"**{len(shown.nodes)}** nodes, **{len(shown.edges)}** edges"
)
if shown.capped:
    st.warning(
        f"The pruned graph has {shown.pruned_nodes} nodes and {shown.pruned_edges} edges; only the "
        f"{len(shown.nodes)} most influential nodes (≤ {MAX_NODES}) and the {len(shown.edges)} largest edges among "
        f"them (≤ {MAX_EDGES}) are sent to the browser. Lower the thresholds to see a complete pruned graph."
    )
event: Any = st.plotly_chart(
    graph_figure(shown, stored.token_texts, stored.n_layers, notes.pins),
    width="stretch",
    key="graph_figure",
    on_select="rerun",
    selection_mode="points",
)
st.caption(
    "x: prompt position (token below), y: layer (embeddings at the bottom, targets on top). Marker size: influence "
    "on the targets; grey squares: transcoder error nodes; diamonds: embeddings; stars: targets; orange rings: "
    "pinned. Edges: blue positive, red negative, wider = larger |weight|. Click a node to open it."
)
nodes = shown.nodes
all_nodes = stored.nodes
ordered = nodes.sort_values("influence", ascending=False)["node"].tolist()
clicked = [p.get("customdata") for p in (event.selection.points if event and event.selection else [])]
clicked = [c[0] if isinstance(c, list) else c for c in clicked if c is not None]
if clicked and st.session_state.get("graph_clicked") != clicked[0]:
    st.session_state["graph_clicked"] = clicked[0]
    st.session_state["graph_node"] = int(clicked[0])
if st.session_state.get("graph_node") not in ordered:
    st.session_state.pop("graph_node", None)

table_col, detail_col = st.columns([3, 2])
table_col.dataframe(
    nodes[["node", "kind", "label", "layer", "position", "activation", "influence"]].sort_values(
        "influence", ascending=False
    ),
    width="stretch",
    hide_index=True,
    height=420,
)
chosen = detail_col.selectbox(
    "node",
    ordered,
    key="graph_node",
    format_func=lambda n: f"{all_nodes.at[n, 'label']} (influence {float(all_nodes.at[n, 'influence']):.3g})",
)
row = all_nodes.loc[chosen]
opened = _opened(*key)
with detail_col.container(border=True, key="node_panel"):
    st.markdown(
        f"**{plain(row['label'])}** · {row['kind']} · layer {int(row['layer'])} · position {int(row['position'])}  \n"
        f"activation {row['activation']:.4g} · value {row['value']:.4g} · influence {row['influence']:.4g}"
    )
    pinned_now = chosen in notes.pins
    if st.button("unpin" if pinned_now else "pin", key="pin_button"):
        notes.pins = [p for p in notes.pins if p != chosen] if pinned_now else [*notes.pins, chosen]
        _save()
        st.rerun()
    note = st.text_area("note", value=notes.notes.get(chosen, ""), key=f"note_{graph_id}_{chosen}", height=68)
    if note != notes.notes.get(chosen, "") and st.button("save note", key="save_note"):
        notes.notes[chosen] = note
        _save()
        st.rerun()
    if row["kind"] == "feature":
        layer, feature = int(row["layer"]), int(row["feature"])
        if isinstance(opened, str):
            st.info(opened)
        else:
            sae_id = opened.transcoders[layer][0] if layer in opened.transcoders else None
            logits = feature_logits(opened, layer, feature) if sae_id else pd.DataFrame()
            if not logits.empty:
                st.markdown("top / bottom logits through the decoder")
                st.dataframe(logits, width="stretch", hide_index=True, key="feature_logits")
            page = feature_page(workspace_path(), sae_id, feature) if sae_id else None
            if page is None:
                st.caption(
                    f"no feature page is stored for {sae_id} #{feature}; make them with "
                    f"`workbench sae features MODEL {sae_id} --data DATA`"
                )
            else:
                st.markdown(f"top activating contexts (max activation {float(page['max_activation']):.3g})")
                for context in json.loads(page["top_contexts"] or "[]")[:5]:
                    tokens, focus = context.get("tokens", []), int(context.get("focus", 0))
                    text = "".join(f"[{t}]" if i == focus else t for i, t in enumerate(tokens))
                    st.code(text.replace("\n", "↵"), language=None)

edges = stored.adjacency
incoming = edges[chosen].tocoo()
outgoing = edges[:, chosen].tocoo()


def _edge_table(other: Any, weights: Any) -> pd.DataFrame:
    part = pd.DataFrame({"node": other, "weight": weights})
    part = part.reindex(part["weight"].abs().sort_values(ascending=False).index).head(10)
    return part.assign(
        label=part["node"].map(all_nodes["label"]), position=part["node"].map(all_nodes["position"])
    )[["node", "label", "position", "weight"]]


into = _edge_table(incoming.col, incoming.data)
detail_col.markdown("incoming (top 10 by |weight|, unpruned)")
detail_col.dataframe(into, width="stretch", hide_index=True)
detail_col.markdown("outgoing (top 10 by |weight|, unpruned)")
detail_col.dataframe(_edge_table(outgoing.row, outgoing.data), width="stretch", hide_index=True)
crossing = into[into["position"] != row["position"]]
if not crossing.empty:
    heads = table(db, ANALYSIS.table("attribution_heads").name)
    heads = (
        heads[(heads["model"] == model) & (heads["graph"] == graph_id)]
        if heads is not None
        else pd.DataFrame()
    )
    if heads.empty:
        detail_col.info("No head loadings are stored for this graph (it was attributed without them).")
    else:
        loads = heads[(heads["target"] == chosen) & heads["source"].isin(crossing["node"])]
        loads = loads.assign(source_label=loads["source"].map(all_nodes["label"]))
        loads = loads.reindex(loads["weight"].abs().sort_values(ascending=False).index)
        detail_col.markdown("heads carrying the 10 largest incoming cross-position edges")
        detail_col.dataframe(
            loads[["source", "source_label", "layer", "head", "weight"]], width="stretch", hide_index=True
        )

# ------------------------------------------------------------------ pinned subgraph, supernodes, export
st.subheader("Pinned nodes")
labels = all_nodes["label"]
if not notes.pins:
    st.info(
        "Pin nodes (open one, press pin) to see the paths between them, group them and intervene on them."
    )
else:
    on_path = paths_between(shown.edges, notes.pins)
    pinned_view = Subgraph(
        nodes[nodes["node"].isin(on_path)].reset_index(drop=True),
        shown.edges[shown.edges["target"].isin(on_path) & shown.edges["source"].isin(on_path)].reset_index(
            drop=True
        ),
        0,
        0,
    )
    missing = [p for p in notes.pins if p not in set(nodes["node"])]
    st.markdown(
        f"pinned subgraph: **{len(pinned_view.nodes)}** nodes, **{len(pinned_view.edges)}** edges "
        f"({len(notes.pins)} pinned; the other nodes lie on paths between them in the pruned graph)"
    )
    if missing:
        st.caption(f"pinned but pruned away at these thresholds: {', '.join(labels[p] for p in missing)}")
    st.plotly_chart(
        graph_figure(pinned_view, stored.token_texts, stored.n_layers, notes.pins),
        width="stretch",
        key="pinned_figure",
    )
    st.dataframe(
        pd.DataFrame(
            {
                "node": notes.pins,
                "label": [labels[p] for p in notes.pins],
                "note": [notes.notes.get(p, "") for p in notes.pins],
            }
        ),
        hide_index=True,
    )

group_col, suggest_col = st.columns(2)
with group_col:
    st.markdown("**Supernodes**")
    for name, members in list(notes.groups.items()):
        st.markdown(f"- **{plain(name)}**: {', '.join(labels[m] for m in members)}")
    with st.form("group_form", clear_on_submit=True):
        members = st.multiselect("pinned nodes to group", notes.pins, format_func=lambda n: labels[n])
        name = st.text_input("supernode name")
        if st.form_submit_button("group") and name and members:
            notes.groups[name] = list(members)
            _save()
            st.rerun()
    if notes.groups:
        gone = st.selectbox("supernode to remove", list(notes.groups), key="group_remove")
        if st.button("remove supernode"):
            notes.groups.pop(gone, None)
            _save()
            st.rerun()
with suggest_col:
    st.markdown(
        "**Suggested groups** (features one layer apart whose decoder directions and neighbourhoods agree)"
    )
    if isinstance(opened, str):
        st.caption(opened)
    elif st.button("suggest groups among the drawn features"):
        feats = nodes[(nodes["kind"] == "feature") & nodes["layer"].isin(list(opened.transcoders))]
        st.session_state["suggested"] = suggest_supernodes(
            feats, decoder_directions(opened, feats), stored.adjacency
        )
    for i, group in enumerate(st.session_state.get("suggested", [])):
        layers = sorted({int(all_nodes.at[g, "layer"]) for g in group})
        name = f"L{layers[0]}–L{layers[-1]} group {i + 1}"
        st.markdown(f"- {name}: {', '.join(labels[g] for g in group)}")
        if st.button(f"accept {name}", key=f"accept_{i}"):
            notes.groups[name] = group
            notes.pins = list(dict.fromkeys([*notes.pins, *group]))
            _save()
            st.rerun()

if st.button("export the view to circuit-tracer JSON"):
    try:
        exported = export_view(stored, node_threshold, edge_threshold, notes)
    except StoredGraphProblem as err:
        st.error(str(err))
    else:
        st.download_button(
            "download graph JSON", json.dumps(exported), file_name=f"{graph_id}.json", mime="application/json"
        )
        st.caption(
            f"{len(exported['nodes'])} nodes, {len(exported['links'])} links; qParams pinnedIds "
            f"{len(exported['qParams']['pinnedIds'])}, supernodes {len(exported['qParams']['supernodes'])}"
        )

# ------------------------------------------------------------------ interventions
st.subheader("Intervene on pinned features")
choices = [f"node {p}" for p in notes.pins if all_nodes.at[p, "kind"] == "feature"]
choices += [f"supernode {name}" for name in notes.groups]
if isinstance(opened, str):
    st.info(opened)
elif not choices:
    st.caption("pin feature nodes (or group them) to intervene on them")
else:
    with st.form("intervention_form"):
        picked = st.multiselect("features", choices, default=choices[:1], key="iv_targets")
        mode = st.radio("intervention", INTERVENTION_MODES, horizontal=True, key="iv_mode")
        value = st.number_input("value (scale: factor; set: activation)", value=0.0, key="iv_value")
        run = st.form_submit_button("run intervention")
    if run and picked:
        chosen_nodes: list[int] = []
        for item in picked:
            kind, _, name = item.partition(" ")
            chosen_nodes += [int(name)] if kind == "node" else notes.groups.get(name, [])
        chosen_nodes = [n for n in dict.fromkeys(chosen_nodes) if all_nodes.at[n, "kind"] == "feature"]
        try:
            st.session_state["intervention_result"] = intervene(
                stored, opened, chosen_nodes, mode, float(value)
            )
        except ValueError as err:
            st.error(str(err))
    result = st.session_state.get("intervention_result")
    if result is not None:
        st.markdown("; ".join(iv.describe() for iv in result.stack))
        st.markdown(f"KL(clean‖intervened) = {result.kl:.4f} nats")
        logits_col, targets_col = st.columns(2)
        logits_col.markdown("the model's next-token logits, clean and intervened")
        logits_col.dataframe(
            result.logits[
                ["token", "p_clean", "p_intervened", "logit_clean", "logit_intervened", "delta_logit"]
            ],
            hide_index=True,
            key="iv_logits",
        )
        targets_col.markdown("graph targets: the model's change vs the graph's linear prediction")
        targets_col.dataframe(result.targets, hide_index=True, key="iv_targets_table")
