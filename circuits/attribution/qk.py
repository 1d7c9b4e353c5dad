"""QK attribution: why a head attended. The pre-softmax score of one head at one (query, key) pair, decomposed
into (query-side source node) × (key-side source node) terms of the local replacement model.

1. Replacement model (:class:`~workbench.circuits.attribution.replacement.ReplacementModel`): norm scales and
   attention patterns frozen at the prompt, MLPs replaced by transcoders plus error nodes, so the residual stream
   at every layer is affine in the source nodes (active features, errors, token and position embeddings).
2. The head's query q [d_head] at the query position and its key k [d_head] at the key position, as the attention
   function receives them (after the projections, their biases and any rotary rotation, which is linear per
   position), are affine in the sources too: q = Σ_s Q[:, s] + q₀ and k = Σ_t K[:, t] + k₀. ``Q`` and ``K`` come
   from 2 · d_head rows of batched backward passes (one row per coordinate, the graph's own row machinery), q₀ and
   k₀ from the frozen forward at zero sources (every bias through the frozen paths).
3. score = scale · q · k = Σ_{s,t} scale Q_s·K_t + Σ_s scale Q_s·k₀ + Σ_t scale q₀·K_t + scale q₀·k₀ (+ an additive
   attention-mask value, a position bias, where the model has one): every term is a row of the returned frame and
   the rows sum to the model's pre-softmax score.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pandas as pd
import torch

from workbench.adapters.base import ATTENTION_OWNERS
from workbench.adapters.hf_attention import IMPLEMENTATION, workbench_attention
from workbench.circuits.attribution.graph import _prompt_tokens, _token_texts
from workbench.circuits.attribution.replacement import ReplacementModel
from workbench.circuits.attribution.rows import RowComputer
from workbench.circuits.attribution.transcoders import AttributionError, as_transcoders

QK_COLUMNS = ("query_node", "query_kind", "query_label", "key_node", "key_kind", "key_label", "score")
BIAS_NODE = -1  # the bias side of a term (q₀ or k₀: every bias of the frozen model)
MASK_NODE = -2  # an additive attention-mask value (a position bias), on both sides


@contextlib.contextmanager
def _recording_qk(layer: int) -> Iterator[dict[str, Any]]:
    """While active, the workbench attention function records the query [batch, heads, q, d], key [batch, kv_heads,
    k, d], additive mask and scaling that layer ``layer``'s attention module receives (autograd graph kept)."""
    # deferred: transformers (~1 s to import); only an HF model's QK recording needs it
    from transformers import AttentionInterface

    recorded: dict[str, Any] = {}

    def record(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        entry = ATTENTION_OWNERS.get(module)
        if entry is not None and entry[1].layer == layer:
            recorded.update(
                query=query,
                key=key,
                mask=attention_mask,
                scaling=scaling if scaling is not None else query.shape[-1] ** -0.5,
            )
        return workbench_attention(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    AttentionInterface.register(IMPLEMENTATION, record)
    try:
        yield recorded
    finally:
        AttentionInterface.register(IMPLEMENTATION, workbench_attention)


def _source_labels(replacement: ReplacementModel, computer: RowComputer) -> tuple[list[str], list[str]]:
    """(kind, label) of every source column of ``computer`` (features, errors, tokens, position embeddings)."""
    texts = _token_texts(replacement.model, replacement.tokens.cpu())
    n_pos, n_layers = replacement.n_pos, replacement.n_layers
    kinds = ["feature"] * computer.n_active + ["error"] * (n_layers * n_pos) + ["token"] * n_pos
    labels = [f"L{la} #{f} @{p}" for la, p, f in computer.features.tolist()]
    labels += [f"error L{la} @{p}" for la in range(n_layers) for p in range(n_pos)]
    labels += [f"emb {texts[p]!r} @{p}" for p in range(n_pos)]
    if replacement.has_pos_embed:
        kinds += ["position"] * n_pos
        labels += [f"pos @{p}" for p in range(n_pos)]
    return kinds, labels


def qk_attribution(
    model: Any,
    transcoders: Any,
    prompt: Any,
    *,
    layer: int,
    head: int,
    query: int,
    key: int,
    top: int | None = None,
    batch_size: int = 64,
    dtype: torch.dtype | None = None,
) -> pd.DataFrame:
    """The pre-softmax attention score of ``head`` in ``layer`` at (``query``, ``key``) positions of ``prompt``
    (text or token ids [pos]) decomposed into query-side × key-side source-node terms.

    Returns a frame ranked by |score| with :data:`QK_COLUMNS`: ``query_node`` / ``key_node`` index the source columns
    (active features sorted by layer, position, feature; errors layer-major; token embeddings; position
    embeddings), :data:`BIAS_NODE` is a side's bias (q₀ or k₀), :data:`MASK_NODE` an additive mask value; the
    ``score`` column sums to the model's score, which ``frame.attrs["score"]`` holds (``attrs`` also: ``scale``,
    ``query_bias`` and ``key_bias`` norms, ``layer``, ``head``, ``query``, ``key``). ``top`` keeps the ``top`` largest
    terms plus one ``other`` row holding the rest (the sum stays exact)."""
    tc = as_transcoders(model, transcoders, dtype)
    tokens, _ = _prompt_tokens(model, prompt)
    replacement = ReplacementModel(model, tc, tokens)
    n_heads, n_pos = model.cfg.n_heads, replacement.n_pos
    if not 0 <= layer < replacement.n_layers or not 0 <= head < n_heads:
        raise AttributionError(
            f"head L{layer}.H{head} does not exist: layers 0..{replacement.n_layers - 1}, heads "
            f"0..{n_heads - 1}"
        )
    for name, position in (("query", query), ("key", key)):
        if not 0 <= position < n_pos:
            raise AttributionError(
                f"{name} position {position} is outside the prompt of {n_pos} tokens (0..{n_pos - 1})"
            )
    if model.cfg.causal and key > query:
        raise AttributionError(
            f"key position {key} is masked for query position {query} (a causal model attends "
            "only to earlier positions); pick key ≤ query"
        )
    if getattr(getattr(model.model, "config", None), "_attn_implementation", None) != IMPLEMENTATION:
        raise AttributionError(
            f"{model.cfg.name} does not run the workbench attention function (a TransformerLens model?): QK "
            "attribution reads the query and key its attention receives; load the model from its Hugging Face "
            "directory or hub id"
        )
    with _recording_qk(layer) as recorded:
        computer = RowComputer(replacement, [], max(batch_size, 1))
        q_all, k_all = recorded["query"], recorded["key"]
        scale = float(recorded["scaling"])
        mask = recorded["mask"]
        with torch.no_grad():
            replacement.forward(replacement.zero_sources())
        q_zero, k_zero = recorded["query"], recorded["key"]
    kv_head = head // (n_heads // k_all.shape[1])
    mask_value = 0.0
    if mask is not None:
        at = mask[0, 0, query, key] if mask.dim() == 4 else mask[..., query, key].flatten()[0]
        if at.dtype == torch.bool:
            if not bool(at):
                raise AttributionError(
                    f"key position {key} is masked for query position {query} (a causal model "
                    "attends only to earlier positions); pick key ≤ query"
                )
        elif not bool(torch.isfinite(at)) or float(at) < torch.finfo(at.dtype).min / 2:
            raise AttributionError(
                f"key position {key} is masked for query position {query} (a causal model "
                "attends only to earlier positions); pick key ≤ query"
            )
        else:
            mask_value = float(at)
    d_head = q_all.shape[-1]
    sides = []
    for tensor, h, position in ((q_all, head, query), (k_all, kv_head, key)):
        columns = []
        for start in range(0, d_head, computer.batch_size):
            coordinates = range(start, min(d_head, start + computer.batch_size))
            injection = torch.zeros_like(tensor)
            for element, i in enumerate(coordinates):
                injection[element, h, position, i] = 1.0
            grads = computer.gradients({"qk": tensor}, {"qk": injection})
            columns.append(computer.columns(grads, len(coordinates)))
        sides.append(torch.cat(columns).double())  # [d_head, n_columns]
    q_matrix, k_matrix = sides
    q0 = q_zero[0, head, query].detach().double()
    k0 = k_zero[0, kv_head, key].detach().double()
    score = float(
        (q_all[0, head, query].detach().double() @ k_all[0, kv_head, key].detach().double()) * scale
        + mask_value
    )
    q_used = torch.nonzero(q_matrix.abs().sum(0)).flatten()
    k_used = torch.nonzero(k_matrix.abs().sum(0)).flatten()
    pairs = scale * q_matrix[:, q_used].T @ k_matrix[:, k_used]  # [n_q, n_k]
    query_nodes = [
        q_used.repeat_interleave(len(k_used)),
        q_used,
        torch.full((len(k_used),), BIAS_NODE),
        torch.tensor([BIAS_NODE]),
    ]
    key_nodes = [
        k_used.repeat(len(q_used)),
        torch.full((len(q_used),), BIAS_NODE),
        k_used,
        torch.tensor([BIAS_NODE]),
    ]
    scores = [
        pairs.flatten(),
        scale * (q_matrix[:, q_used].T @ k0),
        scale * (q0 @ k_matrix[:, k_used]),
        (scale * (q0 @ k0)).reshape(1),
    ]
    if mask_value:
        query_nodes.append(torch.tensor([MASK_NODE]))
        key_nodes.append(torch.tensor([MASK_NODE]))
        scores.append(torch.tensor([mask_value], dtype=torch.float64))
    kinds, labels = _source_labels(replacement, computer)
    frame = pd.DataFrame(
        {
            "query_node": torch.cat(query_nodes).cpu().numpy(),
            "key_node": torch.cat(key_nodes).cpu().numpy(),
            "score": torch.cat(scores).cpu().numpy(),
        }
    )
    special = {
        BIAS_NODE: ("bias", "bias (every bias through the frozen paths)"),
        MASK_NODE: ("mask", "attention mask value"),
    }
    for side in ("query", "key"):
        nodes = frame[f"{side}_node"]
        frame[f"{side}_kind"] = [special[n][0] if n < 0 else kinds[n] for n in nodes]
        frame[f"{side}_label"] = [special[n][1] if n < 0 else labels[n] for n in nodes]
    frame = frame[frame["score"] != 0].reindex(columns=list(QK_COLUMNS))
    frame = frame.iloc[frame["score"].abs().argsort()[::-1]].reset_index(drop=True)
    if top is not None and len(frame) > top:
        rest = frame.iloc[top:]
        other = {
            "query_node": -3,
            "query_kind": "other",
            "query_label": f"{len(rest)} other terms",
            "key_node": -3,
            "key_kind": "other",
            "key_label": f"{len(rest)} other terms",
            "score": float(rest["score"].sum()),
        }
        frame = pd.concat([frame.iloc[:top], pd.DataFrame([other])], ignore_index=True)
    frame.attrs.update(
        score=score,
        scale=scale,
        layer=layer,
        head=head,
        query=query,
        key=key,
        query_bias=float(q0.norm()),
        key_bias=float(k0.norm()),
    )
    return frame
