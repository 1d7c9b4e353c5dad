"""Attribution graphs: the complete local-replacement graph of a prompt (features, errors, inputs, targets and every
direct effect between them), pruned and scored as circuit-tracer does. One job per module: ``transcoders`` (one
interface over per-layer and cross-layer transcoders), ``replacement`` (the frozen local replacement model),
``graph`` (targets, batched rows, ``attribute`` → :class:`~workbench.circuits.attribution.graph.Graph`),
``pruning`` (influence, pruning, replacement and completeness scores), ``heads`` (head loadings), ``qk`` (why a
head attended: QK attribution), ``store`` (the workspace tables), ``batch`` (many prompts as a resumable job)."""

from __future__ import annotations

from typing import Any

DEMO_TRANSCODERS = ("code-tiny.L0-mlp-transcoder", "code-tiny.L1-mlp-transcoder")


def demo_step(
    workspace: Any, progress: bool = True, context_length: int = 32, max_feature_nodes: int = 500
) -> str:
    """The attribution graph of code-tiny's next-token logits on the first ``zoo:python-stdlib`` row, with the
    transcoders the SAE demo step trains (the ``max_feature_nodes`` most influential features), stored in the
    workspace → a one-line summary with its scores."""
    # imported here: the package's __init__ stays import-light (its modules load torch models and transformers)
    import torch

    from workbench.circuits.attribution.graph import attribute
    from workbench.circuits.attribution.store import write_graph
    from workbench.circuits.sae.analysis import find_sae
    from workbench.datasets import load_dataset
    from workbench.references import resolve_model

    model = resolve_model("code-tiny", workspace=workspace)
    transcoders = [find_sae(name, workspace)[1] for name in DEMO_TRANSCODERS]
    (tokens,) = load_dataset("zoo:python-stdlib").token_rows(
        model.tokenizer, context_length=context_length, max_rows=1
    )
    graph = attribute(
        model,
        transcoders,
        torch.tensor(tokens, dtype=torch.long),
        max_feature_nodes=max_feature_nodes,
        progress=progress,
    )
    name = write_graph(
        workspace, graph, transcoders=list(DEMO_TRANSCODERS), max_feature_nodes=max_feature_nodes
    )
    scores = ", ".join(f"{key.replace('_', ' ')} {value:.3f}" for key, value in graph.scores.items())
    return (
        f"attribution graph {name} of code-tiny: {graph.n_features} features, {graph.n_nodes} nodes; {scores}"
    )
