"""Attribution graphs out as circuit-tracer and Neuronpedia graph files.

:func:`attribution_graph_json` turns an attribution graph (``workbench.circuits.attribution.graph.Graph``), pruned
with circuit-tracer's semantics, into circuit-tracer's graph JSON: ``metadata`` (slug, scan, transcoder_list,
prompt_tokens, prompt, node_threshold, schema_version, info with the graph's scores), ``qParams`` (pinnedIds,
supernodes, linkType, clickedId, sg_pos), ``nodes[]`` (node_id ``{layer}_{feature}_{pos}`` for transcoder features,
``{layer}_-1_{pos}`` for error nodes, ``E_{token}_{pos}`` for embeddings, ``{n_layers + 1}_{token}_{pos}`` for
targets; feature = cantor(layer, feature) / −1 / pos / token id, layer, ctx_idx, feature_type, token_prob and
is_target_logit for logits, jsNodeId, clerp, influence, activation) and ``links[]`` (source, target, weight).
:func:`write_circuit_tracer` writes ``{slug}.json``, ``graph-metadata.json`` and one feature file per feature
(``features/{scan}/{cantor id}.json``: top_logits, bottom_logits, act_min, act_max, examples_quantiles), the layout
``circuit_tracer.frontend.local_server.serve(data_dir=OUT, features_dir=OUT/features)`` serves;
:func:`neuronpedia_graph_json` is Neuronpedia's graph upload JSON. circuit-tracer cannot be installed next to the
project's transformers, so the tests check these files field by field against its ``frontend/graph_models.py``
schema.
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from pathlib import Path
from typing import Any

import pandas as pd

from workbench.circuits.attribution.pruning import prune
from workbench.fileio import atomic_write_json
from workbench.workspace import safe_name

SCHEMA_VERSION = 1


def token_text(token: str) -> str:
    """A token as a person reads it in a label: newlines, tabs and carriage returns drawn (⏎ → ↵), spaces kept."""
    return token.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def cantor(layer: int, feature: int) -> int:
    """circuit-tracer's feature id for (layer, feature index)."""
    return (layer + feature) * (layer + feature + 1) // 2 + feature


def feature_file(page: pd.Series | None) -> dict[str, Any]:
    """circuit-tracer's per-feature JSON from one ``sae_features`` row (None: no page was computed)."""
    if page is None:
        return {
            "top_logits": [],
            "bottom_logits": [],
            "act_min": 0.0,
            "act_max": 0.0,
            "examples_quantiles": [],
        }

    def examples(contexts: list[dict]) -> list[dict]:
        return [
            {
                "tokens": [token_text(t) for t in c["tokens"]],
                "tokens_acts_list": c["acts"],
                "train_token_ind": c["focus"],
                "is_repeated_datapoint": False,
            }
            for c in contexts
        ]

    quantiles = [
        {"quantile_name": "Top activations", "examples": examples(json.loads(page["top_contexts"] or "[]"))}
    ]
    for band in json.loads(page["quantile_samples"] or "[]"):
        high = "max" if band["high"] is None else f"{band['high']:.3g}"
        quantiles.append(
            {
                "quantile_name": f"Activations {band['low']:.3g} – {high}",
                "examples": examples(band["contexts"]),
            }
        )
    promoted = json.loads(page.get("promoted_tokens") or "[]")
    suppressed = json.loads(page.get("suppressed_tokens") or "[]")
    return {
        "top_logits": [token_text(t) for t, _ in promoted],
        "bottom_logits": [token_text(t) for t, _ in suppressed],
        "act_min": 0.0,
        "act_max": float(page["max_activation"]),
        "examples_quantiles": quantiles,
    }


def write_circuit_tracer(
    out: str | Path, graph: dict[str, Any], pages: dict[tuple[int, int], pd.Series]
) -> Path:
    """Write ``graph`` as ``out/{slug}.json``, add it to ``out/graph-metadata.json`` and write the feature file of
    every feature node under ``out/features/<scan name>/`` (``pages``: {(layer, feature): sae_features row}).
    The scan must be ``./features/<name>`` so the viewer reads the local files; returns the graph file."""
    out = Path(out)
    meta = graph["metadata"]
    scan = meta["scan"]
    if not scan.startswith("./features/"):
        raise ValueError(
            f"scan {scan!r} must start with ./features/ so circuit-tracer's viewer reads local feature files"
        )
    path = out / f"{meta['slug']}.json"
    atomic_write_json(path, graph)
    index = out / "graph-metadata.json"
    listing = json.loads(index.read_text()) if index.is_file() else {"graphs": []}
    listing["graphs"] = [g for g in listing.get("graphs", []) if g.get("slug") != meta["slug"]] + [meta]
    atomic_write_json(index, listing)
    features = out / scan.removeprefix("./")
    for node in graph["nodes"]:
        if node["feature_type"] != "cross layer transcoder":
            continue
        layer, feature, _ = (int(x) for x in node["node_id"].split("_"))
        atomic_write_json(features / f"{node['feature']}.json", feature_file(pages.get((layer, feature))))
    return path


