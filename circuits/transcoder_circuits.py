"""Circuits through MLPs with transcoders, after "Transcoders Find Interpretable LLM Feature Circuits".

A transcoder at layer L reads the residual stream that feeds the MLP (``hook_in``: ``blocks.L.hook_resid_pre``
for parallel-attention blocks such as GPT-NeoX, ``blocks.L.hook_resid_mid`` for sequential ones) and predicts the
MLP's output. A target feature i has an encoder vector e = W_enc[:, i] [d_model]; everything that writes into
the residual stream below it contributes linearly to its pre-activation e · resid + b_enc:

- ``pullback``: input-invariant — W_dec of every earlier transcoder feature dotted with e; ``deembedding``: W_E e,
  the tokens that push the feature directly;
- ``feature_attribution``: input-dependent on one prompt — activation × pullback for earlier transcoder
  features, pattern-weighted OV contributions of every attention head and source position, the token embedding,
  and the bias and transcoder-error terms. The rows sum exactly to the pre-activation minus b_enc;
- ``find_paths``: a greedy top-k search that expands the strongest contributors recursively (through earlier
  transcoder features at the same position and through attention heads to their source positions) and returns
  a table and a plotly graph; transcoder errors are leaves of the search, as in circuit-tracer's graphs.

The root can also be the model's next-token prediction, as circuit-tracer roots its graphs: ``logit_attribution``
decomposes one logit at a position (by default demeaned over the vocabulary, circuit-tracer's convention) into the
same contributions through the final norm with its scale frozen at the prompt (LayerNorm: centring and 1/σ,
RMSNorm: 1/rms, both linear once σ is fixed; its bias and the unembedding bias are one ``bias`` row), and
``find_logit_paths`` searches from the most probable next tokens.

The contributions through an attention head to its source position are linearised (the head's pattern is held
fixed and its LayerNorm is differentiated at the prompt's values); everything else is exact.

:func:`run` traces one circuit on a prompt taken from any dataset (``workbench.datasets``) with transcoders of
any rotary model (``ANALYSIS`` declares the ``transcoder_circuits`` table; :func:`write_results` stores it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import plotly.graph_objects as go
import torch
from torch import nn

from workbench.adapters.base import Site
from workbench.analysis import Analysis, Table, write_tables
from workbench.circuits.circuit_export import node_label, token_text
from workbench.circuits.sae.base import SAE
from workbench.circuits.sae.features import output_head
from workbench.datasets import load_dataset
from workbench.model import HookedModel
from workbench.references import resolve_model

ROTARY_FAMILIES = ("gpt_neox", "llama")
SEARCH_KINDS = (
    "transcoder",
    "attention",
    "embedding",
    "error",
)  # contributors that become nodes (errors: leaves)
FINAL_NORM_HOOK = "ln_final.hook_normalized"
NODE_COLUMNS = ("id", "parent", "depth", "kind", "layer", "index", "position", "attribution", "activation", "output",
                "probability", "text")  # fmt: skip
Transcoders = Mapping[int, SAE]


class CircuitError(ValueError):
    """Bad circuit query: unknown layer or feature, position out of range, transcoders that do not fit."""


def _check(transcoders: Transcoders, layer: int, feature: int) -> SAE:
    if layer not in transcoders:
        raise CircuitError(f"no transcoder at layer {layer}; transcoder layers: {sorted(transcoders)}")
    transcoder = transcoders[layer]
    if not 0 <= feature < transcoder.d_sae:
        raise CircuitError(f"feature {feature} is out of range for layer {layer} (d_sae={transcoder.d_sae})")
    return transcoder


def _reads_attention_of_own_layer(transcoder: SAE) -> bool:
    return transcoder.hook_in.endswith("hook_resid_mid")


def layer_of(transcoder: SAE) -> int:
    """The layer whose residual stream a circuit transcoder reads (``blocks.L.hook_resid_pre|mid``)."""
    parts = transcoder.hook_in.split(".")
    if parts[0] != "blocks" or not parts[1].isdigit() or not parts[-1].startswith("hook_resid_"):
        raise CircuitError(
            f"transcoder hook_in {transcoder.hook_in!r} is not a residual-stream hook; circuits need transcoders "
            "trained on blocks.L.hook_resid_pre (parallel blocks) or blocks.L.hook_resid_mid (sequential blocks)"
        )
    return int(parts[1])


def pullback(transcoders: Transcoders, layer: int, feature: int, top_k: int | None = 20) -> pd.DataFrame:
    """Input-invariant connections: W_dec[j] · e for every feature j of every transcoder below ``layer``.

    Returns rows (source_layer, source_feature, pullback) sorted by |pullback| (the ``top_k`` largest)."""
    target = _check(transcoders, layer, feature)
    vector = target.W_enc[:, feature].detach().float().cpu()
    frames = []
    for source_layer, transcoder in sorted(transcoders.items()):
        if source_layer >= layer:
            continue
        scores = (transcoder.W_dec.detach().float().cpu() @ vector).numpy()
        frames.append(pd.DataFrame({"source_layer": source_layer, "source_feature": range(len(scores)),
                                    "pullback": scores}))  # fmt: skip
    if not frames:
        return pd.DataFrame(columns=["source_layer", "source_feature", "pullback"])
    rows = pd.concat(frames, ignore_index=True)
    rows = rows.reindex(rows["pullback"].abs().sort_values(ascending=False).index)
    return rows.head(top_k) if top_k else rows


def _texts(model: HookedModel, tokens: torch.Tensor) -> list[str]:
    if model.tokenizer is None:
        return [str(int(t)) for t in tokens]
    return model.to_str_tokens(tokens)


def deembedding(
    model: HookedModel, transcoders: Transcoders, layer: int, feature: int, top_k: int = 20
) -> pd.DataFrame:
    """Tokens whose embedding most excites (and inhibits) the feature directly: W_E e, rows (token, text, score)."""
    target = _check(transcoders, layer, feature)
    scores = model.embedding_matrix().detach().float().cpu() @ target.W_enc[:, feature].detach().float().cpu()
    order = torch.cat([scores.topk(top_k).indices, (-scores).topk(top_k).indices])
    return pd.DataFrame(
        {"token": order.numpy(), "text": _texts(model, order), "score": scores[order].numpy()}
    )


@dataclass
class _Trace:
    """One prompt's activations, all float32 on the CPU: resid_pre / resid_mid / the last resid_post [pos, d],
    v [layer][pos, head, d_head] (key/value heads repeated per query head), pattern [layer][head, q, k],
    attention-output bias [layer][pos, d] (what the attention output holds beyond its heads' writes), transcoder
    activations and errors [layer][pos, d_sae | d], the model's logits {position: [d_vocab]} at the position asked
    for, and the final norm's output [pos, d] (None when the model has no such hook)."""

    tokens: torch.Tensor
    resid: dict[str, torch.Tensor]
    values: list[torch.Tensor]
    patterns: list[torch.Tensor]
    latents: dict[int, torch.Tensor]
    errors: dict[int, torch.Tensor]
    embed: torch.Tensor
    attn_bias: list[torch.Tensor]
    logits: dict[int, torch.Tensor]
    normalized: torch.Tensor | None


def _trace(
    model: HookedModel,
    transcoders: Transcoders,
    tokens: torch.Tensor | Sequence[int],
    logits_at: int | None = None,
) -> _Trace:
    """Run the prompt once; ``logits_at``: the (resolved) position whose logits [d_vocab] are kept."""
    if model.cfg.family not in ROTARY_FAMILIES:
        raise CircuitError(
            f"transcoder circuits need a rotary causal LM ({', '.join(ROTARY_FAMILIES)}), whose residual stream is "
            f"token embedding + attention + MLP writes only; got {model.cfg.family!r}"
        )
    tokens = torch.as_tensor(tokens).reshape(1, -1)
    n_layers = model.cfg.n_layers
    names = ["hook_embed", "blocks.*.hook_resid_pre", "blocks.*.attn.hook_v", "blocks.*.attn.hook_pattern",
             "blocks.*.hook_mlp_out", "blocks.*.hook_attn_out", "blocks.*.attn.hook_z",
             f"blocks.{n_layers - 1}.hook_resid_post"]  # fmt: skip
    names += [t.hook_in for t in transcoders.values()]
    has_norm = FINAL_NORM_HOOK in model.hook_names()
    names += [FINAL_NORM_HOOK] if has_norm else []
    with torch.no_grad(), model.capture(sorted(set(model.resolve(names)))) as cache:
        output = model(tokens)[0]
    logits = {} if logits_at is None else {logits_at: output[logits_at].float().cpu()}
    latents, errors = {}, {}
    for layer, transcoder in transcoders.items():
        if layer_of(transcoder) != layer:
            raise CircuitError(f"the transcoder keyed by layer {layer} reads {transcoder.hook_in!r}")
        x = cache[transcoder.hook_in][0].to(device=transcoder.device, dtype=torch.float32)
        with torch.no_grad():
            f = transcoder.encode(x)
            prediction = transcoder.decode(f, x).float().cpu()
        latents[layer] = f.float().cpu()
        errors[layer] = cache[f"blocks.{layer}.hook_mlp_out"][0].float().cpu() - prediction

    def get(name: str) -> torch.Tensor:
        return cache[name][0].float().cpu()

    resid = {name: get(name) for name in cache if "hook_resid" in name}
    # grouped-query attention: query head h reads key/value head h // (n_heads / n_kv_heads)
    group = model.cfg.n_heads // model.cfg.n_kv_heads
    values = [get(f"blocks.{index}.attn.hook_v").repeat_interleave(group, dim=1) for index in range(n_layers)]
    patterns = [get(f"blocks.{index}.attn.hook_pattern") for index in range(n_layers)]
    attn_bias = []
    for index in range(n_layers):  # attn_out − Σ_h z_h W_O[h]: the output projection's bias (0 without one)
        w_o = model.head_output_weights(index).detach().float().cpu()
        heads = torch.einsum("phd,hdm->pm", get(f"blocks.{index}.attn.hook_z"), w_o)
        attn_bias.append(get(f"blocks.{index}.hook_attn_out") - heads)
    normalized = get(FINAL_NORM_HOOK) if has_norm else None
    return _Trace(tokens[0].cpu(), resid, values, patterns, latents, errors, get("hook_embed"), attn_bias, logits,
                  normalized)  # fmt: skip


def _require_layers_below(transcoders: Transcoders, layer: int) -> None:
    """Attributions are exact only when every MLP below ``layer`` is replaced by a transcoder."""
    missing = [index for index in range(layer) if index not in transcoders]
    if missing:
        raise CircuitError(
            f"no transcoder for layer(s) {missing} below layer {layer}: their MLP outputs would be missing from the "
            f"attribution, which would no longer sum to the pre-activation. Train transcoders for those layers "
            f"(hook_in blocks.L.hook_resid_pre or hook_resid_mid, hook_out blocks.L.hook_mlp_out) and pass them too"
        )


def _contributions(
    model: HookedModel,
    transcoders: Transcoders,
    trace: _Trace,
    vector: torch.Tensor,
    below: int,
    attention_layers: int,
    position: int,
) -> pd.DataFrame:
    """Every linear contribution to ``vector`` · resid at ``position`` from writers below layer ``below``."""
    frames = []
    for layer, transcoder in sorted(transcoders.items()):
        if layer >= below:
            continue
        pull = transcoder.W_dec.detach().float().cpu() @ vector
        acts = trace.latents[layer][position]
        active = torch.nonzero(acts).flatten()
        frames.append(pd.DataFrame({"kind": "transcoder", "layer": layer, "index": active.numpy(),
                                    "source_position": position, "activation": acts[active].numpy(),
                                    "pullback": pull[active].numpy(),
                                    "attribution": (acts[active] * pull[active]).numpy()}))  # fmt: skip
        frames.append(pd.DataFrame([
            {"kind": "bias", "layer": layer, "index": -1, "source_position": position,
             "attribution": float(transcoder.b_dec.detach().float().cpu() @ vector)},
            {"kind": "error", "layer": layer, "index": -1, "source_position": position,
             "attribution": float(trace.errors[layer][position] @ vector)},
        ]))  # fmt: skip
    for layer in range(attention_layers):
        w_o = model.head_output_weights(layer).detach().float().cpu()  # [head, d_head, d_model]
        head_vector = w_o @ vector  # [head, d_head]
        per_source = torch.einsum("khd,hd->hk", trace.values[layer][: position + 1], head_vector)
        scores = trace.patterns[layer][:, position, : position + 1] * per_source  # [head, k]
        heads, sources = torch.meshgrid(
            torch.arange(scores.shape[0]), torch.arange(scores.shape[1]), indexing="ij"
        )
        frames.append(pd.DataFrame({"kind": "attention", "layer": layer, "index": heads.flatten().numpy(),
                                    "source_position": sources.flatten().numpy(),
                                    "attribution": scores.flatten().numpy()}))  # fmt: skip
        frames.append(pd.DataFrame([{"kind": "bias", "layer": layer, "index": -2, "source_position": position,
                                     "attribution": float(trace.attn_bias[layer][position] @ vector)}]))  # fmt: skip
    frames.append(pd.DataFrame([{"kind": "embedding", "layer": -1, "index": int(trace.tokens[position]),
                                 "source_position": position,
                                 "attribution": float(trace.embed[position] @ vector)}]))  # fmt: skip
    return pd.concat(frames, ignore_index=True)


def feature_attribution(
    model: HookedModel,
    transcoders: Transcoders,
    tokens: torch.Tensor | Sequence[int],
    layer: int,
    feature: int,
    position: int = -1,
) -> pd.DataFrame:
    """Decompose the target feature's pre-activation on a prompt into its upstream contributions.

    Rows: kind (transcoder | attention | embedding | bias | error), layer, index (feature, head, token id; −1 / −2
    for transcoder / attention-output biases), source_position, activation and pullback (transcoder rows),
    attribution. ``attribution.sum() + b_enc[feature]`` equals the pre-activation; the frame's ``attrs`` hold
    ``pre_activation`` and ``activation``."""
    target = _check(transcoders, layer, feature)
    _require_layers_below(transcoders, layer)
    trace = _trace(model, transcoders, tokens)
    position = _position(position, len(trace.tokens))
    vector = target.W_enc[:, feature].detach().float().cpu()
    attention_layers = layer + 1 if _reads_attention_of_own_layer(target) else layer
    rows = _contributions(model, transcoders, trace, vector, layer, attention_layers, position)
    pre = _pre_activation(target, trace, position, feature)
    rows.attrs.update(pre_activation=pre, activation=float(trace.latents[layer][position, feature]))
    return rows.reindex(rows["attribution"].abs().sort_values(ascending=False).index).reset_index(drop=True)


@dataclass
class LogitTarget:
    """A next-token logit as a circuit root: ``vector`` [d_model] · final residual + ``constant`` = ``logit`` with the
    final norm's scale frozen at the prompt (``constant``: the norm's bias and the unembedding bias through W_U)."""

    token: int
    position: int
    logit: float
    probability: float
    vector: torch.Tensor
    constant: float


def _final_norm(model: HookedModel) -> nn.Module:
    """The module whose output is ``ln_final.hook_normalized`` (the norm the unembedding reads)."""
    for site in model.sites:
        if isinstance(site, Site) and FINAL_NORM_HOOK in site.names:
            return site.module
    raise CircuitError(
        f"{model.cfg.name} has no final-norm module behind {FINAL_NORM_HOOK!r} (a TransformerLens-backend model?); "
        "logit circuits need a Hugging Face causal LM (GPT-NeoX, Llama)"
    )


def _frozen_norm(
    norm: nn.Module, x: torch.Tensor, normalized: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The final norm at one position with its scale frozen: norm(z) ≈ scale ⊙ (z − [mean z]) + shift, exact at
    z = x [d_model]. Returns (scale [d] = γ / σ(x), shift [d] = β, centred: whether the mean is subtracted)."""
    weight = getattr(norm, "weight", None)
    gamma = torch.ones_like(x) if weight is None else weight.detach().float().cpu()
    shift = torch.zeros_like(x)
    if isinstance(norm, nn.LayerNorm):
        if norm.bias is not None:
            shift = norm.bias.detach().float().cpu()
        sigma, centred = torch.sqrt(x.var(unbiased=False) + norm.eps), True
    elif "rmsnorm" in type(norm).__name__.lower():
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        eps = 1e-6 if eps is None else float(eps)
        sigma, centred = torch.sqrt(x.pow(2).mean() + eps), False
    else:
        raise CircuitError(
            f"the final norm is a {type(norm).__name__}, neither a LayerNorm nor an RMSNorm; logit circuits freeze "
            "one of those two at the prompt"
        )
    scale = gamma / sigma
    rebuilt = scale * (x - x.mean() if centred else x) + shift
    if not torch.allclose(rebuilt, normalized, atol=1e-4 * max(1.0, float(normalized.abs().max()))):
        raise CircuitError(
            f"the final {type(norm).__name__} recomputed from its weights does not give the model's "
            f"{FINAL_NORM_HOOK} (max difference {float((rebuilt - normalized).abs().max()):.3g}); the norm is not "
            "a plain LayerNorm / RMSNorm"
        )
    return scale, shift, centred


def _logit_target(model: HookedModel, trace: _Trace, position: int, token: int, demean: bool) -> LogitTarget:
    """The logit of ``token`` at ``position`` (minus the mean logit when ``demean``) as a residual-stream direction."""
    head = output_head(model)
    if head is None or trace.normalized is None:
        raise CircuitError(
            f"{model.cfg.name} has no LM head after {FINAL_NORM_HOOK}: there is no logit to trace"
        )
    unembed = head.weight.detach().float().cpu()  # [d_vocab, d_model]
    if not 0 <= token < unembed.shape[0]:
        raise CircuitError(f"token {token} is out of range for a vocabulary of {unembed.shape[0]}")
    bias = getattr(head, "bias", None)
    bias = torch.zeros(unembed.shape[0]) if bias is None else bias.detach().float().cpu()
    logits = trace.logits[position]
    w, b, value = unembed[token], bias[token], logits[token]
    if demean:
        w, b, value = w - unembed.mean(0), b - bias.mean(), value - logits.mean()
    x = trace.resid[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][position]
    scale, shift, centred = _frozen_norm(_final_norm(model), x, trace.normalized[position])
    vector = scale * w
    vector = vector - vector.mean() if centred else vector  # (z − mean z) · v = z · (v − mean v)
    constant = float(shift @ w + b)
    if abs(float(vector @ x) + constant - float(value)) > 1e-3 * max(1.0, abs(float(value))):
        raise CircuitError(
            f"{model.cfg.name}'s logits are not W_U · final norm (+ bias): a scaled or soft-capped head cannot be "
            "decomposed linearly"
        )
    probability = float(torch.softmax(logits, dim=0)[token])
    return LogitTarget(token, position, float(value), probability, vector, constant)


def salient_tokens(logits: torch.Tensor, max_logits: int = 10, probability: float = 0.95) -> list[int]:
    """The most probable next tokens (logits [d_vocab]) until their total probability reaches ``probability``, at
    most ``max_logits`` of them (circuit-tracer's choice of logit roots)."""
    if max_logits < 1 or not 0 < probability <= 1:
        raise CircuitError(f"max_logits={max_logits} must be ≥ 1 and probability={probability} in (0, 1]")
    probabilities = torch.softmax(logits.float(), dim=0)
    top = probabilities.topk(min(max_logits, len(probabilities)))
    needed = int((top.values.cumsum(0) < probability).sum()) + 1
    return top.indices[:needed].tolist()


def logit_attribution(
    model: HookedModel,
    transcoders: Transcoders,
    tokens: torch.Tensor | Sequence[int],
    token: int | None = None,
    position: int = -1,
    demean: bool = True,
) -> pd.DataFrame:
    """Decompose one next-token logit at ``position`` into every writer of the final residual stream.

    The final norm's scale is frozen at the prompt, so the logit is linear in the residual stream; ``token``
    defaults to the most probable one, ``demean`` subtracts the mean logit over the vocabulary (circuit-tracer's
    target). Rows as :func:`feature_attribution` (transcoder features of every layer, heads × source positions,
    the token embedding, biases and errors) plus one ``bias`` row (layer n_layers, index −3: the final norm's bias
    and the unembedding bias). ``attribution.sum()`` equals the logit; ``attrs`` hold ``logit``, ``probability``
    and ``token``."""
    n_layers = model.cfg.n_layers
    _require_layers_below(transcoders, n_layers)
    position = _position(position, len(torch.as_tensor(tokens).reshape(-1)))
    trace = _trace(model, transcoders, tokens, logits_at=position)
    token = int(trace.logits[position].argmax()) if token is None else token
    target = _logit_target(model, trace, position, token, demean)
    rows = _contributions(model, transcoders, trace, target.vector, n_layers, n_layers, position)
    head_bias = {"kind": "bias", "layer": n_layers, "index": -3, "source_position": position,
                 "attribution": target.constant}  # fmt: skip
    rows = pd.concat([rows, pd.DataFrame([head_bias])], ignore_index=True)
    rows.attrs.update(logit=target.logit, probability=target.probability, token=token)
    return rows.reindex(rows["attribution"].abs().sort_values(ascending=False).index).reset_index(drop=True)


def _pre_activation(transcoder: SAE, trace: _Trace, position: int, feature: int) -> float:
    with torch.no_grad():
        x = trace.resid[transcoder.hook_in][position].to(transcoder.device)
        return float(transcoder.pre_activation(x)[feature])


def _position(position: int, length: int) -> int:
    resolved = position + length if position < 0 else position
    if not 0 <= resolved < length:
        raise CircuitError(f"position {position} is out of range for a prompt of {length} tokens")
    return resolved


@dataclass
class CircuitGraph:
    """Nodes of a greedy path search: id, parent (−1 for a root), depth, kind (target | logit | transcoder |
    attention | embedding | error), layer (a logit's: n_layers), index (feature, head, token id; −1 for an error),
    position, attribution (in units of the root's pre-activation or logit), text (the token at the position) and,
    in searches made here, activation (transcoder features), output and probability (a logit's token and its
    probability)."""

    nodes: pd.DataFrame

    def labelled(self) -> pd.DataFrame:
        """The nodes with ``node`` (a readable name: ``L0 #198 @31 "m"``, ``emb "m" @31``, ``head L0.H2 ← @5 "x"``,
        ``logit " return" p=0.41 @31``, ``error L0 @31 "m"``) and ``token`` (the position's token with whitespace
        drawn) columns."""
        outputs = self.nodes["output"] if "output" in self.nodes else pd.Series("", index=self.nodes.index)
        probabilities = (
            self.nodes["probability"] if "probability" in self.nodes else outputs.map(lambda _: None)
        )
        names = [
            node_label(r.kind, int(r.layer), int(r.index), int(r.position), str(r.text), output=str(out),
                       probability=None if prob is None or pd.isna(prob) else float(prob))
            for r, out, prob in zip(self.nodes.itertuples(), outputs.fillna(""), probabilities, strict=True)
        ]  # fmt: skip
        return self.nodes.assign(node=names, token=[f'"{token_text(str(t))}"' for t in self.nodes["text"]])

    def figure(self) -> go.Figure:
        """The circuit drawn as circuit-tracer draws graphs: token positions across (tick labels are the prompt's
        tokens at integer positions), layers up (embedding at the bottom), one marker per node with a readable
        label, one line per edge, width ∝ |attribution| (red excites, blue inhibits). Nodes sharing a (layer,
        position) cell are spread within it."""
        nodes = self.labelled().set_index("id")
        row = nodes["layer"].where(nodes["kind"] != "embedding", -1)
        logit_rows = set(row[nodes["kind"] == "logit"])
        cell = nodes.assign(row=row).groupby(["row", "position"])
        rank, count = cell.cumcount(), cell["kind"].transform("size")
        x = nodes["position"] + 0.6 * ((rank + 0.5) / count - 0.5)
        y = row.astype(float)
        fig = go.Figure()
        scale = float(nodes["attribution"].abs().max() or 1.0)
        for node_id, item in nodes.iterrows():
            if item["parent"] < 0:
                continue
            fig.add_scatter(
                x=[x[node_id], x[item["parent"]]], y=[y[node_id], y[item["parent"]]], mode="lines",
                line={"width": 1 + 6 * abs(item["attribution"]) / scale,
                      "color": "#d62728" if item["attribution"] > 0 else "#1f77b4"},
                hoverinfo="skip", showlegend=False,
            )  # fmt: skip
        short = [_short_label(r) for r in nodes.itertuples()]
        hover = [f"{r.node}<br>attribution {r.attribution:.3f}" for r in nodes.itertuples()]
        fig.add_scatter(x=x, y=y, mode="markers+text", text=short, textposition="top center", hovertext=hover,
                        hoverinfo="text", marker={"size": 12, "color": nodes["depth"], "colorscale": "Viridis"},
                        showlegend=False)  # fmt: skip
        positions = sorted(nodes["position"].unique())
        tokens = nodes.groupby("position")["token"].first()
        layers = sorted(row.unique())
        fig.update_layout(
            xaxis={"title": "token position", "tickmode": "array", "tickvals": positions,
                   "ticktext": [f"{p}<br>{tokens[p]}" for p in positions]},
            yaxis={"title": "layer", "tickmode": "array", "tickvals": layers,
                   "ticktext": ["embedding" if v < 0 else "logits" if v in logit_rows else f"L{v}" for v in layers]},
            title="transcoder circuit (red: excites, blue: inhibits; ★ root)",
        )  # fmt: skip
        return fig


# A search root: its node, the residual direction it reads, the layers whose writers feed it (transcoders below
# ``below``, attention below ``attention_below``).
_Root = tuple[dict[str, Any], torch.Tensor, int, int]


def _search(
    model: HookedModel, transcoders: Transcoders, trace: _Trace, roots: list[_Root], top_k: int, depth: int
) -> CircuitGraph:
    """Greedy top-k expansion from ``roots``: at each node keep the ``top_k`` strongest contributors of
    ``SEARCH_KINDS`` and expand transcoder and attention nodes until ``depth`` (errors and embeddings are leaves)."""
    if top_k < 1 or depth < 1:
        raise CircuitError(f"top_k={top_k} and depth={depth} must be ≥ 1")
    texts = _texts(model, trace.tokens)
    blank = {"activation": float("nan"), "output": "", "probability": float("nan")}
    nodes: list[dict[str, Any]] = []
    frontier = []
    for node, vector, below, attention_below in roots:
        node_id = len(nodes)
        nodes.append(
            blank | node | {"id": node_id, "parent": -1, "depth": 0, "text": texts[node["position"]]}
        )
        frontier.append((node_id, vector, below, attention_below, int(node["position"])))
    for level in range(1, depth + 1):
        next_frontier = []
        for parent, node_vector, below, attention_below, at in frontier:
            rows = _contributions(model, transcoders, trace, node_vector, below, attention_below, at)
            rows = rows[rows["kind"].isin(SEARCH_KINDS)]
            rows = rows.reindex(rows["attribution"].abs().sort_values(ascending=False).index).head(top_k)
            for row in rows.itertuples():
                node_id = len(nodes)
                source = int(row.source_position)
                activation = float(row.activation) if row.kind == "transcoder" else float("nan")
                nodes.append(blank | {"id": node_id, "parent": parent, "depth": level, "kind": row.kind,
                                      "layer": int(row.layer), "index": int(row.index), "position": source,
                                      "attribution": float(row.attribution), "activation": activation,
                                      "text": texts[source]})  # fmt: skip
                if level == depth:
                    continue
                if row.kind == "transcoder":
                    source_tc = transcoders[int(row.layer)]
                    child = float(row.pullback) * source_tc.W_enc[:, int(row.index)].detach().float().cpu()
                    own = _reads_attention_of_own_layer(source_tc)
                    next_frontier.append((node_id, child, int(row.layer), int(row.layer) + own, source))
                elif row.kind == "attention":
                    child = _through_head(
                        model, trace, int(row.layer), int(row.index), at, source, node_vector
                    )
                    next_frontier.append((node_id, child, int(row.layer), int(row.layer), source))
        frontier = next_frontier
    return CircuitGraph(pd.DataFrame(nodes, columns=list(NODE_COLUMNS)))


def _short_label(node: Any) -> str:
    """The label drawn next to a node's marker (the hover text holds the full :func:`node_label`)."""
    if node.kind == "attention":
        return f"L{node.layer}.H{node.index}"
    if node.kind == "embedding":
        return str(node.token)
    if node.kind == "error":
        return f"err L{node.layer}"
    if node.kind == "logit":
        return f'★ → "{token_text(str(node.output))}"'
    return ("★ " if node.kind == "target" else "") + f"L{node.layer} #{node.index}"


def find_paths(
    model: HookedModel,
    transcoders: Transcoders,
    tokens: torch.Tensor | Sequence[int],
    layer: int,
    feature: int,
    position: int = -1,
    top_k: int = 3,
    depth: int = 3,
) -> CircuitGraph:
    """Greedy top-k path search from a target feature: at each node keep the ``top_k`` strongest contributors
    (transcoder features, attention heads × source positions, the token embedding, transcoder errors) and expand
    transcoder and attention nodes until ``depth``. Attributions are expressed in the target's pre-activation
    units."""
    target = _check(transcoders, layer, feature)
    _require_layers_below(transcoders, layer)
    trace = _trace(model, transcoders, tokens)
    position = _position(position, len(trace.tokens))
    root = {"kind": "target", "layer": layer, "index": feature, "position": position,
            "attribution": _pre_activation(target, trace, position, feature),
            "activation": float(trace.latents[layer][position, feature])}  # fmt: skip
    attention_layers = layer + 1 if _reads_attention_of_own_layer(target) else layer
    vector = target.W_enc[:, feature].detach().float().cpu()
    return _search(model, transcoders, trace, [(root, vector, layer, attention_layers)], top_k, depth)


def find_logit_paths(
    model: HookedModel,
    transcoders: Transcoders,
    tokens: torch.Tensor | Sequence[int],
    position: int = -1,
    logit_tokens: Sequence[int] | None = None,
    max_logits: int = 3,
    logit_probability: float = 0.95,
    top_k: int = 3,
    depth: int = 3,
    demean: bool = True,
) -> CircuitGraph:
    """Greedy top-k path search from the next-token logits at ``position``, as circuit-tracer roots its graphs:
    one ``logit`` root (layer n_layers, index = token id, ``output`` its text, ``probability``) per token of
    ``logit_tokens``, or per most probable token until ``logit_probability`` is covered (at most ``max_logits``).
    Attributions are in logit units (demeaned over the vocabulary when ``demean``); needs a transcoder on every
    layer."""
    n_layers = model.cfg.n_layers
    _require_layers_below(transcoders, n_layers)
    position = _position(position, len(torch.as_tensor(tokens).reshape(-1)))
    trace = _trace(model, transcoders, tokens, logits_at=position)
    chosen = (
        salient_tokens(trace.logits[position], max_logits, logit_probability)
        if logit_tokens is None
        else [int(t) for t in logit_tokens]
    )
    roots: list[_Root] = []
    for token in chosen:
        target = _logit_target(model, trace, position, token, demean)
        node = {"kind": "logit", "layer": n_layers, "index": token, "position": position,
                "attribution": target.logit, "output": _texts(model, torch.tensor([token]))[0],
                "probability": target.probability}  # fmt: skip
        roots.append((node, target.vector, n_layers, n_layers))
    return _search(model, transcoders, trace, roots, top_k, depth)


def _through_head(
    model: HookedModel, trace: _Trace, layer: int, head: int, query: int, source: int, vector: torch.Tensor
) -> torch.Tensor:
    """The residual-stream direction at ``source`` (resid_pre of ``layer``) whose dot product linearly predicts
    the head's pattern-weighted contribution to ``vector`` at ``query`` (pattern fixed; LayerNorm linearised)."""
    w_o = model.head_output_weights(layer).detach().float().cpu()[head]  # [d_head, d_model]
    direction = w_o @ vector
    resid = trace.resid[f"blocks.{layer}.hook_resid_pre"][None].clone().requires_grad_(True)
    name = f"blocks.{layer}.attn.hook_v"

    def replace_input(activation, hook):
        return resid.to(device=activation.device, dtype=activation.dtype)

    with (
        model.capture(name, grad=True) as cache,
        model.hooks([(f"blocks.{layer}.hook_resid_pre", replace_input)]),
    ):
        model(trace.tokens[None].to(model.device))
    value = cache[name][0, source, head // (model.cfg.n_heads // model.cfg.n_kv_heads)].float().cpu()
    (gradient,) = torch.autograd.grad(value @ direction, resid)
    return trace.patterns[layer][head, query, source] * gradient[0, source].detach()


def by_layer(
    transcoders: Transcoders | Sequence[SAE],
) -> dict[int, SAE]:
    """Transcoders keyed by the layer they read (``blocks.L.hook_resid_pre|mid``); a list is keyed by its hooks."""
    if isinstance(transcoders, Mapping):
        return dict(transcoders)
    keyed: dict[int, SAE] = {}
    for transcoder in transcoders:
        layer = layer_of(transcoder)
        if layer in keyed:
            raise CircuitError(
                f"two transcoders read layer {layer} ({transcoder.hook_in}); pass one per layer"
            )
        keyed[layer] = transcoder
    return keyed


def check_transcoders(model: HookedModel, transcoders: Transcoders) -> None:
    """Refuse transcoders that are not MLP transcoders of this model: hook_in a residual-stream hook of layer L,
    hook_out ``blocks.L.hook_mlp_out``, widths d_model (an SAE of another model or hook is named)."""
    if not transcoders:
        raise CircuitError(
            "no transcoders given; pass one per layer up to the target (--transcoder, repeatable)"
        )
    for layer, transcoder in transcoders.items():
        if layer_of(transcoder) != layer or transcoder.hook_out != f"blocks.{layer}.hook_mlp_out":
            raise CircuitError(
                f"the transcoder for layer {layer} maps {transcoder.hook_in!r} → {transcoder.hook_out!r}; a circuit "
                f"needs MLP transcoders blocks.{layer}.hook_resid_pre (or hook_resid_mid) → blocks.{layer}.hook_mlp_out"
            )
        if layer >= model.cfg.n_layers or (transcoder.d_in, transcoder.d_out) != (model.cfg.d_model,) * 2:
            trained_on = f" (trained on {transcoder.cfg.model!r})" if transcoder.cfg.model else ""
            raise CircuitError(
                f"the layer-{layer} transcoder{trained_on} has d_in={transcoder.d_in}, d_out={transcoder.d_out}, but "
                f"{model.cfg.name} has {model.cfg.n_layers} layers of d_model={model.cfg.d_model}: it is a "
                "transcoder of another model; train transcoders on this one"
            )


_CIRCUIT_KEYS = ("model", "checkpoint", "dataset", "target", "prompt")
ANALYSIS = Analysis(
    name="transcoder_circuits",
    command="workbench sae circuit MODEL --data DATA --transcoder SAE_ID",
    tables=(
        Table("transcoder_circuits", keys=_CIRCUIT_KEYS,
              columns=("prompt_index", *NODE_COLUMNS),
              description="nodes of a greedy path search from a target transcoder feature (target = "
              "L<layer>#<feature>@<position>; attributions in its pre-activation units) or from the most probable "
              "next-token logits (target = logits@<position>; attributions in demeaned-logit units) on a prompt of "
              "the dataset"),
    ),
    requires=("rotary", "tokenizer", "text"),
    description="transcoder circuits: exact attribution and greedy path search through transcoders and heads",
)  # fmt: skip


def run(
    model: HookedModel,
    data,
    transcoders: Transcoders | Sequence[SAE],
    *,
    root: Literal["feature", "logit"] = "feature",
    layer: int | None = None,
    feature: int | None = None,
    prompt_index: int = 0,
    position: int = -1,
    context_length: int = 64,
    top_k: int = 3,
    depth: int = 3,
    max_logits: int = 3,
    logit_probability: float = 0.95,
) -> dict[str, pd.DataFrame]:
    """The circuit of a transcoder feature, or of the next-token logits, on a prompt taken from ``data`` →
    {"transcoder_circuits": nodes}.

    Args:
        model: a rotary causal LM (GPT-NeoX / Llama), e.g. from ``workbench.references.resolve_model``.
        data: a text or token Dataset; the prompt is its token row ``prompt_index`` (at most ``context_length``
            tokens, one document per row).
        transcoders: {layer: transcoder} or a list keyed by their hooks; every layer below the target needs one.
        root: ``feature`` (a transcoder feature) or ``logit`` (the most probable next tokens at ``position``
            until ``logit_probability`` is covered, at most ``max_logits``: circuit-tracer's roots; every layer
            needs a transcoder).
        layer, feature: the target feature (default: the highest transcoder layer and its most active feature at
            ``position``).
    """
    ANALYSIS.check(model, data)
    transcoders = by_layer(transcoders)
    check_transcoders(model, transcoders)
    if root not in ("feature", "logit"):
        raise CircuitError(f"root={root!r} is not 'feature' or 'logit'")
    if root == "logit" and (layer is not None or feature is not None):
        raise CircuitError("a logit-rooted circuit has no target layer or feature; drop --layer / --feature")
    layer = max(transcoders) if layer is None else layer
    if feature is not None:
        _check(transcoders, layer, feature)
    _require_layers_below(transcoders, model.cfg.n_layers if root == "logit" else layer)
    rows = data.token_rows(model.tokenizer, context_length=context_length, max_rows=prompt_index + 1)
    if len(rows) <= prompt_index:
        raise CircuitError(
            f"dataset {data.name!r} has {len(rows)} token row(s), so there is no prompt {prompt_index}; pick "
            f"--prompt-index 0..{len(rows) - 1}"
        )
    tokens = torch.tensor(rows[prompt_index], dtype=torch.long)
    at = _position(position, len(tokens))
    if root == "logit":
        graph = find_logit_paths(model, transcoders, tokens, position=at, max_logits=max_logits,
                                 logit_probability=logit_probability, top_k=top_k, depth=depth)  # fmt: skip
        return {"transcoder_circuits": _circuit_rows(model, data, graph, tokens, prompt_index, FINAL_NORM_HOOK,
                                                     f"logits@{at}")}  # fmt: skip
    if feature is None:
        target = _check(transcoders, layer, 0)
        with torch.no_grad(), model.capture(target.hook_in) as cache:
            model(tokens[None].to(model.device))
            x = cache[target.hook_in][0, at].to(device=target.device, dtype=torch.float32)
            feature = int(target.encode(x).argmax())
    graph = find_paths(model, transcoders, tokens, layer=layer, feature=feature, position=at, top_k=top_k,
                       depth=depth)  # fmt: skip
    return {"transcoder_circuits": _circuit_rows(model, data, graph, tokens, prompt_index, transcoders[layer].hook_in,
                                                 f"L{layer}#{feature}@{at}")}  # fmt: skip


def _circuit_rows(
    model: HookedModel,
    data,
    graph: CircuitGraph,
    tokens: torch.Tensor,
    prompt_index: int,
    hook: str,
    target: str,
) -> pd.DataFrame:
    prompt = model.to_string(tokens) if model.tokenizer is not None else " ".join(map(str, tokens.tolist()))
    return graph.nodes.assign(model=model.cfg.name, checkpoint=model.cfg.checkpoint, dataset=data.name, hook=hook,
                              prompt=prompt, prompt_index=prompt_index, target=target)  # fmt: skip


def write_results(workspace, frames: Mapping[str, pd.DataFrame]) -> dict[str, int]:
    """Store ``run``'s frame (``workbench.analysis.write_tables``): one circuit per model, checkpoint, dataset,
    target and prompt."""
    return write_tables(workspace, ANALYSIS, frames)


def demo_step(workspace, progress: bool = True) -> str:
    """The circuit of code-tiny's most active layer-1 transcoder feature at the last token of the first
    ``zoo:python-stdlib`` prompt (the SAE demo step trains the transcoders); writes ``transcoder_circuits``."""
    from workbench.circuits.sae.analysis import find_sae

    model = resolve_model("code-tiny", workspace=workspace)
    transcoders = [find_sae(f"code-tiny.L{layer}-mlp-transcoder", workspace)[1] for layer in (0, 1)]
    frames = run(model, load_dataset("zoo:python-stdlib"), transcoders, context_length=32)
    write_results(workspace, frames)
    nodes = frames["transcoder_circuits"]
    strongest = nodes.iloc[1:].sort_values("attribution", key=abs, ascending=False).iloc[0]
    return (f"circuit of {nodes.iloc[0]['target']}: {len(nodes)} nodes; strongest input {strongest['kind']} "
            f"L{strongest['layer']} #{strongest['index']} ({strongest['attribution']:+.2f} of "
            f"{nodes.iloc[0]['attribution']:.2f})")  # fmt: skip
