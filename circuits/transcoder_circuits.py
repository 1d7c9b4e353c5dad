"""Retired: the greedy path search through transcoders ("Transcoders Find Interpretable LLM Feature Circuits") is
replaced by the complete attribution graph of a prompt (:mod:`workbench.circuits.attribution`; `workbench circuits
attribute`). `workbench sae circuit` and `workbench circuits export` are hidden aliases for one release that run the
attribution graph.

What stays: the ``transcoder_circuits`` table declaration (``ANALYSIS``, ``NODE_COLUMNS``) so the rows earlier
releases stored stay readable, :func:`salient_tokens` (circuit-tracer's choice of logit targets, used by the
attribution graph's logit targets).
"""

from __future__ import annotations

import torch

from workbench.analysis import Analysis, Table

NODE_COLUMNS = (
    "id",
    "parent",
    "depth",
    "kind",
    "layer",
    "index",
    "position",
    "attribution",
    "activation",
    "output",
    "probability",
    "text",
)


class CircuitError(ValueError):
    """A bad request for logit targets (max_logits below 1, a probability outside (0, 1])."""


def salient_tokens(logits: torch.Tensor, max_logits: int = 10, probability: float = 0.95) -> list[int]:
    """The most probable next tokens (logits [d_vocab]) until their total probability reaches ``probability``, at
    most ``max_logits`` of them (circuit-tracer's choice of logit roots)."""
    if max_logits < 1 or not 0 < probability <= 1:
        raise CircuitError(f"max_logits={max_logits} must be ≥ 1 and probability={probability} in (0, 1]")
    probabilities = torch.softmax(logits.float(), dim=0)
    top = probabilities.topk(min(max_logits, len(probabilities)))
    needed = int((top.values.cumsum(0) < probability).sum()) + 1
    return top.indices[:needed].tolist()


_CIRCUIT_KEYS = ("model", "checkpoint", "dataset", "target", "prompt")
ANALYSIS = Analysis(
    name="transcoder_circuits",
    # no command writes this table any more: its rows come from earlier releases' `workbench sae circuit` (now an
    # alias of `circuits attribute`, which writes attribution_graphs)
    command="none since the greedy path search was retired (earlier releases: workbench sae circuit)",
    tables=(
        Table(
            "transcoder_circuits",
            keys=_CIRCUIT_KEYS,
            columns=("prompt_index", *NODE_COLUMNS),
            description="nodes of a greedy path search from a target transcoder feature (target = "
            "L<layer>#<feature>@<position>; attributions in its pre-activation units) or from the most probable "
            "next-token logits (target = logits@<position>; attributions in demeaned-logit units) on a prompt of "
            "the dataset",
        ),
    ),
    requires=("rotary", "tokenizer", "text"),
    description="transcoder circuits (retired greedy path search; rows made by earlier releases)",
)
