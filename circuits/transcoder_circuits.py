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
  a table and a plotly graph.

The contributions through an attention head to its source position are linearised (the head's pattern is held
fixed and its LayerNorm is differentiated at the prompt's values); everything else is exact.

:func:`run` traces one circuit on a prompt taken from any dataset (``workbench.datasets``) with transcoders of
any rotary model (``ANALYSIS`` declares the ``transcoder_circuits`` table; :func:`write_results` stores it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch

from workbench.analysis import Analysis, Table, write_tables
from workbench.circuits.circuit_export import node_label, token_text
from workbench.datasets import load_dataset
from workbench.model import HookedModel
from workbench.references import resolve_model

ROTARY_FAMILIES = ("gpt_neox", "llama")


class CircuitError(ValueError):
    """Bad circuit query: unknown layer or feature, position out of range, transcoders that do not fit."""


def _check(transcoders: Mapping[int, torch.nn.Module], layer: int, feature: int) -> torch.nn.Module:
    if layer not in transcoders:
        raise CircuitError(f"no transcoder at layer {layer}; transcoder layers: {sorted(transcoders)}")
    transcoder = transcoders[layer]
    if not 0 <= feature < transcoder.d_sae:
        raise CircuitError(f"feature {feature} is out of range for layer {layer} (d_sae={transcoder.d_sae})")
    return transcoder


def _reads_attention_of_own_layer(transcoder) -> bool:
    return transcoder.hook_in.endswith("hook_resid_mid")


def layer_of(transcoder) -> int:
    """The layer whose residual stream a circuit transcoder reads (``blocks.L.hook_resid_pre|mid``)."""
    parts = transcoder.hook_in.split(".")
    if parts[0] != "blocks" or not parts[1].isdigit() or not parts[-1].startswith("hook_resid_"):
        raise CircuitError(
            f"transcoder hook_in {transcoder.hook_in!r} is not a residual-stream hook; circuits need transcoders "
            "trained on blocks.L.hook_resid_pre (parallel blocks) or blocks.L.hook_resid_mid (sequential blocks)"
        )
    return int(parts[1])


def pullback(
    transcoders: Mapping[int, torch.nn.Module], layer: int, feature: int, top_k: int | None = 20
) -> pd.DataFrame:
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


def deembedding(
    model: HookedModel, transcoders: Mapping[int, torch.nn.Module], layer: int, feature: int, top_k: int = 20
) -> pd.DataFrame:
    """Tokens whose embedding most excites (and inhibits) the feature directly: W_E e, rows (token, text, score)."""
    target = _check(transcoders, layer, feature)
    scores = model.embedding_matrix().detach().float().cpu() @ target.W_enc[:, feature].detach().float().cpu()
    order = torch.cat([scores.topk(top_k).indices, (-scores).topk(top_k).indices])
    texts = [model.to_str_tokens([int(t)])[0] if model.tokenizer is not None else str(int(t)) for t in order]
    return pd.DataFrame({"token": order.numpy(), "text": texts, "score": scores[order].numpy()})


@dataclass
class _Trace:
    """One prompt's activations, all float32 on the CPU: resid_pre / resid_mid per layer [pos, d],
    v [layer][pos, head, d_head], pattern [layer][head, q, k], attention-output bias [layer][pos, d] (what the
    attention output holds beyond its heads' writes), transcoder activations and errors [layer][pos, d_sae | d]."""

    tokens: torch.Tensor
    resid: dict[str, torch.Tensor]
    values: list[torch.Tensor]
    patterns: list[torch.Tensor]
    latents: dict[int, torch.Tensor]
    errors: dict[int, torch.Tensor]
    embed: torch.Tensor
    attn_bias: list[torch.Tensor]


def _trace(model: HookedModel, transcoders: Mapping[int, torch.nn.Module], tokens: torch.Tensor) -> _Trace:
    if model.cfg.family not in ROTARY_FAMILIES:
        raise CircuitError(
            f"transcoder circuits need a rotary causal LM ({', '.join(ROTARY_FAMILIES)}), whose residual stream is "
            f"token embedding + attention + MLP writes only; got {model.cfg.family!r}"
        )
    tokens = torch.as_tensor(tokens).reshape(1, -1)
    names = ["hook_embed", "blocks.*.hook_resid_pre", "blocks.*.attn.hook_v", "blocks.*.attn.hook_pattern",
             "blocks.*.hook_mlp_out", "blocks.*.hook_attn_out", "blocks.*.attn.hook_z"]  # fmt: skip
    names += [t.hook_in for t in transcoders.values()]
    with torch.no_grad(), model.capture(sorted(set(model.resolve(names)))) as cache:
        model(tokens)
    n_layers = model.cfg.n_layers
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
    values = [get(f"blocks.{index}.attn.hook_v") for index in range(n_layers)]
    patterns = [get(f"blocks.{index}.attn.hook_pattern") for index in range(n_layers)]
    attn_bias = []
    for index in range(n_layers):  # attn_out − Σ_h z_h W_O[h]: the output projection's bias (0 without one)
        w_o = model.head_output_weights(index).detach().float().cpu()
        heads = torch.einsum("phd,hdm->pm", get(f"blocks.{index}.attn.hook_z"), w_o)
        attn_bias.append(get(f"blocks.{index}.hook_attn_out") - heads)
    return _Trace(tokens[0].cpu(), resid, values, patterns, latents, errors, get("hook_embed"), attn_bias)


def _require_layers_below(transcoders: Mapping[int, torch.nn.Module], layer: int) -> None:
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
    transcoders: Mapping[int, torch.nn.Module],
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
    transcoders: Mapping[int, torch.nn.Module],
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


def _pre_activation(transcoder, trace: _Trace, position: int, feature: int) -> float:
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
    """Nodes of a greedy path search: id, parent, depth, kind, layer, index, position, attribution (in units of
    the target's pre-activation), text (token shown at the position)."""

    nodes: pd.DataFrame

    def labelled(self) -> pd.DataFrame:
        """The nodes with ``node`` (a readable name: ``L0 #198 @31 "m"``, ``emb "m" @31``, ``head L0.H2 ← @5 "x"``)
        and ``token`` (the position's token with whitespace drawn) columns."""
        names = [node_label(r.kind, int(r.layer), int(r.index), int(r.position), str(r.text))
                 for r in self.nodes.itertuples()]  # fmt: skip
        return self.nodes.assign(node=names, token=[f'"{token_text(str(t))}"' for t in self.nodes["text"]])

    def figure(self) -> go.Figure:
        """The circuit drawn as circuit-tracer draws graphs: token positions across (tick labels are the prompt's
        tokens at integer positions), layers up (embedding at the bottom), one marker per node with a readable
        label, one line per edge, width ∝ |attribution| (red excites, blue inhibits). Nodes sharing a (layer,
        position) cell are spread within it."""
        nodes = self.labelled().set_index("id")
        row = nodes["layer"].where(nodes["kind"] != "embedding", -1)
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
        short = [("★ " if r.kind == "target" else "") + (f"L{r.layer}.H{r.index}" if r.kind == "attention" else
                 r.token if r.kind == "embedding" else f"L{r.layer} #{r.index}") for r in nodes.itertuples()]  # fmt: skip
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
                   "ticktext": ["embedding" if v < 0 else f"L{v}" for v in layers]},
            title="transcoder circuit (red: excites, blue: inhibits; ★ target)",
        )  # fmt: skip
        return fig


