"""The graph page's server side: a stored attribution graph rebuilt from its tables, pruned with the library's
``prune`` at the page's thresholds, cut to what a browser may receive, and drawn as circuit-tracer lays it out.

1. ``stored_graph``: the ``Graph`` of one stored graph's frames (``read_graph``): adjacency [n_nodes, n_nodes] from
   the edge rows, features / activations / constants / values from the node rows, token texts from the input
   nodes' labels. The store keeps no target weights, so they are solved from the stored influence, which is
   linear in them (influence = Σ_t w_t · influence of target t alone); ``prune`` needs nothing else.
2. ``subgraph``: ``prune(graph, node_threshold, edge_threshold)`` → the kept nodes and edges as frames; when they
   exceed ``max_nodes`` / ``max_edges``, the most influential nodes (inputs and targets first) and the largest
   |weight| edges among them are kept, and ``Subgraph.capped`` says how many were left out.
3. ``graph_figure``: x = prompt position (the token under each column; nodes sharing a cell spread across it),
   y = layer (embeddings at the bottom, targets on top), marker size = influence, error nodes as grey squares,
   edges binned by sign and magnitude into a few WebGL line traces (width and colour = signed weight).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from workbench.circuits.attribution.graph import Graph, Target
from workbench.circuits.attribution.pruning import influence, normalised, prune

MAX_NODES = 1500
MAX_EDGES = 15_000
EDGE_BINS = 4
KIND_STYLE = {  # marker symbol, colour
    "feature": ("circle", "#1f77b4"),
    "error": ("square", "#8c8c8c"),
    "token": ("diamond", "#2ca02c"),
    "position": ("diamond-open", "#2ca02c"),
    "target": ("star", "#d62728"),
}


class StoredGraphProblem(Exception):
    """A stored graph that cannot be drawn (empty, or from another schema); the message says what to run."""


def _token_text(label: str) -> str:
    """The token text of an input node's label ``emb 'text' @p``."""
    try:
        return str(ast.literal_eval(label[len("emb ") : label.rindex(" @")]))
    except (ValueError, SyntaxError):
        return label


def stored_graph(frames: dict[str, pd.DataFrame]) -> Graph:
    """The ``Graph`` of a stored graph's tables (``read_graph``), enough for ``prune`` and ``graph_scores``."""
    summary, nodes, edges = (
        frames["attribution_graphs"],
        frames["attribution_nodes"],
        frames["attribution_edges"],
    )
    if nodes.empty:
        raise StoredGraphProblem(
            "this graph has no stored nodes; re-run `workbench circuits attribute` for it"
        )
    missing = {"node", "kind", "layer", "position", "feature", "label", "influence"} - set(nodes.columns)
    if missing:
        raise StoredGraphProblem(
            f"the stored nodes lack {sorted(missing)} (an older schema); re-run `workbench circuits attribute`"
        )
    nodes = nodes.sort_values("node").reset_index(drop=True)
    n = len(nodes)
    if not (nodes["node"].to_numpy() == np.arange(n)).all():
        raise StoredGraphProblem("the stored node ids are not 0..n-1; re-run `workbench circuits attribute`")
    kinds = nodes["kind"].tolist()
    n_features, n_errors = kinds.count("feature"), kinds.count("error")
    n_pos, n_targets = kinds.count("token"), kinds.count("target")
    adjacency = torch.zeros(n, n, dtype=torch.float64)
    if not edges.empty:
        adjacency[torch.tensor(edges["target"].to_numpy(np.int64)), torch.tensor(edges["source"].to_numpy(np.int64))] = (
            torch.tensor(edges["weight"].to_numpy(np.float64))
        )  # fmt: skip
    features = nodes.iloc[:n_features]
    token_rows = nodes[nodes["kind"] == "token"].sort_values("position")
    target_rows = nodes.iloc[n - n_targets :]
    weights = _target_weights(adjacency, torch.tensor(nodes["influence"].to_numpy(np.float64)), n_targets)
    targets = [Target("stored", str(row.label), "", int(row.position), torch.zeros(0), 0.0, float(w), float(row.value))
               for row, w in zip(target_rows.itertuples(), weights.tolist(), strict=True)]  # fmt: skip
    checkpoint = summary["checkpoint"].iloc[0] if "checkpoint" in summary and not summary.empty else None
    return Graph(
        model=str(summary["model"].iloc[0]) if not summary.empty else "",
        checkpoint=None if checkpoint is None or pd.isna(checkpoint) else int(checkpoint),
        prompt=str(summary["prompt"].iloc[0]) if not summary.empty else "",
        tokens=torch.tensor(token_rows["feature"].to_numpy(np.int64)),
        token_texts=[_token_text(label) for label in token_rows["label"]],
        n_layers=n_errors // max(1, n_pos), has_pos_embed="position" in kinds, targets=targets,
        features=torch.tensor(features[["layer", "position", "feature"]].to_numpy(np.int64)).reshape(-1, 3),
        activations=torch.tensor(features["activation"].to_numpy(np.float64)),
        adjacency=adjacency,
        constants=torch.tensor(nodes["constant"].to_numpy(np.float64)),
        dropped=torch.tensor(nodes["dropped"].to_numpy(np.float64)),
        values=torch.tensor(nodes["value"].to_numpy(np.float64)),
        n_active=int(summary["n_active"].iloc[0]) if "n_active" in summary and not summary.empty else n_features,
    )  # fmt: skip


