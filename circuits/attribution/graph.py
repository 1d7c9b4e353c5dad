"""The attribution graph of a prompt: every direct effect between features, errors, inputs and targets of the local
replacement model (Ameisen et al. 2025, "Circuit Tracing"; circuit-tracer's ``attribute``).

1. Replacement model (:class:`~workbench.circuits.attribution.replacement.ReplacementModel`): attention patterns
   and norm scales frozen at the prompt, MLPs replaced by transcoders, one error node per (layer, position).
2. Targets (:func:`resolve_targets`): each is a direction read at one hook and position plus its own constant —
   ``logits`` (the most probable next tokens up to 0.95 probability, at most 10, demeaned over the vocabulary, as
   circuit-tracer), ``diff:A,B`` (logit A − logit B), ``feature:L:P:F`` (a transcoder feature's pre-activation),
   a probe direction (``probe_target``).
3. Rows by batched backward passes: the frozen forward runs once on ``batch_size`` copies of the prompt; each
   backward pass injects one row's read-out direction per batch element and returns, per element, the gradient at
   every source (MLP writes, token and position embeddings). Edge to a feature = activation × (decoder rows · the
   gradient at the MLP outputs it writes); to an error node = error · gradient; to an input = embedding · gradient.
   A row is exact: its edges plus its constant (the frozen forward at zero sources) equal its pre-activation.
4. Feature selection (``max_feature_nodes``): target rows first, then, until the budget is spent, the not yet
   visited features of highest estimated influence on the targets (influence through the row-normalised |A| of the
   rows computed so far), ``batch_size`` rows per pass.
5. The graph: node order [selected features, errors (layer-major, then position), token embeddings, position
   embeddings (where the model has one), targets]; ``adjacency`` [n_nodes, n_nodes] (row = target node, column =
   source node); replacement and completeness scores (:mod:`~workbench.circuits.attribution.pruning`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from workbench.circuits.attribution.heads import head_loadings
from workbench.circuits.attribution.pruning import graph_scores, node_influence
from workbench.circuits.attribution.replacement import HEAD_INPUT, ReplacementModel
from workbench.circuits.attribution.rows import Row, RowComputer
from workbench.circuits.attribution.transcoders import AttributionError, Transcoders, as_transcoders
from workbench.circuits.transcoder_circuits import salient_tokens

NODE_KINDS = ("feature", "error", "token", "position", "target")


@dataclass
class Target:
    """A read-out the graph explains: ``vector`` [d_model] · the activation at ``hook``, ``position`` + ``bias``.

    ``kind``: logit | diff | feature | probe; ``weight``: its share of the influence (a logit's probability, 1 for
    a single target); ``value``: its value on the prompt (demeaned logit, logit difference, pre-activation, probe
    value); ``token`` (logit), ``layer`` / ``feature`` (feature targets) name it in tables."""

    kind: str
    label: str
    hook: str
    position: int
    vector: torch.Tensor
    bias: float
    weight: float = 1.0
    value: float = float("nan")
    token: int = -1
    layer: int = -1
    feature: int = -1


@dataclass
class Graph:
    """An attribution graph. Node order: [selected features (n_features), errors (n_layers × n_pos, layer-major),
    token embeddings (n_pos), position embeddings (n_pos when ``has_pos_embed``), targets (n_targets)].

    ``features`` [n_features, 3] (layer, position, feature) with ``activations`` [n_features];
    ``adjacency`` [n_nodes, n_nodes]: row = target node, column = source node (direct effect); rows exist for
    features and targets (errors and inputs have no inputs). ``constants`` [n_nodes]: each row's bias term (the
    frozen model at zero sources plus the node's own bias); ``dropped`` [n_nodes]: what active features left out by
    ``max_feature_nodes`` contribute; so edges + constant + dropped = ``values`` (pre-activation, target value).
    ``scores``: replacement and completeness (circuit-tracer's definitions); ``head_loadings``: (target, source,
    layer, head, weight) splitting each cross-position edge over the heads that carry it (the parts of an edge sum
    to it; :mod:`~workbench.circuits.attribution.heads`), None when not computed. ``error_gap``: the replacement
    model's outputs with its error nodes and with them zeroed against the model's
    (:meth:`~workbench.circuits.attribution.replacement.ReplacementModel.error_gap`)."""

    model: str
    checkpoint: int | None
    prompt: str
    tokens: torch.Tensor
    token_texts: list[str]
    n_layers: int
    has_pos_embed: bool
    targets: list[Target]
    features: torch.Tensor
    activations: torch.Tensor
    adjacency: torch.Tensor
    constants: torch.Tensor
    dropped: torch.Tensor
    values: torch.Tensor
    n_active: int
    scores: dict[str, float] = field(default_factory=dict)
    head_loadings: pd.DataFrame | None = None
    error_gap: dict[str, float] = field(default_factory=dict)

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_inputs(self) -> int:
        return self.n_pos * (2 if self.has_pos_embed else 1)

    @property
    def n_targets(self) -> int:
        return len(self.targets)

    @property
    def n_nodes(self) -> int:
        return self.n_features + self.n_errors + self.n_inputs + self.n_targets

    @property
    def target_weights(self) -> torch.Tensor:
        """[n_nodes]: each target's weight (normalised to sum 1), 0 elsewhere."""
        weights = torch.zeros(self.n_nodes, dtype=torch.float64)
        given = torch.tensor([t.weight for t in self.targets], dtype=torch.float64)
        weights[self.n_nodes - self.n_targets :] = given / given.sum().clamp_min(1e-30)
        return weights

    def node_kinds(self) -> list[str]:
        return (
            ["feature"] * self.n_features
            + ["error"] * self.n_errors
            + ["token"] * self.n_pos
            + ["position"] * (self.n_pos if self.has_pos_embed else 0)
            + ["target"] * self.n_targets
        )

    def nodes(self) -> pd.DataFrame:
        """One row per node: node (index), kind, layer (inputs −1, targets n_layers or the feature target's layer),
        position, feature (feature index, token id for inputs and logits, −1 otherwise), label, activation (feature
        activation, error norm, NaN for inputs), value (rows: pre-activation / target value), constant, dropped,
        influence (on the targets through the normalised adjacency)."""
        positions = torch.arange(self.n_pos)
        layer = [
            *self.features[:, 0].tolist(),
            *torch.arange(self.n_layers).repeat_interleave(self.n_pos).tolist(),
            *[-1] * self.n_inputs,
            *[t.layer if t.kind == "feature" else self.n_layers for t in self.targets],
        ]
        position = [
            *self.features[:, 1].tolist(),
            *positions.repeat(self.n_layers).tolist(),
            *positions.repeat(self.n_inputs // self.n_pos).tolist(),
            *[t.position for t in self.targets],
        ]
        index = [
            *self.features[:, 2].tolist(),
            *[-1] * self.n_errors,
            *self.tokens.repeat(self.n_inputs // self.n_pos).tolist(),
            *[t.feature if t.kind == "feature" else t.token for t in self.targets],
        ]
        kinds = self.node_kinds()
        labels = [
            *(f"L{la} #{f} @{p}" for la, p, f in self.features.tolist()),
            *(f"error L{la} @{p}" for la in range(self.n_layers) for p in range(self.n_pos)),
            *(f"emb {self.token_texts[p]!r} @{p}" for p in range(self.n_pos)),
            *(f"pos @{p}" for p in range(self.n_pos) if self.has_pos_embed),
            *(t.label for t in self.targets),
        ]
        activation = torch.full((self.n_nodes,), float("nan"), dtype=torch.float64)
        activation[: self.n_features] = self.activations.double().cpu()
        return pd.DataFrame(
            {
                "node": range(self.n_nodes),
                "kind": kinds,
                "layer": layer,
                "position": position,
                "feature": index,
                "label": labels,
                "activation": activation.numpy(),
                "value": self.values.double().cpu().numpy(),
                "constant": self.constants.double().cpu().numpy(),
                "dropped": self.dropped.double().cpu().numpy(),
                "influence": node_influence(self).numpy(),
            }
        )

    def edges(self) -> pd.DataFrame:
        """Every nonzero edge: target (row node), source (column node), weight."""
        rows, cols = torch.nonzero(self.adjacency, as_tuple=True)
        return pd.DataFrame(
            {
                "target": rows.cpu().numpy(),
                "source": cols.cpu().numpy(),
                "weight": self.adjacency[rows, cols].double().cpu().numpy(),
            }
        )


# ---------------------------------------------------------------------------------------------- targets
def _unembedding(replacement: ReplacementModel) -> tuple[torch.Tensor, torch.Tensor, str, int | None]:
    """(W [d_out, d_in], b [d_out], the hook the head reads, the one position it reads or None): the output head
    the clean run found (an LM head, an MLM decoder after its frozen transform, a class-token classifier), else the
    model's LM head read at ``final_hook``."""
    model, dtype = replacement.model, replacement.dtype
    head, hook, position = replacement.head, HEAD_INPUT, replacement.head_position
    weight, bias = (head.weight, head.bias) if head is not None else (None, None)
    if head is None:
        weight, bias, hook = model.unembedding_matrix(), model.unembedding_bias(), replacement.final_hook
    if head is not None and position is not None:
        hook = replacement.final_hook
    if not isinstance(weight, torch.Tensor):
        raise AttributionError(
            f"{model.cfg.name} has no output head (LM head or classifier), so there is no logit to attribute; use "
            "--target feature:L:P:F or probe:NAME"
        )
    weight = weight.detach().to(dtype)
    zero = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device)
    return weight, zero if not isinstance(bias, torch.Tensor) else bias.detach().to(dtype), hook, position


def logit_targets(
    replacement: ReplacementModel,
    position: int = -1,
    max_logits: int = 10,
    probability: float = 0.95,
    tokens: Sequence[int] | None = None,
) -> list[Target]:
    """The next-token logits at ``position``: ``tokens`` or the most probable ones until ``probability`` is covered
    (at most ``max_logits``), each demeaned over the vocabulary (circuit-tracer's targets), weighted by probability."""
    w_u, b_u, hook, fixed = _unembedding(replacement)
    position = _position(position, replacement.n_pos) if fixed is None else fixed
    logits = replacement.logits[position] if fixed is None else replacement.logits
    chosen = salient_tokens(logits, max_logits, probability) if tokens is None else [int(t) for t in tokens]
    probabilities = torch.softmax(logits.double(), dim=0)
    text = _token_texts(replacement.model, torch.tensor(chosen))
    found = []
    for token, token_text in zip(chosen, text, strict=True):
        _check_token(token, w_u.shape[0])
        found.append(
            Target(
                "logit",
                f"logit {token_text!r} p={float(probabilities[token]):.3f} @{position}",
                hook,
                position,
                w_u[token] - w_u.mean(0),
                float(b_u[token] - b_u.mean()),
                float(probabilities[token]),
                float(logits[token] - logits.mean()),
                token=token,
            )
        )
    return found


def diff_target(replacement: ReplacementModel, token_a: int, token_b: int, position: int = -1) -> Target:
    """logit(A) − logit(B) at ``position``."""
    w_u, b_u, hook, fixed = _unembedding(replacement)
    for token in (token_a, token_b):
        _check_token(token, w_u.shape[0])
    position = _position(position, replacement.n_pos) if fixed is None else fixed
    logits = replacement.logits[position] if fixed is None else replacement.logits
    a, b = _token_texts(replacement.model, torch.tensor([token_a, token_b]))
    return Target(
        "diff",
        f"logit {a!r} − {b!r} @{position}",
        hook,
        position,
        w_u[token_a] - w_u[token_b],
        float(b_u[token_a] - b_u[token_b]),
        1.0,
        float(logits[token_a] - logits[token_b]),
        token=token_a,
    )


def feature_target(replacement: ReplacementModel, layer: int, position: int, feature: int) -> Target:
    """A transcoder feature's pre-activation at (layer, position)."""
    tc = replacement.transcoders
    if not 0 <= layer < tc.n_layers or not 0 <= feature < tc.d_transcoder(layer):
        raise AttributionError(
            f"feature {layer}:{feature} does not exist: layers 0..{tc.n_layers - 1}, features "
            f"0..{tc.d_transcoder(0) - 1}; pick one with --target feature:LAYER:POSITION:FEATURE"
        )
    position = _position(position, replacement.n_pos)
    index = torch.tensor([feature], device=replacement.inputs.device)
    vector, bias = tc.encoder_vectors(layer, index)
    value = float(replacement.inputs[layer, position] @ vector[0] + bias[0])
    return Target(
        "feature",
        f"L{layer} #{feature} @{position}",
        tc.hook_in(layer),
        position,
        vector[0],
        float(bias[0]),
        1.0,
        value,
        layer=layer,
        feature=feature,
    )


def probe_target(
    replacement: ReplacementModel,
    hook: str,
    vector: torch.Tensor,
    bias: float = 0.0,
    position: int = -1,
    label: str = "probe",
) -> Target:
    """A linear probe's read-out ``vector`` [d_model] · activation at ``hook``, ``position`` + ``bias``."""
    if hook not in set(replacement.model.hook_names()):
        raise AttributionError(f"{replacement.model.cfg.name} has no hook {hook!r} for the probe to read")
    d_model = replacement.model.cfg.d_model
    if vector.shape != (d_model,):
        raise AttributionError(
            f"the probe direction has shape {list(vector.shape)} but a target is a direction in "
            f"{replacement.model.cfg.name}'s residual stream (d_model={d_model}): it is a probe of another model or of "
            "a hook of another width; fit one on this model at a d_model-wide hook (e.g. blocks.L.hook_resid_post)"
        )
    position = _position(position, replacement.n_pos)
    vector = vector.detach().to(device=replacement.inputs.device, dtype=replacement.dtype)
    with torch.no_grad():
        _, reads = replacement.forward(replacement.clean_sources(), reads=[hook], until_head=True)
    value = float(reads[hook][0, position].to(replacement.dtype) @ vector + bias)
    return Target("probe", f"{label} @{position}", hook, position, vector, float(bias), 1.0, value)


@dataclass(frozen=True)
class ProbeReadout:
    """A linear read-out to attribute, given without a model: ``vector`` [d_model] · activation at ``hook`` +
    ``bias``, named ``label`` (e.g. a saved probe's logit for one class); resolved at the targets' position."""

    hook: str
    vector: torch.Tensor
    bias: float
    label: str


TARGET_FORMS = "logits | diff:A,B | feature:LAYER:POSITION:FEATURE | probe:NAME[:SITE[:LABEL]] (CLI)"


def resolve_targets(
    replacement: ReplacementModel,
    targets: Any,
    *,
    position: int = -1,
    max_logits: int = 10,
    logit_probability: float = 0.95,
) -> list[Target]:
    """Targets from a spec: ``"logits"``, ``"diff:A,B"`` (token ids or single-token texts), ``"feature:L:P:F"``, a
    :class:`ProbeReadout` (at ``position``), a :class:`Target`, or a list of these."""
    if isinstance(targets, (str, Target)):
        targets = [targets]
    found: list[Target] = []
    for spec in targets:
        if isinstance(spec, Target):
            found.append(spec)
        elif isinstance(spec, ProbeReadout):
            found.append(probe_target(replacement, spec.hook, spec.vector, spec.bias, position, spec.label))
        elif spec == "logits":
            found += logit_targets(replacement, position, max_logits, logit_probability)
        elif isinstance(spec, str) and spec.startswith("diff:") and spec.count(",") == 1:
            a, b = (_token_id(replacement.model, part) for part in spec[len("diff:") :].split(","))
            found.append(diff_target(replacement, a, b, position))
        elif isinstance(spec, str) and (match := re.fullmatch(r"feature:(-?\d+):(-?\d+):(\d+)", spec)):
            layer, at, feature = (int(g) for g in match.groups())
            found.append(feature_target(replacement, layer, at, feature))
        elif isinstance(spec, str) and spec.startswith("probe:"):
            raise AttributionError(
                f"target {spec!r} names a saved probe, which `workbench circuits attribute` reads; in Python pass "
                "ProbeReadout(hook, vector, bias, label) or probe_target(replacement, hook, vector, bias, position)"
            )
        else:
            raise AttributionError(f"target {spec!r} is not one of: {TARGET_FORMS}")
    if not found:
        raise AttributionError(f"no targets; pass one of: {TARGET_FORMS}")
    return found


def _token_id(model: Any, text: str) -> int:
    if text.lstrip("-").isdigit():
        token = int(text)
    else:
        if model.tokenizer is None:
            raise AttributionError(
                f"{model.cfg.name} has no tokenizer: name diff tokens by id (diff:123,456)"
            )
        tokenizer = model.tokenizer
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            pieces = f" ({', '.join(map(repr, tokenizer.convert_ids_to_tokens(ids)))})" if ids else ""
            raise AttributionError(
                f"{text!r} is {len(ids)} tokens{pieces}, not one; name a single token of the "
                "vocabulary (or its id) in diff:A,B"
            )
        token = ids[0]
        unknown = getattr(tokenizer, "unk_token", None)
        if unknown is not None and token == tokenizer.unk_token_id and text != unknown:
            raise AttributionError(
                f"{text!r} is not in the vocabulary (the tokenizer reads it as the unknown token "
                f"{unknown!r}); name a token of the vocabulary (or its id) in diff:A,B"
            )
    _check_token(token, model.cfg.d_vocab)
    return token


def _check_token(token: int, d_vocab: int) -> None:
    if not 0 <= token < d_vocab:
        raise AttributionError(
            f"token {token} is not in the vocabulary (0..{d_vocab - 1}); pick a token id below {d_vocab}"
        )


def _position(position: int, length: int) -> int:
    resolved = position + length if position < 0 else position
    if not 0 <= resolved < length:
        raise AttributionError(f"position {position} is outside the prompt of {length} tokens")
    return resolved


def _token_texts(model: Any, tokens: torch.Tensor) -> list[str]:
    if model.tokenizer is None:
        return [str(int(t)) for t in tokens]
    return [model.tokenizer.decode([int(t)]) for t in tokens]


def _partial_influence(
    matrix: torch.Tensor,
    row_nodes: torch.Tensor,
    weights: torch.Tensor,
    max_iter: int = 1000,
    chunk: int = 256,
) -> torch.Tensor:
    """Estimated influence of every column on the targets from the rows computed so far: ``matrix`` [n_rows,
    n_columns] (row r is column ``row_nodes[r]``'s inputs), ``weights`` [n_columns] (the targets' weights).

    Each step is current[row_nodes] · Â with Â = |matrix| / its row sums, taken ``chunk`` rows at a time, so the
    only copies of the matrix are ``chunk`` rows of |matrix| (no normalised [n_rows, n_columns] copy)."""
    sums = torch.cat([part.abs().sum(1) for part in matrix.split(chunk)]).clamp_min(1e-10)
    influence = torch.zeros_like(weights)
    current = weights
    for _ in range(max_iter):
        scaled = current[row_nodes] / sums
        active = torch.nonzero(scaled).flatten()
        if len(active) == 0:
            break
        current = torch.zeros_like(weights)
        for part in active.split(chunk):
            current += scaled[part] @ matrix[part].abs()
        if not bool(current.any()):
            break
        influence = influence + current
    return influence


def _prompt_tokens(model: Any, prompt: Any) -> tuple[torch.Tensor, str]:
    if isinstance(prompt, torch.Tensor) and prompt.is_floating_point():  # pixels [channels, height, width]
        digest = hashlib.sha256(prompt.detach().cpu().double().numpy().tobytes()).hexdigest()[:12]
        return prompt, f"image {list(prompt.shape[-3:])} sha256:{digest}"
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise AttributionError(f"{model.cfg.name} has no tokenizer: pass the prompt as token ids")
        return _text_tokens(model, prompt), prompt
    tokens = torch.as_tensor(prompt).reshape(-1).long()
    text = model.to_string(tokens) if model.tokenizer is not None else " ".join(map(str, tokens.tolist()))
    return tokens, str(text)


def _text_tokens(model: Any, text: str) -> torch.Tensor:
    """``text`` as the model tokenizes it [pos], refused when it has more tokens than the model has positions (the
    one check of a text prompt's length: the CLI relies on it). A tokenizer cuts a text at the model's positions
    silently, so it runs with room for every token the text can have (one per UTF-8 byte, plus special tokens); where
    the family cuts at the positions anyway (TransformerLens), a prompt that fills them is counted by the tokenizer
    itself."""
    tokens = model.tokenize([text], context_length=len(text.encode("utf-8")) + 16)["input_ids"][0]
    n_ctx, length = model.cfg.n_ctx, len(tokens)
    if n_ctx and length >= n_ctx:
        length = max(length, len(model.tokenizer(text)["input_ids"]))
    if n_ctx and length > n_ctx:
        raise AttributionError(
            f"the prompt has {length} tokens but {model.cfg.name} has {n_ctx} positions; shorten the prompt to at "
            f"most {n_ctx} tokens"
        )
    return tokens


def attribute(
    model: Any,
    transcoders: Any,
    prompt: Any,
    *,
    targets: Any = "logits",
    max_feature_nodes: int = 7500,
    batch_size: int = 64,
    position: int = -1,
    max_logits: int = 10,
    logit_probability: float = 0.95,
    dtype: torch.dtype | None = None,
    heads: bool = True,
    progress: bool = False,
) -> Graph:
    """The attribution graph of ``prompt`` (text or token ids [pos]) on ``model`` (a HookedModel) with
    ``transcoders`` (``{layer: SAE}``, a list of SAEs, a cross-layer transcoder or a ``Transcoders``).

    ``targets``: ``"logits"`` (the most probable next tokens at ``position`` until ``logit_probability``, at most
    ``max_logits``), ``"diff:A,B"``, ``"feature:L:P:F"``, a :class:`Target` (e.g. :func:`probe_target`), or a list;
    ``max_feature_nodes``: features kept, the most influential first; ``batch_size``: rows per backward pass;
    ``dtype``: the computation's dtype (default: the model's); ``heads``: split every cross-position edge into the
    graph's rows over the attention heads carrying it (``graph.head_loadings``; causal models)."""
    if max_feature_nodes < 0 or batch_size < 1:
        raise AttributionError(
            f"max_feature_nodes={max_feature_nodes} must be ≥ 0 and batch_size={batch_size} ≥ 1"
        )
    tc: Transcoders = as_transcoders(model, transcoders, dtype)
    tokens, text = _prompt_tokens(model, prompt)
    replacement = ReplacementModel(model, tc, tokens)
    resolved = resolve_targets(
        replacement, targets, position=position, max_logits=max_logits, logit_probability=logit_probability
    )
    reads = sorted({t.hook for t in resolved})
    heads = heads and bool(model.cfg.causal)
    if heads:
        reads += [f"blocks.{layer}.attn.hook_z" for layer in range(replacement.n_layers)]
    computer = RowComputer(replacement, reads, batch_size)
    n_active, n_targets = computer.n_active, len(resolved)
    n_columns = computer.n_columns + n_targets  # targets are columns too (no outgoing edges)
    budget = min(max_feature_nodes, n_active)
    matrix = torch.zeros(n_targets + budget, n_columns, dtype=tc.dtype, device=replacement.inputs.device)
    row_nodes = torch.zeros(n_targets + budget, dtype=torch.long, device=matrix.device)
    bar = tqdm(total=n_targets + budget, desc="attribution rows", unit="row", disable=not progress)
    target_rows = [Row(t.hook, t.position, t.vector) for t in resolved]
    for start in range(0, n_targets, batch_size):
        chunk = target_rows[start : start + batch_size]
        matrix[start : start + len(chunk), : computer.n_columns] = computer.rows(chunk)
        bar.update(len(chunk))
    row_nodes[:n_targets] = torch.arange(n_columns - n_targets, n_columns)
    weights = torch.zeros(n_columns, dtype=tc.dtype, device=matrix.device)
    given = torch.tensor([t.weight for t in resolved], dtype=tc.dtype)
    weights[n_columns - n_targets :] = given / given.sum().clamp_min(1e-30)
    visited = torch.zeros(n_active, dtype=torch.bool, device=matrix.device)
    filled = n_targets
    encoders = [tc.encoder_vectors(layer, computer.active[layer][:, 1]) for layer in range(tc.n_layers)]
    enc_vectors = torch.cat([e[0] for e in encoders]) if n_active else torch.zeros(0, tc.d_model)
    while filled - n_targets < budget:
        if budget == n_active:
            pending = torch.nonzero(~visited).flatten()
        else:
            influence = _partial_influence(matrix[:filled], row_nodes[:filled], weights)[:n_active]
            order = torch.argsort(influence, descending=True)
            pending = order[~visited[order]][: max(batch_size * 4, 1)]
        pending = pending[: budget - (filled - n_targets)]
        # layer-major within what is pending: a batch of low-layer rows backpropagates through fewer layers
        pending = pending[torch.sort(computer.features[pending, 0], stable=True).indices]
        for chunk in pending.split(batch_size):
            rows = [
                Row(tc.hook_in(int(computer.features[i, 0])), int(computer.features[i, 1]), enc_vectors[i])
                for i in chunk.tolist()
            ]
            matrix[filled : filled + len(chunk), : computer.n_columns] = computer.rows(rows)
            row_nodes[filled : filled + len(chunk)] = chunk
            visited[chunk] = True
            filled += len(chunk)
            bar.update(len(chunk))
    bar.close()
    return _assemble(
        model,
        replacement,
        computer,
        resolved,
        matrix,
        row_nodes,
        visited,
        text,
        replacement.tokens,
        encoders,
        heads,
    )


def _assemble(
    model: Any,
    replacement: ReplacementModel,
    computer: RowComputer,
    targets: list[Target],
    matrix: torch.Tensor,
    row_nodes: torch.Tensor,
    visited: torch.Tensor,
    text: str,
    tokens: torch.Tensor,
    encoders: list[tuple[torch.Tensor, torch.Tensor]],
    heads: bool,
) -> Graph:
    """Phase 5: the node-ordered adjacency over the selected features, with constants, dropped parts and values."""
    n_active, n_targets = computer.n_active, len(targets)
    feature_rows = row_nodes[n_targets:]
    selected = torch.sort(feature_rows).values  # keep the (layer, position, feature) order
    n_features = len(selected)
    others = torch.arange(n_active, matrix.shape[1], device=matrix.device)
    columns = torch.cat([selected, others])  # node order: selected features, errors, inputs, targets
    n_nodes = len(columns)
    node_of_column = torch.full((matrix.shape[1],), -1, dtype=torch.long, device=matrix.device)
    node_of_column[columns] = torch.arange(n_nodes, device=matrix.device)
    adjacency = torch.zeros(n_nodes, n_nodes, dtype=matrix.dtype, device=matrix.device)
    row_index = node_of_column[row_nodes]
    adjacency[row_index] = matrix[:, columns]
    dropped = torch.zeros(n_nodes, dtype=matrix.dtype, device=matrix.device)
    dropped[row_index] = matrix[:, :n_active] @ (~visited).to(
        matrix.dtype
    )  # a matrix-vector product: no copy
    all_vectors = (
        torch.cat([e[0] for e in encoders]) if n_active else torch.zeros(0, replacement.transcoders.d_model)
    )
    all_biases = torch.cat([e[1] for e in encoders]) if n_active else torch.zeros(0)
    tc = replacement.transcoders
    rows = [
        Row(tc.hook_in(int(computer.features[i, 0])), int(computer.features[i, 1]), all_vectors[i])
        for i in selected.tolist()
    ] + [Row(t.hook, t.position, t.vector) for t in targets]
    constants = torch.zeros(n_nodes, dtype=matrix.dtype, device=matrix.device)
    values = torch.full((n_nodes,), float("nan"), dtype=matrix.dtype, device=matrix.device)
    if rows:
        zero = computer.constants(rows)
        own = torch.cat(
            [
                all_biases[selected].to(matrix.dtype),
                torch.tensor([t.bias for t in targets], dtype=matrix.dtype, device=matrix.device),
            ]
        )
        row_nodes_final = torch.cat(
            [torch.arange(n_features), torch.arange(n_nodes - n_targets, n_nodes)]
        ).to(matrix.device)
        constants[row_nodes_final] = zero + own
        features = computer.features[selected]
        pre = (replacement.inputs[features[:, 0], features[:, 1]] * all_vectors[selected]).sum(
            -1
        ) + all_biases[selected]
        values[:n_features] = pre
        values[n_nodes - n_targets :] = torch.tensor([t.value for t in targets], dtype=matrix.dtype)
    graph = Graph(
        model=model.cfg.name,
        checkpoint=model.cfg.checkpoint,
        prompt=text,
        tokens=tokens.cpu(),
        token_texts=_token_texts(model, tokens),
        n_layers=replacement.n_layers,
        has_pos_embed=replacement.has_pos_embed,
        targets=targets,
        features=computer.features[selected].cpu(),
        activations=computer.activations[selected].cpu(),
        adjacency=adjacency.cpu(),
        constants=constants.cpu(),
        dropped=dropped.cpu(),
        values=values.cpu(),
        n_active=n_active,
    )
    graph.scores = graph_scores(graph)
    graph.error_gap = replacement.error_gap(
        has_logits=replacement.head is not None or model.unembedding_matrix() is not None
    )
    if heads and rows:
        node_rows = [*range(n_features), *range(n_nodes - n_targets, n_nodes)]
        graph.head_loadings = head_loadings(computer, rows, node_rows, node_of_column[: computer.n_columns])
    return graph
