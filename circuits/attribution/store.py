"""Attribution graphs in the workspace: the unpruned graph as node, edge and head-loading tables through the one
writer (``workbench.analysis.write_tables``), so pruning and subgraphs are queries rather than re-runs.

1. ``graph_id``: a short hash of what makes a graph — model, checkpoint, prompt (text or an image's digest) and
   token ids, targets, transcoders, ``max_feature_nodes`` and whether head loadings were computed — so the same
   request replaces its rows (a graph with head loadings never leaves stale ones under a graph without), and two
   models or two images never collide.
2. ``graph_frames``: one ``attribution_graphs`` row (prompt, targets, counts, replacement and completeness scores,
   the error-node gap: the replacement model's outputs with and without error nodes against the model's),
   ``attribution_nodes`` (``Graph.nodes()``), ``attribution_edges`` (nonzero adjacency entries) and
   ``attribution_heads`` (head loadings), every row carrying (model, checkpoint, graph).
3. ``run(model, prompt, transcoders=, transcoder_ids=, ...)`` is the analysis contract's step: ``attribute`` then
   ``graph_frames``; ``write_tables(workspace, ANALYSIS, frames)`` stores them. Every table is keyed by (model,
   checkpoint, graph), so a re-run replaces the whole graph and leaves no stale node or edge behind. ``read_graph``
   reads one back as frames.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import pandas as pd

from workbench.analysis import Analysis, Table
from workbench.circuits.attribution.graph import Graph, attribute
from workbench.circuits.attribution.heads import HEAD_COLUMNS
from workbench.circuits.attribution.transcoders import AttributionError
from workbench.workspace import Workspace

GRAPH_KEYS = ("model", "checkpoint", "graph")
NODE_COLUMNS = (
    "node",
    "kind",
    "layer",
    "position",
    "feature",
    "label",
    "activation",
    "value",
    "constant",
    "dropped",
    "influence",
)
ANALYSIS = Analysis(
    name="attribution_graphs",
    command="workbench circuits attribute MODEL --transcoders ID ... --prompt TEXT",
    tables=(
        Table(
            "attribution_graphs",
            keys=GRAPH_KEYS,
            columns=(
                "prompt",
                "tokens",
                "targets",
                "transcoders",
                "max_feature_nodes",
                "n_active",
                "n_features",
                "n_nodes",
                "n_edges",
                "replacement_score",
                "completeness_score",
                "reproduction_max_diff",
                "errors_zeroed_max_diff",
                "errors_zeroed_kl",
                "errors_zeroed_top1",
            ),
            description="one row per attribution graph: its prompt, targets, transcoders and scores",
        ),
        Table(
            "attribution_nodes",
            keys=GRAPH_KEYS,
            columns=NODE_COLUMNS,
            description="nodes of an unpruned attribution graph (features, errors, inputs, targets), in node order",
        ),
        Table(
            "attribution_edges",
            keys=GRAPH_KEYS,
            columns=("target", "source", "weight"),
            description="direct effects between nodes of an attribution graph (row target ← column source)",
        ),
        Table(
            "attribution_heads",
            keys=GRAPH_KEYS,
            columns=HEAD_COLUMNS,
            description="each cross-position edge split over the attention heads that carry it",
        ),
    ),
    requires=("mlp",),
    description="attribution graphs: the complete local-replacement graph of a prompt, scored",
)


def graph_id(graph: Graph, transcoders: Sequence[str], max_feature_nodes: int) -> str:
    """A 12-hex-digit id of the request that made ``graph`` (same request, same id)."""
    request = {
        "model": graph.model,
        "checkpoint": graph.checkpoint,
        "tokens": graph.tokens.tolist(),
        "prompt": graph.prompt,  # an image's positions are 0..n: its digest is in the prompt
        "targets": [t.label for t in graph.targets],
        "transcoders": list(transcoders),
        "max_feature_nodes": max_feature_nodes,
        "heads": graph.head_loadings is not None,
    }
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:12]


def graph_frames(graph: Graph, transcoders: Sequence[str], max_feature_nodes: int) -> dict[str, pd.DataFrame]:
    """The graph as the four declared tables, each row keyed by (model, checkpoint, graph=:func:`graph_id`);
    ``transcoders``: the ids the graph was made with, as stored with it."""
    name = graph_id(graph, transcoders, max_feature_nodes)
    keys = {"model": graph.model, "checkpoint": graph.checkpoint, "graph": name}
    edges = graph.edges()
    summary = pd.DataFrame(
        [
            keys
            | {
                "prompt": graph.prompt,
                "tokens": json.dumps(graph.tokens.tolist()),
                "targets": json.dumps([t.label for t in graph.targets]),
                "transcoders": json.dumps(list(transcoders)),
                "max_feature_nodes": max_feature_nodes,
                "n_active": graph.n_active,
                "n_features": graph.n_features,
                "n_nodes": graph.n_nodes,
                "n_edges": len(edges),
                **graph.scores,
                **graph.error_gap,
            }
        ]
    )
    heads = (
        graph.head_loadings if graph.head_loadings is not None else pd.DataFrame(columns=list(HEAD_COLUMNS))
    )
    return {
        "attribution_graphs": summary,
        "attribution_nodes": graph.nodes().assign(**keys),
        "attribution_edges": edges.assign(**keys),
        "attribution_heads": heads.assign(**keys),
    }


def run(
    model: Any,
    prompt: Any,
    *,
    transcoders: Any,
    transcoder_ids: Sequence[str],
    max_feature_nodes: int = 7500,
    **options: Any,
) -> dict[str, pd.DataFrame]:
    """The attribution graph of ``prompt`` (text or token ids [pos]) on ``model`` (a HookedModel) as the four tables
    of :data:`ANALYSIS` for ``write_tables``; the graph id is ``frames["attribution_graphs"]["graph"]``.

    ``transcoders``: what :func:`~workbench.circuits.attribution.graph.attribute` takes (per-layer SAEs, a CLT, ...);
    ``transcoder_ids``: their ids, stored with the graph and part of its id; ``options``: ``attribute``'s keywords
    (``targets``, ``batch_size``, ``position``, ``max_logits``, ``logit_probability``, ``heads``, ``progress``).
    ``attribute`` itself returns the ``Graph`` object the exporters and interventions take."""
    graph = attribute(model, transcoders, prompt, max_feature_nodes=max_feature_nodes, **options)
    return graph_frames(graph, transcoder_ids, max_feature_nodes)


def read_graph(workspace: Any, model: str, name: str) -> dict[str, pd.DataFrame]:
    """One stored graph's tables ({table: frame}, nodes in node order); unknown ids raise naming the stored ones."""
    results = Workspace(workspace).results()
    if "attribution_graphs" not in results.tables():
        raise AttributionError(
            "no attribution graphs are stored; make one with `workbench circuits attribute`"
        )
    summary = results.read("attribution_graphs", model=model, graph=name)
    if summary.empty:
        stored = results.read("attribution_graphs", model=model)
        raise AttributionError(
            f"no graph {name!r} of {model!r} is stored (stored: {', '.join(stored['graph']) or 'none'}); make it with "
            "`workbench circuits attribute`"
        )
    frames = {"attribution_graphs": summary}
    for table, order in (
        ("attribution_nodes", ["node"]),
        ("attribution_edges", ["target", "source"]),
        ("attribution_heads", ["target", "source", "layer", "head"]),
    ):
        found = results.read(table, model=model, graph=name) if table in results.tables() else pd.DataFrame()
        frames[table] = found.sort_values(order).reset_index(drop=True) if not found.empty else found
    return frames
