"""The graph page's server side: a stored attribution graph read as a sparse matrix, pruned on the server, cut to
what a browser may receive, drawn as circuit-tracer lays it out, annotated, exported and intervened on.

1. ``load_stored_graph``: one stored graph (``circuits.attribution.store`` tables) as a :class:`StoredGraph`: the
   node table, the adjacency as a ``scipy.sparse`` CSR matrix [n_nodes, n_nodes] (row target ← column source, read
   straight from the edge table's three columns: a 2 000 000-edge graph is ~30 MB, never an n×n array) and the
   targets' weights, solved from the stored influence, which is linear in them (influence = Σ_t w_t · influence of
   target t alone).
2. ``prune_sparse``: circuit-tracer's pruning (``circuits.attribution.pruning.prune``, same definitions, same
   ``threshold_for``) on the sparse matrix: influence w Â + w Â² + … by sparse mat-vecs through the normalised
   adjacency Â = |A| / row sums, node threshold, edge scores on the node-pruned graph, then the loop dropping
   features and errors left without outgoing edges and features without incoming ones. ``subgraph`` cuts the
   result to ``max_nodes`` / ``max_edges`` (the most influential nodes, inputs and targets first; the largest
   |weight| edges among them) and says how many were left out.
3. ``graph_figure``: x = prompt position (token under each column; nodes sharing a cell spread across it), y =
   layer (embeddings at the bottom, targets on top), marker size = influence, error nodes as grey squares, edges
   binned by sign and magnitude into a few WebGL line traces; pinned nodes ringed.
4. Pins, supernodes and notes (``ANNOTATIONS``, table ``graph_annotations``) through the one results writer;
   ``paths_between`` (the pinned nodes and every node on a path between two of them), ``suggest_supernodes``
   (features of one layer span whose decoder directions and graph neighbourhoods agree); ``export_view``: the
   view as circuit-tracer graph JSON through the attribution exporter, with the pins and supernodes as qParams.
5. Interventions from the graph: ``feature_interventions`` turns ablate / scale / set on feature nodes into the
   library's :class:`~workbench.interventions.Intervention` stack (the feature's decoder row added at the
   transcoder's output hook and position, × the change in activation), run by the prompt lab's
   ``compare_next_token``; ``linear_prediction`` is what the graph itself predicts for its targets.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import scipy.sparse as sp
import torch

from workbench.analyses.prompt_lab.analysis import compare_next_token, load_lab_model
from workbench.analysis import Analysis, Table, write_tables
from workbench.circuits.attribution.export import attribution_graph_json
from workbench.circuits.attribution.graph import Graph, Target
from workbench.circuits.attribution.pruning import threshold_for
from workbench.circuits.attribution.store import ANALYSIS as GRAPH_TABLES
from workbench.circuits.attribution.store import run as graph_tables
from workbench.circuits.sae.features import logit_effects, residual_writes
from workbench.circuits.sae.readout import load_sae_for
from workbench.interventions import Intervention
from workbench.workspace import Workspace

MAX_NODES = 1500
MAX_EDGES = 15_000
MAX_EXPORT_NODES = 6000  # the exporter prunes a dense [n, n] float64 copy: 6000² × 8 B ≈ 290 MB
EDGE_BINS = 4
KIND_STYLE = {  # marker symbol, colour
    "feature": ("circle", "#1f77b4"),
    "error": ("square", "#8c8c8c"),
    "token": ("diamond", "#2ca02c"),
    "position": ("diamond-open", "#2ca02c"),
    "target": ("star", "#d62728"),
}
NODE_NEEDS = {"node", "kind", "layer", "position", "feature", "label", "activation", "value", "influence"}
ANNOTATION_KEYS = ("model", "checkpoint", "graph")
ANNOTATIONS = Analysis(
    name="graph_annotations",
    command="the dashboard's graph page (pin nodes, group supernodes, write notes)",
    tables=(
        Table(
            "graph_annotations",
            keys=ANNOTATION_KEYS,
            columns=("kind", "node", "name", "text"),
            description="pins (kind pin), supernodes (kind group: name, node), notes (kind note: node, text) and "
            "the view (kind view: thresholds as JSON) of an attribution graph; rewritten whole on each change",
        ),
    ),
    description="annotations of attribution graphs made on the dashboard's graph page",
)


class StoredGraphProblem(Exception):
    """A stored graph that cannot be drawn (absent, empty, or from another schema); the message says what to run."""


@dataclass
class StoredGraph:
    """One stored attribution graph, sparse. ``nodes``: the node table in node order (node = row index);
    ``adjacency``: CSR [n_nodes, n_nodes], row target ← column source; ``target_weights`` [n_nodes] (sum 1 over the
    targets, 0 elsewhere). Node order as ``Graph``: features, errors, inputs (tokens, positions), targets."""

    model: str
    checkpoint: int | None
    graph: str
    prompt: str
    transcoders: list[str]
    nodes: pd.DataFrame
    adjacency: sp.csr_matrix
    target_weights: np.ndarray
    token_texts: list[str]
    n_layers: int
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    def count(self, *kinds: str) -> int:
        return int(self.nodes["kind"].isin(kinds).sum())

    @property
    def n_features(self) -> int:
        return self.count("feature")

    @property
    def n_always(self) -> int:
        """Inputs and targets: the last nodes, never pruned."""
        return self.count("token", "position", "target")


def _token_text(label: str) -> str:
    """The token text of an input node's label ``emb 'text' @p``."""
    try:
        return str(ast.literal_eval(label[len("emb ") : label.rindex(" @")]))
    except (ValueError, SyntaxError):
        return label


