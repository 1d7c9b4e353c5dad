"""Influence, pruning and scores of an attribution graph, with circuit-tracer's definitions (Ameisen et al. 2025,
§5 "Pruning" and the appendix on graph scores).

1. Normalised adjacency: Â = |A| with each row divided by its sum (a node's inputs as shares of 1).
2. Influence on the targets: w Â + w Â² + … for the targets' weights w (a logit's probability; the series ends
   because the graph is acyclic: features only read earlier layers or positions).
3. Node pruning: keep the features and errors whose influence makes up ``node_threshold`` (0.8) of the total,
   ranked; inputs and targets always stay.
4. Edge pruning: edge score = Â[t, s] × (influence of t + its target weight) on the node-pruned graph; keep the
   edges making up ``edge_threshold`` (0.98) of the total; then drop, until nothing changes, features and errors
   left without outgoing edges and features left without incoming ones.
5. Scores: replacement = influence of the inputs / influence of inputs and errors (how much of the targets'
   influence reaches the tokens through features rather than errors); completeness = the influence-weighted
   share of each node's inputs that is not error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from workbench.circuits.attribution.graph import Graph


def normalised(adjacency: torch.Tensor) -> torch.Tensor:
    """Â = |A| / row sums, [n, n] (rows without inputs stay zero)."""
    magnitude = adjacency.abs()
    return magnitude / magnitude.sum(1, keepdim=True).clamp_min(1e-10)


def influence(
    normalised_adjacency: torch.Tensor, weights: torch.Tensor, max_iter: int = 10_000
) -> torch.Tensor:
    """w Â + w Â² + … [n] for target weights ``weights`` [n]; raises if the graph has a cycle."""
    total = torch.zeros_like(weights)
    current = weights @ normalised_adjacency
    for _ in range(max_iter):
        if not bool(current.any()):
            return total
        total = total + current
        current = current @ normalised_adjacency
    raise ValueError(f"influence did not vanish after {max_iter} steps: the adjacency has a cycle")


def node_influence(graph: Graph) -> torch.Tensor:
    """Every node's influence on the graph's targets [n_nodes] (float64, CPU)."""
    return influence(normalised(graph.adjacency.double()), graph.target_weights)


def threshold_for(scores: torch.Tensor, fraction: float) -> float:
    """The smallest score kept when the largest scores are kept until they make up ``fraction`` of the total."""
    ranked = torch.sort(scores.flatten(), descending=True).values
    if len(ranked) == 0:
        return 0.0
    cumulative = torch.cumsum(ranked, 0) / ranked.sum().clamp_min(1e-30)
    index = min(
        int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype))), len(ranked) - 1
    )
    return float(ranked[index])


class Pruned(NamedTuple):
    """``nodes`` [n_nodes] and ``edges`` [n_nodes, n_nodes] (row target, column source) kept; ``cumulative``
    [n_nodes]: each node's cumulative influence share when nodes are ranked by influence."""

    nodes: torch.Tensor
    edges: torch.Tensor
    cumulative: torch.Tensor


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """Phases 3–4: the nodes and edges that carry ``node_threshold`` / ``edge_threshold`` of the influence."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value} must be between 0 and 1")
    adjacency = graph.adjacency.double()
    weights = graph.target_weights
    scores = influence(normalised(adjacency), weights)
    always = graph.n_inputs + graph.n_targets  # inputs and targets: the last nodes
    movable = graph.n_nodes - always
    nodes = scores >= threshold_for(scores, node_threshold)
    nodes[movable:] = True
    pruned = adjacency.clone()
    pruned[~nodes] = 0
    pruned[:, ~nodes] = 0
    share = normalised(pruned)
    edge_scores = share * (influence(share, weights) + weights)[:, None]
    edges = edge_scores >= threshold_for(edge_scores, edge_threshold)
    edges &= edge_scores > 0
    while True:
        before = nodes.clone()
        nodes[:movable] &= edges[:, :movable].any(0)
        nodes[: graph.n_features] &= edges[: graph.n_features].any(1)
        edges[~nodes] = False
        edges[:, ~nodes] = False
        if bool((nodes == before).all()):
            break
    ranked, order = torch.sort(scores, descending=True)
    cumulative = torch.zeros_like(scores)
    cumulative[order] = torch.cumsum(ranked, 0) / ranked.sum().clamp_min(1e-30)
    return Pruned(nodes, edges, cumulative)


def graph_scores(graph: Graph) -> dict[str, float]:
    """Phase 5: {"replacement_score", "completeness_score"} of the unpruned graph."""
    share = normalised(graph.adjacency.double())
    weights = graph.target_weights
    scores = influence(share, weights)
    errors = slice(graph.n_features, graph.n_features + graph.n_errors)
    inputs = slice(errors.stop, errors.stop + graph.n_inputs)
    from_inputs, from_errors = float(scores[inputs].sum()), float(scores[errors].sum())
    replacement = from_inputs / (from_inputs + from_errors) if from_inputs + from_errors > 0 else float("nan")
    not_error = 1 - share[:, errors].sum(1)
    outputs = scores + weights
    completeness = float((not_error * outputs).sum() / outputs.sum().clamp_min(1e-30))
    return {"replacement_score": replacement, "completeness_score": completeness}