def find_paths(
    model: HookedModel,
    transcoders: Mapping[int, torch.nn.Module],
    tokens: torch.Tensor | Sequence[int],
    layer: int,
    feature: int,
    position: int = -1,
    top_k: int = 3,
    depth: int = 3,
) -> CircuitGraph:
    """Greedy top-k path search from a target feature: at each node keep the ``top_k`` strongest contributors
    (transcoder features, attention heads × source positions, the token embedding) and expand transcoder and
    attention nodes until ``depth``. Attributions are expressed in the target's pre-activation units."""
    if top_k < 1 or depth < 1:
        raise CircuitError(f"top_k={top_k} and depth={depth} must be ≥ 1")
    target = _check(transcoders, layer, feature)
    _require_layers_below(transcoders, layer)
    trace = _trace(model, transcoders, tokens)
    position = _position(position, len(trace.tokens))
    texts = (
        model.to_str_tokens(trace.tokens)
        if model.tokenizer is not None
        else [str(int(t)) for t in trace.tokens]
    )
    vector = target.W_enc[:, feature].detach().float().cpu()
    pre = _pre_activation(target, trace, position, feature)
    nodes = [{"id": 0, "parent": -1, "depth": 0, "kind": "target", "layer": layer, "index": feature,
              "position": position, "attribution": pre, "text": texts[position]}]  # fmt: skip
    attention_layers = layer + 1 if _reads_attention_of_own_layer(target) else layer
    frontier = [(0, vector, layer, attention_layers, position)]
    for level in range(1, depth + 1):
        next_frontier = []
        for parent, node_vector, below, attention_below, at in frontier:
            rows = _contributions(model, transcoders, trace, node_vector, below, attention_below, at)
            rows = rows[rows["kind"].isin(["transcoder", "attention", "embedding"])]
            rows = rows.reindex(rows["attribution"].abs().sort_values(ascending=False).index).head(top_k)
            for row in rows.itertuples():
                node_id = len(nodes)
                source = int(row.source_position)
                nodes.append({"id": node_id, "parent": parent, "depth": level, "kind": row.kind,
                              "layer": int(row.layer), "index": int(row.index), "position": source,
                              "attribution": float(row.attribution), "text": texts[source]})  # fmt: skip
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
    return CircuitGraph(pd.DataFrame(nodes))


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
    value = cache[name][0, source, head].float().cpu()
    (gradient,) = torch.autograd.grad(value @ direction, resid)
    return trace.patterns[layer][head, query, source] * gradient[0, source].detach()