def _target_weights(adjacency: torch.Tensor, stored: torch.Tensor, n_targets: int) -> torch.Tensor:
    """Each target's weight [n_targets], solved from the stored influence [n_nodes] (least squares over the
    influence each target alone has); one target weighs 1."""
    if n_targets <= 1:
        return torch.ones(n_targets, dtype=torch.float64)
    n = len(stored)
    alone = torch.zeros(n_targets, n, dtype=torch.float64)
    alone[torch.arange(n_targets), torch.arange(n - n_targets, n)] = 1.0
    per_target = influence(normalised(adjacency), alone)  # [n_targets, n_nodes]
    solution = torch.linalg.lstsq(per_target.T, stored[:, None]).solution[:, 0]
    return solution.clamp_min(0.0)


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


def subgraph(graph: Graph, nodes: pd.DataFrame, node_threshold: float, edge_threshold: float,
             max_nodes: int = MAX_NODES, max_edges: int = MAX_EDGES) -> Subgraph:  # fmt: skip
    """The pruned graph at these thresholds, at most ``max_nodes`` nodes and ``max_edges`` edges."""
    kept = prune(graph, node_threshold, edge_threshold)
    keep = kept.nodes.numpy()
    targets, sources = np.nonzero(kept.edges.numpy())
    pruned_nodes, pruned_edges = int(keep.sum()), len(targets)
    rows = nodes.sort_values("node").reset_index(drop=True)[keep]
    if len(rows) > max_nodes:
        always = rows["kind"].isin(["token", "position", "target"])
        rank = rows["influence"].where(~always, np.inf)
        rows = rows.loc[rank.sort_values(ascending=False, kind="stable").index[:max_nodes]].sort_values(
            "node"
        )
    weights = graph.adjacency.numpy()[targets, sources]
    edges = pd.DataFrame({"target": targets, "source": sources, "weight": weights})
    allowed = set(rows["node"].tolist())
    edges = edges[edges["target"].isin(allowed) & edges["source"].isin(allowed)]
    if len(edges) > max_edges:
        edges = edges.loc[edges["weight"].abs().sort_values(ascending=False, kind="stable").index[:max_edges]]
    return Subgraph(rows.reset_index(drop=True), edges.reset_index(drop=True), pruned_nodes, pruned_edges)


def node_xy(nodes: pd.DataFrame, n_layers: int) -> pd.DataFrame:
    """x (position, nodes of one (row, position) cell spread within ±0.4) and y (inputs −1, layers, targets
    ``n_layers``) for each node row."""
    y = nodes["layer"].where(~nodes["kind"].isin(["token", "position"]), -1)
    y = y.where(nodes["kind"] != "target", n_layers)
    cell = pd.DataFrame({"y": y, "position": nodes["position"]}, index=nodes.index)
    rank = cell.groupby(["y", "position"]).cumcount()
    count = cell.groupby(["y", "position"])["position"].transform("size")
    x = nodes["position"] + np.where(count > 1, (rank + 0.5) / count - 0.5, 0.0) * 0.8
    return pd.DataFrame({"x": x.astype(float), "y": y.astype(float)}, index=nodes.index)


def graph_figure(shown: Subgraph, token_texts: list[str], n_layers: int) -> go.Figure:
    """The subgraph drawn with WebGL traces: edges binned by sign and |weight|, nodes by kind."""
    nodes = shown.nodes
    xy = node_xy(nodes, n_layers).set_index(nodes["node"])
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
                figure.add_trace(go.Scattergl(
                    x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                    line={"width": 0.5 + 1.5 * b, "color": f"rgba({colour},{0.25 + 0.2 * b:.2f})"},
                ))  # fmt: skip
    peak_influence = float(nodes["influence"].max()) if len(nodes) else 0.0
    for kind, (symbol, colour) in KIND_STYLE.items():
        part = nodes[nodes["kind"] == kind]
        if part.empty:
            continue
        share = part["influence"].clip(lower=0) / (peak_influence or 1.0)
        size = np.where(part["kind"].isin(["token", "position", "target"]), 12, 6 + 22 * np.sqrt(share))
        at = xy.loc[part["node"]]
        hover = [f"{label}<br>activation {act:.4g}<br>influence {inf:.4g}"
                 for label, act, inf in zip(part["label"], part["activation"], part["influence"], strict=True)]  # fmt: skip
        figure.add_trace(go.Scattergl(
            x=at["x"], y=at["y"], mode="markers", name=kind, text=hover, hoverinfo="text",
            customdata=part["node"], marker={"symbol": symbol, "color": colour, "size": size,
                                             "line": {"width": 1, "color": "#333"}},
        ))  # fmt: skip
    figure.update_layout(
        height=200 + 90 * (n_layers + 2), margin={"l": 40, "r": 10, "t": 30, "b": 60}, hovermode="closest",
        xaxis={"tickmode": "array", "tickvals": list(range(len(token_texts))),
               "ticktext": [t.replace("\n", "↵") for t in token_texts], "title": "prompt position"},
        yaxis={"tickmode": "array", "tickvals": list(range(-1, n_layers + 1)),
               "ticktext": ["emb", *(f"L{la}" for la in range(n_layers)), "targets"], "title": "layer"},
    )  # fmt: skip
    return figure