def load_stored_graph(workspace: Any, model: str, graph: str) -> StoredGraph:
    """One stored graph as a :class:`StoredGraph`; an absent, empty or older-schema graph raises
    :class:`StoredGraphProblem` saying what to run."""
    results = Workspace(workspace).results()
    tables = results.tables()
    rerun = "re-run `workbench circuits attribute` for it"
    if "attribution_graphs" not in tables:
        raise StoredGraphProblem(
            "no attribution graphs are stored; make one with `workbench circuits attribute`"
        )
    summary = results.read("attribution_graphs", model=model, graph=graph)
    if summary.empty:
        raise StoredGraphProblem(
            f"no graph {graph!r} of {model!r} is stored; make it with `workbench circuits attribute`"
        )
    nodes = (
        results.read("attribution_nodes", model=model, graph=graph)
        if "attribution_nodes" in tables
        else pd.DataFrame()
    )
    if nodes.empty:
        raise StoredGraphProblem(f"graph {graph} has no stored nodes; {rerun}")
    missing = NODE_NEEDS - set(nodes.columns)
    if missing:
        raise StoredGraphProblem(
            f"graph {graph}'s stored nodes lack {sorted(missing)} (an older schema); {rerun}"
        )
    nodes = nodes.sort_values("node").reset_index(drop=True)
    n = len(nodes)
    if not (nodes["node"].to_numpy() == np.arange(n)).all():
        raise StoredGraphProblem(f"graph {graph}'s stored node ids are not 0..n-1; {rerun}")
    kinds = nodes["kind"].tolist()
    order = {"feature": 0, "error": 1, "token": 2, "position": 3, "target": 4}
    if any(k not in order for k in kinds) or any(
        order[a] > order[b] for a, b in zip(kinds, kinds[1:], strict=False)
    ):
        raise StoredGraphProblem(
            f"graph {graph}'s nodes are not in the order features, errors, inputs, targets; {rerun}"
        )
    if "attribution_edges" in tables:
        edges = results.query(
            "SELECT target, source, weight FROM attribution_edges WHERE model = ? AND graph = ?",
            [model, graph],
        )
    else:
        edges = pd.DataFrame({"target": [], "source": [], "weight": []})
    rows, cols = edges["target"].to_numpy(np.int64), edges["source"].to_numpy(np.int64)
    if len(rows) and (rows.max() >= n or cols.max() >= n or min(rows.min(), cols.min()) < 0):
        raise StoredGraphProblem(f"graph {graph}'s edges name nodes outside 0..{n - 1}; {rerun}")
    adjacency = sp.csr_matrix((edges["weight"].to_numpy(np.float64), (rows, cols)), shape=(n, n))
    del edges
    adjacency.sum_duplicates()
    adjacency.sort_indices()
    n_targets = kinds.count("target")
    weights = np.zeros(n)
    solved = _target_weights(adjacency, nodes["influence"].to_numpy(np.float64), n_targets)
    weights[n - n_targets :] = solved / max(float(solved.sum()), 1e-30)
    tokens = nodes[nodes["kind"] == "token"].sort_values("position")
    row = summary.iloc[0]
    checkpoint = row.get("checkpoint")
    n_pos = max(1, len(tokens))
    return StoredGraph(
        model=model,
        checkpoint=None if checkpoint is None or pd.isna(checkpoint) else int(checkpoint),
        graph=graph,
        prompt=str(row.get("prompt", "")),
        transcoders=_json_list(row.get("transcoders")),
        nodes=nodes,
        adjacency=adjacency,
        target_weights=weights,
        token_texts=[_token_text(t) for t in tokens["label"]],
        n_layers=kinds.count("error") // n_pos,
        summary=row.to_dict(),
    )


def _json_list(value: Any) -> list[str]:
    try:
        found = json.loads(value) if isinstance(value, str) else []
    except json.JSONDecodeError:
        return []
    return [str(v) for v in found] if isinstance(found, list) else []


def normalised_sparse(adjacency: sp.csr_matrix) -> sp.csr_matrix:
    """Â = |A| / row sums as CSR [n, n] (the library's ``normalised``; rows without inputs stay zero)."""
    magnitude = abs(adjacency).tocsr()
    sums = np.asarray(magnitude.sum(axis=1)).ravel()
    magnitude.data /= np.maximum(np.repeat(sums, np.diff(magnitude.indptr)), 1e-10)
    return magnitude


def influence_sparse(share: sp.csr_matrix, weights: np.ndarray, max_iter: int = 10_000) -> np.ndarray:
    """w Â + w Â² + … [n] by sparse mat-vecs (the library's ``influence``); raises if the graph has a cycle."""
    transposed = share.T.tocsr()
    total = np.zeros_like(weights)
    current = transposed @ weights
    for _ in range(max_iter):
        if not current.any():
            return total
        total += current
        current = transposed @ current
    raise ValueError(f"influence did not vanish after {max_iter} steps: the adjacency has a cycle")