def by_layer(
    transcoders: Mapping[int, torch.nn.Module] | Sequence[torch.nn.Module],
) -> dict[int, torch.nn.Module]:
    """Transcoders keyed by the layer they read (``blocks.L.hook_resid_pre|mid``); a list is keyed by its hooks."""
    if isinstance(transcoders, Mapping):
        return dict(transcoders)
    keyed: dict[int, torch.nn.Module] = {}
    for transcoder in transcoders:
        layer = layer_of(transcoder)
        if layer in keyed:
            raise CircuitError(
                f"two transcoders read layer {layer} ({transcoder.hook_in}); pass one per layer"
            )
        keyed[layer] = transcoder
    return keyed


def check_transcoders(model: HookedModel, transcoders: Mapping[int, torch.nn.Module]) -> None:
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
              columns=("prompt_index", "id", "parent", "depth", "kind", "layer", "index", "position", "attribution",
                       "text"),
              description="nodes of a greedy path search from a target transcoder feature (target = "
              "L<layer>#<feature>@<position>) on a prompt of the dataset; attributions in the target's "
              "pre-activation units"),
    ),
    requires=("rotary", "tokenizer", "text"),
    description="transcoder circuits: exact attribution and greedy path search through transcoders and heads",
)  # fmt: skip


def run(
    model: HookedModel,
    data,
    transcoders: Mapping[int, torch.nn.Module] | Sequence[torch.nn.Module],
    *,
    layer: int | None = None,
    feature: int | None = None,
    prompt_index: int = 0,
    position: int = -1,
    context_length: int = 64,
    top_k: int = 3,
    depth: int = 3,
) -> dict[str, pd.DataFrame]:
    """The circuit of a transcoder feature on a prompt taken from ``data`` → {"transcoder_circuits": nodes}.

    Args:
        model: a rotary causal LM (GPT-NeoX / Llama), e.g. from ``workbench.references.resolve_model``.
        data: a text or token Dataset; the prompt is its token row ``prompt_index`` (at most ``context_length``
            tokens, one document per row).
        transcoders: {layer: transcoder} or a list keyed by their hooks; every layer below the target needs one.
        layer, feature: the target (default: the highest transcoder layer and its most active feature at
            ``position``).
    """
    ANALYSIS.check(model, data)
    transcoders = by_layer(transcoders)
    check_transcoders(model, transcoders)
    layer = max(transcoders) if layer is None else layer
    if feature is not None:
        _check(transcoders, layer, feature)
    _require_layers_below(transcoders, layer)
    rows = data.token_rows(model.tokenizer, context_length=context_length, max_rows=prompt_index + 1)
    if len(rows) <= prompt_index:
        raise CircuitError(
            f"dataset {data.name!r} has {len(rows)} token row(s), so there is no prompt {prompt_index}; pick "
            f"--prompt-index 0..{len(rows) - 1}"
        )
    tokens = torch.tensor(rows[prompt_index], dtype=torch.long)
    at = _position(position, len(tokens))
    if feature is None:
        target = _check(transcoders, layer, 0)
        with torch.no_grad(), model.capture(target.hook_in) as cache:
            model(tokens[None].to(model.device))
            x = cache[target.hook_in][0, at].to(device=target.device, dtype=torch.float32)
            feature = int(target.encode(x).argmax())
    graph = find_paths(model, transcoders, tokens, layer=layer, feature=feature, position=at, top_k=top_k,
                       depth=depth)  # fmt: skip
    prompt = model.to_string(tokens) if model.tokenizer is not None else " ".join(map(str, tokens.tolist()))
    nodes = graph.nodes.assign(model=model.cfg.name, checkpoint=model.cfg.checkpoint, dataset=data.name,
                               hook=transcoders[layer].hook_in, prompt=prompt, prompt_index=prompt_index,
                               target=f"L{layer}#{feature}@{at}")  # fmt: skip
    return {"transcoder_circuits": nodes}


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