def attribution_graph_json(
    graph: Any,
    *,
    slug: str,
    scan: str,
    transcoder_list: list[str],
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> dict[str, Any]:
    """circuit-tracer graph JSON for an attribution graph (``workbench.circuits.attribution.graph.Graph``), pruned
    with circuit-tracer's semantics (``prune``: node / edge influence thresholds; inputs and targets kept). Feature
    nodes ``{layer}_{feature}_{pos}``, errors ``{layer}_-1_{pos}``, embeddings ``E_{token}_{pos}`` (a position
    embedding, which circuit-tracer has no node for, is folded into its token's links), targets
    ``{n_layers + 1}_{token or feature}_{pos}`` (logit-typed; the most probable logit is the target logit). Link
    weights are the graph's direct effects; ``influence`` is each node's cumulative influence share."""
    kept = prune(graph, node_threshold, edge_threshold)
    n_features, n_errors, n_pos = graph.n_features, graph.n_errors, graph.n_pos
    ids: list[str] = []
    nodes: list[dict[str, Any]] = []
    node: dict[str, Any]
    base: dict[str, Any] = {
        "token_prob": 0.0,
        "is_target_logit": False,
        "run_idx": 0,
        "reverse_ctx_idx": 0,
        "activation": None,
    }
    top_logit = max((t for t in graph.targets if t.kind == "logit"), key=lambda t: t.weight, default=None)
    for index in range(graph.n_nodes):
        if index < n_features:
            layer, position, feature = (int(x) for x in graph.features[index])
            node = base | {
                "node_id": f"{layer}_{feature}_{position}",
                "feature": cantor(layer, feature),
                "layer": str(layer),
                "ctx_idx": position,
                "feature_type": "cross layer transcoder",
                "jsNodeId": f"{layer}_{feature}-0",
                "activation": float(graph.activations[index]),
                "clerp": f'L{layer} #{feature} @{position} "{token_text(graph.token_texts[position])}"',
            }
        elif index < n_features + n_errors:
            layer, position = divmod(index - n_features, n_pos)
            node = base | {
                "node_id": f"{layer}_-1_{position}",
                "feature": -1,
                "layer": str(layer),
                "ctx_idx": position,
                "feature_type": "mlp reconstruction error",
                "jsNodeId": f"{layer}_-1-{position}",
                "clerp": f"error L{layer} @{position}",
            }
        elif index < n_features + n_errors + graph.n_inputs:
            position = (index - n_features - n_errors) % n_pos
            token = int(graph.tokens[position])
            node = base | {
                "node_id": f"E_{token}_{position}",
                "feature": position,
                "layer": "E",
                "ctx_idx": position,
                "feature_type": "embedding",
                "jsNodeId": f"E_{token}-{position}",
                "clerp": f'emb "{token_text(graph.token_texts[position])}" @{position}',
            }
        else:
            target = graph.targets[index - (graph.n_nodes - graph.n_targets)]
            which = target.feature if target.kind == "feature" else target.token
            node = base | {
                "node_id": f"{graph.n_layers + 1}_{which}_{target.position}",
                "feature": which,
                "layer": str(graph.n_layers + 1),
                "ctx_idx": target.position,
                "feature_type": "logit",
                "token_prob": target.weight if target.kind == "logit" else 0.0,
                "is_target_logit": target is top_logit,
                "jsNodeId": f"L_{which}-{target.position}",
                "clerp": target.label,
            }
        ids.append(node["node_id"])
        node["influence"] = float(kept.cumulative[index])
        if bool(kept.nodes[index]):
            nodes.append(node)
    unique = {node["node_id"]: node for node in nodes}
    links: dict[tuple[str, str], float] = {}
    for target_index, source_index in torch_nonzero(kept.edges):
        key = (ids[source_index], ids[target_index])
        links[key] = links.get(key, 0.0) + float(graph.adjacency[target_index, source_index])
    pinned = [ids[i] for i in range(graph.n_nodes - graph.n_targets, graph.n_nodes)]
    return {
        "metadata": {
            "slug": slug,
            "scan": scan,
            "transcoder_list": transcoder_list,
            "prompt_tokens": [token_text(t) for t in graph.token_texts],
            "prompt": graph.prompt,
            "node_threshold": node_threshold,
            "schema_version": SCHEMA_VERSION,
            "info": {
                "replacement_score": graph.scores.get("replacement_score"),
                "completeness_score": graph.scores.get("completeness_score"),
                "edge_threshold": edge_threshold,
            },
        },
        "qParams": {
            "pinnedIds": list(dict.fromkeys(pinned)),
            "supernodes": [],
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },
        "nodes": list(unique.values()),
        "links": [{"source": s, "target": t, "weight": w} for (s, t), w in links.items()],
    }


def torch_nonzero(mask: Any) -> list[tuple[int, int]]:
    """(row, column) pairs of a boolean matrix's True entries."""
    return [(int(r), int(c)) for r, c in mask.nonzero().tolist()]


def write_attribution_graph(
    out: str | Path,
    graph: Any,
    *,
    slug: str,
    scan: list[str],
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> Path:
    """The pruned attribution graph as circuit-tracer files (``out/{slug}.json``, ``graph-metadata.json``, a feature
    file per feature node under ``out/features/<model>/``, empty where no feature page exists yet)."""
    data = attribution_graph_json(
        graph,
        slug=slug,
        scan=f"./features/{safe_name(graph.model.replace('/', '-'))}",
        transcoder_list=scan,
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
    )
    return write_circuit_tracer(out, data, {})


def neuronpedia_graph_json(
    graph: Any,
    *,
    slug: str,
    scan: str,
    transcoder_list: list[str],
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    generation: dict[str, Any] | None = None,
    source_set: str | None = None,
) -> dict[str, Any]:
    """Neuronpedia's graph upload JSON (its published ``graph-schema.json``: ``metadata`` with the required slug,
    scan — Neuronpedia's model id —, prompt_tokens and prompt, and the optional node_threshold, info {description,
    generator, create_time_ms}, generation_settings, pruning_settings, feature_details {neuronpedia_source_set};
    ``qParams``; ``nodes`` with node_id, feature, layer, ctx_idx, feature_type, jsNodeId, clerp, influence,
    activation; ``links`` source → target with weight): the same pruned nodes and links as the circuit-tracer
    export, with the graph's scores and error-node gap in ``info.description``."""
    data = attribution_graph_json(
        graph,
        slug=slug,
        scan=scan,
        transcoder_list=transcoder_list,
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
    )
    scores = ", ".join(f"{key.replace('_', ' ')} {value:.3f}" for key, value in graph.scores.items())
    gap = getattr(graph, "error_gap", {}) or {}
    kl = gap.get("errors_zeroed_kl")
    described = f"{graph.model}: {graph.n_features} of {graph.n_active} active features; {scores}"
    if kl is not None and kl == kl:
        described += f"; error nodes zeroed: KL(model ‖ replacement) {kl:.4f} nats"
    try:
        version = importlib.metadata.version("interp-workbench")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    metadata: dict[str, Any] = {
        "slug": slug,
        "scan": scan,
        "prompt_tokens": data["metadata"]["prompt_tokens"],
        "prompt": graph.prompt,
        "node_threshold": node_threshold,
        "info": {
            "description": described,
            "generator": {"name": "interpretability workbench", "version": version},
            "create_time_ms": int(time.time() * 1000),
            "transcoders": transcoder_list,
        },
        "generation_settings": dict(generation or {}),
        "pruning_settings": {"node_threshold": node_threshold, "edge_threshold": edge_threshold},
    }
    if source_set:
        metadata["feature_details"] = {"neuronpedia_source_set": source_set}
    return {"metadata": metadata, "qParams": data["qParams"], "nodes": data["nodes"], "links": data["links"]}


def write_neuronpedia_graph(out: str | Path, graph: Any, **options: Any) -> Path:
    """:func:`neuronpedia_graph_json` written as ``out/{slug}.json`` (atomically), the file Neuronpedia's graph
    upload takes."""
    data = neuronpedia_graph_json(graph, **options)
    path = Path(out) / f"{data['metadata']['slug']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)
    return path