def _target_weights(adjacency: sp.csr_matrix, stored: np.ndarray, n_targets: int) -> np.ndarray:
    """Each target's weight [n_targets], solved from the stored influence [n_nodes] (least squares over the
    influence each target alone has); one target weighs 1."""
    if n_targets <= 1:
        return np.ones(n_targets)
    n = len(stored)
    share = normalised_sparse(adjacency)
    per_target = np.stack(
        [influence_sparse(share, np.eye(1, n, n - n_targets + t).ravel()) for t in range(n_targets)]
    )
    solution = np.linalg.lstsq(per_target.T, stored, rcond=None)[0]
    return np.clip(solution, 0.0, None)


@dataclass
class SparsePruned:
    """``nodes`` [n_nodes] and ``edges`` [nnz of the adjacency, CSR order] kept; ``influence`` [n_nodes]."""

    nodes: np.ndarray
    edges: np.ndarray
    influence: np.ndarray


def _rows(adjacency: sp.csr_matrix) -> np.ndarray:
    """The row (target node) of each stored entry [nnz], CSR order."""
    return np.repeat(np.arange(adjacency.shape[0]), np.diff(adjacency.indptr))


def prune_sparse(
    graph: StoredGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98
) -> SparsePruned:
    """circuit-tracer's node and edge pruning (``circuits.attribution.pruning.prune``) on the sparse adjacency."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value} must be between 0 and 1")
    adjacency, weights, n = graph.adjacency, graph.target_weights, graph.n_nodes
    movable, n_features = n - graph.n_always, graph.n_features
    scores = influence_sparse(normalised_sparse(adjacency), weights)
    nodes = scores >= threshold_for(torch.from_numpy(scores), node_threshold)
    nodes[movable:] = True
    rows, cols = _rows(adjacency), adjacency.indices
    magnitude = np.abs(adjacency.data) * (nodes[rows] & nodes[cols])
    sums = np.bincount(rows, magnitude, minlength=n)
    share_data = magnitude / np.maximum(sums[rows], 1e-10)
    share = sp.csr_matrix((share_data, adjacency.indices, adjacency.indptr), shape=adjacency.shape)
    edge_scores = share_data * (influence_sparse(share, weights) + weights)[rows]
    edges = (edge_scores >= threshold_for(torch.from_numpy(edge_scores), edge_threshold)) & (edge_scores > 0)
    while True:
        before = nodes.copy()
        has_out = np.bincount(cols[edges], minlength=n) > 0
        has_in = np.bincount(rows[edges], minlength=n) > 0
        nodes[:movable] &= has_out[:movable]
        nodes[:n_features] &= has_in[:n_features]
        edges &= nodes[rows] & nodes[cols]
        if (nodes == before).all():
            break
    return SparsePruned(nodes, edges, scores)


@dataclass
class Subgraph:
    """What the browser receives: ``nodes`` (the node table's rows kept) and ``edges`` (target, source, weight),
    with the pruned counts before the cap (``pruned_nodes``, ``pruned_edges``) and whether the cap cut them."""

    nodes: pd.DataFrame
    edges: pd.DataFrame
    pruned_nodes: int
    pruned_edges: int

    @property
    def capped(self) -> bool:
        return len(self.nodes) < self.pruned_nodes or len(self.edges) < self.pruned_edges


def subgraph(
    graph: StoredGraph,
    node_threshold: float,
    edge_threshold: float,
    max_nodes: int = MAX_NODES,
    max_edges: int = MAX_EDGES,
) -> Subgraph:
    """The pruned graph at these thresholds, at most ``max_nodes`` nodes and ``max_edges`` edges."""
    kept = prune_sparse(graph, node_threshold, edge_threshold)
    adjacency = graph.adjacency
    targets, sources = _rows(adjacency)[kept.edges], adjacency.indices[kept.edges]
    pruned_nodes, pruned_edges = int(kept.nodes.sum()), len(targets)
    rows = graph.nodes[kept.nodes]
    if len(rows) > max_nodes:
        always = rows["kind"].isin(["token", "position", "target"])
        rank = rows["influence"].where(~always, np.inf)
        rows = rows.loc[rank.sort_values(ascending=False, kind="stable").index[:max_nodes]].sort_values(
            "node"
        )
    allowed = np.zeros(graph.n_nodes, dtype=bool)
    allowed[rows["node"].to_numpy()] = True
    inside = allowed[targets] & allowed[sources]
    edges = pd.DataFrame(
        {"target": targets[inside], "source": sources[inside], "weight": adjacency.data[kept.edges][inside]}
    )
    if len(edges) > max_edges:
        edges = edges.loc[edges["weight"].abs().sort_values(ascending=False, kind="stable").index[:max_edges]]
    return Subgraph(rows.reset_index(drop=True), edges.reset_index(drop=True), pruned_nodes, pruned_edges)


def _target_kind(label: str) -> str:
    """A stored target's kind from its label (``Graph.nodes`` labels: ``logit 'a' p=… @p``, ``logit 'a' − 'b' @p``,
    ``L1 #5 @p``, probes by name)."""
    if label.startswith("logit ") and " − " not in label:
        return "logit"
    if label.startswith("logit "):
        return "diff"
    return "feature" if label.startswith("L") and " #" in label else "probe"


def dense_graph(graph: StoredGraph) -> Graph:
    """The stored graph as the library's dense ``Graph`` (what the circuit-tracer exporter takes); only for graphs
    up to ``MAX_EXPORT_NODES`` nodes."""
    if graph.n_nodes > MAX_EXPORT_NODES:
        raise StoredGraphProblem(
            f"graph {graph.graph} has {graph.n_nodes} nodes; exporting from the page is limited to "
            f"{MAX_EXPORT_NODES} (the exporter prunes a dense copy): export it with `workbench circuits attribute "
            "... --out DIR`"
        )
    nodes = graph.nodes
    features = nodes[nodes["kind"] == "feature"]
    n_pos = len(graph.token_texts)
    tokens = nodes[nodes["kind"] == "token"].sort_values("position")
    weights = graph.target_weights[graph.n_nodes - graph.count("target") :].tolist()
    targets = [
        Target(
            _target_kind(str(row.label)),
            str(row.label),
            "",
            int(row.position),
            torch.zeros(0),
            0.0,
            float(w),
            float(row.value),
            token=int(row.feature),
            layer=int(row.layer),
            feature=int(row.feature),
        )
        for row, w in zip(nodes[nodes["kind"] == "target"].itertuples(), weights, strict=True)
    ]

    def column(name: str) -> torch.Tensor:
        return torch.tensor(nodes[name].to_numpy(np.float64)) if name in nodes else torch.zeros(len(nodes))

    return Graph(
        model=graph.model,
        checkpoint=graph.checkpoint,
        prompt=graph.prompt,
        tokens=torch.tensor(tokens["feature"].to_numpy(np.int64)),
        token_texts=graph.token_texts,
        n_layers=graph.n_layers,
        has_pos_embed=graph.count("position") > 0 and graph.count("position") == n_pos,
        targets=targets,
        features=torch.tensor(features[["layer", "position", "feature"]].to_numpy(np.int64)).reshape(-1, 3),
        activations=torch.tensor(features["activation"].to_numpy(np.float64)),
        adjacency=torch.from_numpy(graph.adjacency.toarray()),
        constants=column("constant"),
        dropped=column("dropped"),
        values=column("value"),
        n_active=int(graph.summary.get("n_active", len(features)) or len(features)),
        scores={
            k: float(graph.summary[k])
            for k in ("replacement_score", "completeness_score")
            if k in graph.summary
        },
    )


# ---------------------------------------------------------------------------------------------- layout
def _rows_y(nodes: pd.DataFrame, n_layers: int) -> pd.Series:
    y = nodes["layer"].where(~nodes["kind"].isin(["token", "position"]), -1)
    return y.where(nodes["kind"] != "target", n_layers)


def column_centres(nodes: pd.DataFrame, n_layers: int, n_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """Each prompt position's column centre and width on the x axis ([n_pos] each): a column is as wide as the most
    nodes one of its (row, position) cells holds (at least 1), so crowded positions get the room their nodes need."""
    cell = pd.DataFrame({"y": _rows_y(nodes, n_layers), "position": nodes["position"]})
    most = cell.groupby(["y", "position"]).size().groupby(level="position").max()
    widths = np.ones(n_pos)
    inside = most[(most.index >= 0) & (most.index < n_pos)]
    widths[inside.index.to_numpy(np.int64)] = np.maximum(inside.to_numpy(np.float64), 1.0)
    return np.cumsum(widths) - widths / 2, widths


def node_xy(nodes: pd.DataFrame, n_layers: int, n_pos: int | None = None) -> pd.DataFrame:
    """x (the position's column, nodes of one (row, position) cell spread evenly over 90 % of its width) and y
    (inputs −1, layers, targets ``n_layers``) for each node row."""
    y = _rows_y(nodes, n_layers)
    n_pos = int(nodes["position"].max()) + 1 if n_pos is None else n_pos
    centres, widths = column_centres(nodes, n_layers, n_pos)
    cell = pd.DataFrame({"y": y, "position": nodes["position"]}, index=nodes.index)
    rank = cell.groupby(["y", "position"]).cumcount()
    count = cell.groupby(["y", "position"])["position"].transform("size")
    position = nodes["position"].to_numpy(np.int64)
    offset = np.where(count > 1, (rank + 0.5) / count - 0.5, 0.0) * 0.9 * widths[position]
    return pd.DataFrame({"x": centres[position] + offset, "y": y.astype(float)}, index=nodes.index)


def graph_figure(
    shown: Subgraph, token_texts: list[str], n_layers: int, pinned: Sequence[int] = ()
) -> go.Figure:
    """The subgraph drawn with WebGL traces: edges binned by sign and |weight|, nodes by kind, ``pinned`` ringed.
    Each node marker carries its node id as ``customdata`` (what a click selects)."""
    nodes = shown.nodes
    centres, _ = column_centres(nodes, n_layers, len(token_texts))
    xy = node_xy(nodes, n_layers, len(token_texts)).set_index(nodes["node"])
    figure = go.Figure()
    edges = shown.edges
    if not edges.empty:
        peak = float(edges["weight"].abs().max()) or 1.0
        level = np.minimum((edges["weight"].abs() / peak * EDGE_BINS).astype(int), EDGE_BINS - 1)
        for sign, colour in ((1, "49,130,189"), (-1, "214,96,77")):
            for b in range(EDGE_BINS):
                part = edges[(np.sign(edges["weight"]) == sign) & (level == b)]
                if part.empty:
                    continue
                src, dst = xy.loc[part["source"]], xy.loc[part["target"]]
                xs = np.column_stack([src["x"], dst["x"], np.full(len(part), np.nan)]).ravel()
                ys = np.column_stack([src["y"], dst["y"], np.full(len(part), np.nan)]).ravel()
                figure.add_trace(
                    go.Scattergl(
                        x=xs,
                        y=ys,
                        mode="lines",
                        hoverinfo="skip",
                        showlegend=False,
                        line={"width": 0.5 + 1.5 * b, "color": f"rgba({colour},{0.25 + 0.2 * b:.2f})"},
                    )
                )
    peak_influence = float(nodes["influence"].max()) if len(nodes) else 0.0
    for kind, (symbol, colour) in KIND_STYLE.items():
        part = nodes[nodes["kind"] == kind]
        if part.empty:
            continue
        share = part["influence"].clip(lower=0) / (peak_influence or 1.0)
        size = np.where(part["kind"].isin(["token", "position", "target"]), 12, 6 + 22 * np.sqrt(share))
        at = xy.loc[part["node"]]
        hover = [
            f"{label}<br>activation {act:.4g}<br>influence {inf:.4g}"
            for label, act, inf in zip(part["label"], part["activation"], part["influence"], strict=True)
        ]
        figure.add_trace(
            go.Scattergl(
                x=at["x"],
                y=at["y"],
                mode="markers",
                name=kind,
                text=hover,
                hoverinfo="text",
                customdata=part["node"],
                marker={
                    "symbol": symbol,
                    "color": colour,
                    "size": size,
                    "line": {"width": 1, "color": "#333"},
                },
            )
        )
    ringed = nodes[nodes["node"].isin(list(pinned))]
    if not ringed.empty:
        at = xy.loc[ringed["node"]]
        figure.add_trace(
            go.Scattergl(
                x=at["x"],
                y=at["y"],
                mode="markers",
                name="pinned",
                hoverinfo="skip",
                customdata=ringed["node"],
                marker={"symbol": "circle-open", "size": 26, "color": "#ff7f0e", "line": {"width": 3}},
            )
        )
    figure.update_layout(
        height=200 + 90 * (n_layers + 2),
        margin={"l": 40, "r": 10, "t": 30, "b": 60},
        hovermode="closest",
        xaxis={
            "tickmode": "array",
            "tickvals": centres.tolist(),
            "ticktext": [t.replace("\n", "↵") for t in token_texts],
            "title": "prompt position",
        },
        yaxis={
            "tickmode": "array",
            "tickvals": list(range(-1, n_layers + 1)),
            "ticktext": ["emb", *(f"L{la}" for la in range(n_layers)), "targets"],
            "title": "layer",
        },
    )
    return figure


# ---------------------------------------------------------------------------------------------- pins, groups, notes
@dataclass
class Annotations:
    """A graph's pins (node ids), supernodes ({name: node ids}), notes ({node: text}) and view (thresholds)."""

    pins: list[int] = field(default_factory=list)
    groups: dict[str, list[int]] = field(default_factory=dict)
    notes: dict[int, str] = field(default_factory=dict)
    view: dict[str, float] = field(default_factory=dict)


def read_annotations(workspace: Any, graph: StoredGraph) -> Annotations:
    """The annotations stored for ``graph`` (empty when none)."""
    results = Workspace(workspace).results()
    if "graph_annotations" not in results.tables():
        return Annotations()
    rows = results.read("graph_annotations", model=graph.model, graph=graph.graph)
    found = Annotations()
    for row in rows.itertuples():
        node = int(row.node)
        if row.kind == "pin":
            found.pins.append(node)
        elif row.kind == "group":
            found.groups.setdefault(str(row.name), []).append(node)
        elif row.kind == "note":
            found.notes[node] = str(row.text)
        elif row.kind == "view":
            found.view = {k: float(v) for k, v in json.loads(row.text).items()}
    return found


def write_annotations(workspace: Any, graph: StoredGraph, annotations: Annotations) -> int:
    """Store ``annotations`` as the graph's rows of ``graph_annotations`` (replacing the earlier ones) → rows
    written. A view row is always written, so clearing every pin also clears them in the database."""
    rows = [{"kind": "view", "node": -1, "name": "", "text": json.dumps(annotations.view)}]
    rows += [{"kind": "pin", "node": int(n), "name": "", "text": ""} for n in dict.fromkeys(annotations.pins)]
    rows += [
        {"kind": "group", "node": int(n), "name": name, "text": ""}
        for name, members in annotations.groups.items()
        for n in dict.fromkeys(members)
    ]
    rows += [
        {"kind": "note", "node": int(n), "name": "", "text": text}
        for n, text in annotations.notes.items()
        if text
    ]
    frame = pd.DataFrame(rows).assign(model=graph.model, checkpoint=graph.checkpoint, graph=graph.graph)
    return write_tables(workspace, ANNOTATIONS, {"graph_annotations": frame})["graph_annotations"]


def paths_between(edges: pd.DataFrame, pinned: Sequence[int]) -> set[int]:
    """The pinned nodes and every node on a directed path (source → target along ``edges``) from one pinned node
    to another."""
    children: dict[int, list[int]] = {}
    parents: dict[int, list[int]] = {}
    for target, source in zip(edges["target"].tolist(), edges["source"].tolist(), strict=True):
        children.setdefault(source, []).append(target)
        parents.setdefault(target, []).append(source)

    def reach(start: int, step: dict[int, list[int]]) -> set[int]:
        seen, stack = set(), [start]
        while stack:
            for nxt in step.get(stack.pop(), []):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    pins = list(dict.fromkeys(int(p) for p in pinned))
    below = {p: reach(p, parents) for p in pins}  # ancestors
    above = {p: reach(p, children) for p in pins}  # descendants
    kept = set(pins)
    for a in pins:
        for b in pins:
            if a != b:
                kept |= above[a] & below[b]
    return kept


def suggest_supernodes(
    features: pd.DataFrame,
    directions: np.ndarray,
    adjacency: sp.csr_matrix,
    *,
    layer_span: int = 1,
    min_cosine: float = 0.5,
    min_overlap: float = 0.5,
) -> list[list[int]]:
    """Groups of feature nodes to merge: two features join when their layers are at most ``layer_span`` apart, their
    decoder directions (rows of ``directions`` [len(features), d_model], in ``features``' order) have cosine ≥
    ``min_cosine`` and their graph neighbourhoods agree: the cosine of their edge profiles (incoming row and outgoing
    column of ``adjacency``, |weights|) ≥ ``min_overlap``. Groups are the connected components of that relation with
    two or more members, largest first; each lists node ids."""
    nodes = features["node"].to_numpy(np.int64)
    if len(nodes) < 2:
        return []
    unit = directions / np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-12)
    decoder = unit @ unit.T
    magnitude = abs(adjacency).tocsr()
    profile = sp.hstack([magnitude[nodes], magnitude.T.tocsr()[nodes]]).tocsr()  # [k, 2 n]
    norms = np.sqrt(np.asarray(profile.multiply(profile).sum(axis=1)).ravel())
    overlap = (profile @ profile.T).toarray() / np.maximum(np.outer(norms, norms), 1e-30)
    layers = features["layer"].to_numpy(np.int64)
    near = np.abs(layers[:, None] - layers[None, :]) <= layer_span
    linked = near & (decoder >= min_cosine) & (overlap >= min_overlap)
    np.fill_diagonal(linked, False)
    count, label = sp.csgraph.connected_components(sp.csr_matrix(linked), directed=False)
    groups = [nodes[label == c].tolist() for c in range(count) if (label == c).sum() > 1]
    return sorted(groups, key=lambda g: (-len(g), g))


def circuit_tracer_id(row: Any, n_layers: int) -> str:
    """The circuit-tracer node id the attribution exporter gives a node-table row (``attribution_graph_json``)."""
    kind, layer, position, feature = row.kind, int(row.layer), int(row.position), int(row.feature)
    if kind == "feature":
        return f"{layer}_{feature}_{position}"
    if kind == "error":
        return f"{layer}_-1_{position}"
    if kind in ("token", "position"):
        return f"E_{feature}_{position}"
    return f"{n_layers + 1}_{feature}_{position}"


def export_view(
    graph: StoredGraph, node_threshold: float, edge_threshold: float, annotations: Annotations
) -> dict[str, Any]:
    """The graph pruned at the view's thresholds as circuit-tracer graph JSON (the attribution exporter,
    ``circuit_export.attribution_graph_json``), its ``qParams`` carrying the pins (``pinnedIds``) and supernodes
    (``supernodes``: [name, node id, ...] each) that are in the export."""
    data = attribution_graph_json(
        dense_graph(graph),
        slug=graph.graph,
        scan=graph.model,
        transcoder_list=graph.transcoders,
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
    )
    present = {node["node_id"] for node in data["nodes"]}
    ids = {int(row.node): circuit_tracer_id(row, graph.n_layers) for row in graph.nodes.itertuples()}
    pinned = [ids[n] for n in annotations.pins if ids.get(n) in present]
    data["qParams"]["pinnedIds"] = list(dict.fromkeys([*pinned, *data["qParams"]["pinnedIds"]]))
    data["qParams"]["supernodes"] = [
        [name, *dict.fromkeys(ids[n] for n in members if ids.get(n) in present)]
        for name, members in annotations.groups.items()
    ]
    data["qParams"]["supernodes"] = [group for group in data["qParams"]["supernodes"] if len(group) > 1]
    return data


# ---------------------------------------------------------------------------------------------- model side
@dataclass
class Opened:
    """The graph's model and its transcoders by layer ({layer: (id, SAE)}), as loaded for the panel and
    interventions."""

    model: Any
    transcoders: dict[int, tuple[str, Any]]


def layer_of(hook: str) -> int | None:
    """The block index of a hook name ``blocks.L.…`` (None for other hooks)."""
    parts = hook.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else None


def open_graph_parts(workspace: Any, graph: StoredGraph) -> Opened:
    """Load the graph's model (at its checkpoint) and transcoders; a model or transcoder that is gone raises
    :class:`StoredGraphProblem` naming it."""

    try:
        steps = None if graph.checkpoint is None else graph.checkpoint
        try:
            model = load_lab_model(graph.model, step=steps, workspace=workspace)
        except Exception:  # a single model (no series) stored with its step: open the reference itself
            if steps is None:
                raise
            model = load_lab_model(graph.model, workspace=workspace)
    except Exception as err:
        raise StoredGraphProblem(
            f"the graph's model {graph.model!r} cannot be opened ({type(err).__name__}: {err}); "
            "the graph is still drawn, but feature logits and interventions need its model"
        ) from err
    found: dict[int, tuple[str, Any]] = {}
    for sae_id in graph.transcoders:
        try:
            sae, _ = load_sae_for(model, sae_id, workspace)
        except Exception as err:
            raise StoredGraphProblem(
                f"the graph's transcoder {sae_id!r} cannot be loaded ({err}); feature logits "
                "and interventions need it"
            ) from err
        layer = layer_of(sae.hook_out)
        if layer is None:
            raise StoredGraphProblem(f"transcoder {sae_id!r} writes {sae.hook_out}, not a block's hook")
        found[layer] = (sae_id, sae.eval())
    return Opened(model.eval(), found)


def feature_logits(opened: Opened, layer: int, feature: int, k: int = 10) -> pd.DataFrame:
    """The tokens a feature's decoder row promotes and suppresses most through the unembedding: rows (token, effect)
    for the top ``k`` and the bottom ``k`` (``sae.features.logit_effects`` of its residual write)."""

    _, sae = opened.transcoders[layer]
    head = opened.model.unembedding_matrix()
    writes = residual_writes(sae, opened.model)
    if head is None or writes is None:
        return pd.DataFrame(columns=["direction", "token", "effect"])
    effects = logit_effects(writes[feature : feature + 1], head)[0]
    top, bottom = effects.topk(k), (-effects).topk(k)
    tokens = lambda ids: opened.model.to_str_tokens(ids.tolist())  # noqa: E731
    return pd.concat(
        [
            pd.DataFrame(
                {"direction": "promotes", "token": tokens(top.indices), "effect": top.values.tolist()}
            ),
            pd.DataFrame(
                {
                    "direction": "suppresses",
                    "token": tokens(bottom.indices),
                    "effect": (-bottom.values).tolist(),
                }
            ),
        ],
        ignore_index=True,
    )


def decoder_directions(opened: Opened, features: pd.DataFrame) -> np.ndarray:
    """The decoder rows W_dec[feature] [len(features), d_out] of feature-node rows (layer, feature), float64."""
    rows = [
        opened.transcoders[int(r.layer)][1].W_dec[int(r.feature)].detach().double().cpu().numpy()
        for r in features.itertuples()
    ]
    return np.stack(rows) if rows else np.zeros((0, 1))


def feature_page(workspace: Any, sae_id: str, latent: int) -> pd.Series | None:
    """The stored feature page (``sae_features`` row: top contexts, quantiles, promoted tokens) of ``sae_id``'s
    latent, or None when none is stored."""
    results = Workspace(workspace).results()
    if "sae_features" not in results.tables():
        return None
    rows = results.read("sae_features", sae_id=sae_id, latent=int(latent))
    return None if rows.empty else rows.sort_values("created_at").iloc[-1]


INTERVENTION_MODES = ("ablate", "scale", "set")


def feature_interventions(
    graph: StoredGraph, opened: Opened, nodes: Sequence[int], mode: str, value: float = 0.0
) -> tuple[list[Intervention], np.ndarray]:
    """``mode`` (ablate: activation → 0; scale: × ``value``; set: → ``value``) on the feature nodes ``nodes`` as
    the library's intervention stack — each feature's decoder row W_dec[f] [d_out] added at its transcoder's output
    hook and position, scaled by the change in activation — and that change per node [n_nodes] (0 elsewhere).
    Nodes that are not features are refused."""
    if mode not in INTERVENTION_MODES:
        raise ValueError(f"intervention mode {mode!r} is not one of {INTERVENTION_MODES}")
    delta = np.zeros(graph.n_nodes)
    stack: list[Intervention] = []
    table = graph.nodes
    for node in dict.fromkeys(int(n) for n in nodes):
        row = table.iloc[node]
        if row["kind"] != "feature":
            raise ValueError(
                f"node {node} ({row['label']}) is a {row['kind']} node; only features can be intervened on"
            )
        layer, feature, position, activation = (
            int(row["layer"]),
            int(row["feature"]),
            int(row["position"]),
            float(row["activation"]),
        )
        if layer not in opened.transcoders:
            raise ValueError(f"no transcoder of layer {layer} is loaded for {row['label']}")
        new = {"ablate": 0.0, "scale": value * activation, "set": value}[mode]
        delta[node] = new - activation
        sae_id, sae = opened.transcoders[layer]
        stack.append(
            Intervention.steer(
                sae.hook_out,
                sae.W_dec[feature],
                scale=delta[node],
                positions=[position],
                label=f"{sae_id} #{feature} {mode} {activation:.4g}→{new:.4g}",
            )
        )
    return stack, delta


def linear_prediction(graph: StoredGraph, delta: np.ndarray) -> np.ndarray:
    """What the graph predicts for every node's value [n_nodes] when feature activations change by ``delta``
    [n_nodes]: the change propagates along the edges per unit of source activation (edge / activation: a feature
    edge is activation × the source's direct effect), through the other features linearly (each passes on its
    pre-activation change), with errors and inputs fixed; the changed features keep their new activation."""
    table = graph.nodes
    is_feature = (table["kind"] == "feature").to_numpy()
    activation = table["activation"].to_numpy(np.float64)
    per_unit = np.where(
        is_feature & (np.abs(np.nan_to_num(activation)) > 0), 1.0 / np.where(is_feature, activation, 1.0), 0.0
    )
    per_unit = np.nan_to_num(per_unit)
    effect = (
        graph.adjacency @ sp.diags(per_unit)
    ).tocsr()  # [n, n]: target change per unit source activation
    fixed = delta != 0
    free = is_feature & ~fixed
    change = delta.astype(np.float64).copy()
    for _ in range(graph.n_nodes + 1):
        value = effect @ change
        updated = np.where(fixed, delta, np.where(free, value, 0.0))
        if np.array_equal(updated, change):
            return value
        change = updated
    raise ValueError("the graph's feature edges have a cycle")


@dataclass
class InterventionResult:
    """``logits``: the model's next-token table clean vs intervened (``prompt_lab.compare_next_token``);
    ``targets``: per graph target: label, clean value, the model's change and the graph's linear prediction (in the
    target's units: a logit target's demeaned logit)."""

    logits: pd.DataFrame
    targets: pd.DataFrame
    kl: float
    stack: list[Intervention]


def intervene(
    graph: StoredGraph, opened: Opened, nodes: Sequence[int], mode: str, value: float = 0.0, top_k: int = 10
) -> InterventionResult:
    """Run ``mode`` on ``nodes`` through the prompt lab's ``compare_next_token`` (the same function the lab and
    notebooks call) at the graph's target position, next to the graph's linear prediction."""

    stack, delta = feature_interventions(graph, opened, nodes, mode, value)
    tokens = torch.tensor(_json_ints(graph.summary.get("tokens")), dtype=torch.long)
    targets = graph.nodes[graph.nodes["kind"] == "target"]
    position = int(targets["position"].iloc[0]) if len(targets) else len(tokens) - 1
    prefix = tokens[: position % len(tokens) + 1][
        None
    ]  # a causal model's logits at `position` see tokens ≤ it
    compared = compare_next_token(opened.model, prefix, stack, top_k=top_k)
    predicted = linear_prediction(graph, delta)
    shift = (compared.intervened - compared.clean).double()
    rows = []
    for row in targets.itertuples():
        token = int(row.feature)
        is_logit = str(row.label).startswith("logit") and 0 <= token < len(shift)
        rows.append(
            {
                "target": row.label,
                "clean value": float(row.value),
                "model change": float(shift[token] - shift.mean()) if is_logit else float("nan"),
                "graph prediction": float(predicted[int(row.node)]),
            }
        )
    return InterventionResult(compared.table, pd.DataFrame(rows), compared.kl, stack)


def _json_ints(value: Any) -> list[int]:
    return [int(v) for v in _json_list(value)]


# ---------------------------------------------------------------------------------------------- trace
def trace_prompt(
    workspace: Any,
    model: str,
    transcoders: Sequence[str],
    prompt: str,
    *,
    max_feature_nodes: int = 7500,
    step: Callable[[str], None] = print,
) -> tuple[str, str]:
    """Attribute ``prompt`` on ``model`` with ``transcoders`` (saved ids, one per layer) through the library's
    ``attribute`` and store the graph's tables (``store.run``, ``write_tables``) → (model identity, graph id).
    ``step`` is told each phase."""

    step(f"loading {model}")
    hooked = load_lab_model(model, workspace=workspace).eval()
    saes = []
    for sae_id in transcoders:
        step(f"loading transcoder {sae_id}")
        saes.append(load_sae_for(hooked, sae_id, workspace)[0])
    step(f"attributing {prompt[:40]!r} (the complete graph: one backward row per kept feature)")
    frames = graph_tables(
        hooked,
        prompt,
        transcoders=saes,
        transcoder_ids=list(transcoders),
        max_feature_nodes=max_feature_nodes,
    )
    summary = frames["attribution_graphs"].iloc[0]
    step(f"storing {summary['n_nodes']} nodes and {summary['n_edges']} edges")
    write_tables(workspace, GRAPH_TABLES, frames)
    return str(summary["model"]), str(summary["graph"])
