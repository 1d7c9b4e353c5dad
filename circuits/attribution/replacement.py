"""The local replacement model of one prompt (Ameisen et al. 2025, "Circuit Tracing", §2.2).

The model is made linear in its residual stream around the prompt, without changing a single output value:

1. Clean run: one forward pass of the model on the prompt records every layer's MLP input (the transcoders'
   ``hook_in``) and MLP output, every attention pattern [head, query, key], and every norm's scale per position,
   its ``hook_scale`` [pos, 1] (LayerNorm: σ = sqrt(var + ε); RMSNorm: rms = sqrt(mean x² + ε)), the hook point each
   adapter declares for every norm (TransformerLens models have them natively).
2. Transcoders: features f_l = encode_l(MLP input of layer l) [pos, d_transcoder]; error node e_l = true MLP
   output − the transcoders' reconstruction [pos, d_model], so the replacement reproduces the model exactly.
3. Frozen forward (:meth:`ReplacementModel.forward`): the model's own modules run with every attention pattern
   replaced by its clean value (so attention is linear in its values, OV), every ``hook_scale`` replaced by its clean
   value, so each norm computes γ ⊙ (x − mean x) / σ_clean + β (LayerNorm) or γ ⊙ x / rms_clean (RMSNorm) — a constant, never
   differentiated — every elementwise activation the adapter declares (``capabilities.activations``: ``P.hook_post``
   = f(``P.hook_pre``), an MLP's or an MLM head's) replaced by its prompt gain f(x)/x times its input (linear, and
   the same value at the prompt), and every MLP output replaced by a *source* tensor (decoded features + b_dec +
   error) plus the skip path x @ W_skip of skip transcoders. The token embedding (and the position embedding where the model has
   one) are source tensors too. The frozen forward is affine in the sources: its value at the clean sources is
   the model's, at zero sources (every feature, error and embedding zero; decoder biases kept) it is the bias
   constant of every read-out.

What a model has (a position embedding, a final norm, elementwise activations, an LM head) comes from its hook names
and its adapter's capabilities; nothing here branches on a family name or finds a norm or an activation by its
module type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workbench.adapters.base import Site
from workbench.circuits.attribution.transcoders import AttributionError, Transcoders

POS_EMBED_HOOK = "hook_pos_embed"
HEAD_INPUT = (
    "output_head.input"  # a read of the output head's input [batch, pos, d_in] (no hook point: a module hook)
)


@dataclass
class Sources:
    """The frozen forward's inputs, each [batch, ...]: ``embed`` [batch, pos, d_model], ``pos_embed`` (None without a
    position embedding), ``writes`` [batch, n_layers, pos, d_model] (each MLP's output minus its skip path)."""

    embed: torch.Tensor
    pos_embed: torch.Tensor | None
    writes: torch.Tensor

    def leaves(self) -> list[torch.Tensor]:
        return [t for t in (self.writes, self.embed, self.pos_embed) if t is not None]


def _gain(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The prompt gain f(x)/x of an elementwise activation y = f(x) (0 where x is 0), in x's shape [pos, width]."""
    return torch.where(x != 0, y.to(x.dtype) / torch.where(x != 0, x, 1), 0)


@dataclass
class _FrozenActivation:
    """An elementwise activation ``{prefix}.hook_post`` = f(``{prefix}.hook_pre``) as its prompt gain: the output
    is gain ⊙ input (linear, equal to f at the prompt). ``keep_input`` hooks the input, ``output`` the output."""

    prefix: str
    gain: torch.Tensor  # [pos, width]
    kept: torch.Tensor | None = None

    def keep_input(self, activation: torch.Tensor, hook: Any) -> None:
        self.kept = activation

    def output(self, activation: torch.Tensor, hook: Any) -> torch.Tensor:
        assert self.kept is not None, f"{self.prefix}.hook_pre did not run before {self.prefix}.hook_post"
        x, self.kept = self.kept, None
        return (x * self.gain.to(x.dtype)).to(activation.dtype)


class _HeadReached(Exception):
    """Raised by a pre-hook on the output head to end a frozen forward whose reads are all recorded."""


def _stop(module: nn.Module, args: tuple) -> None:
    raise _HeadReached


@dataclass
class ValueMap:
    """The value part of one layer's fused Q/K/V projection as an explicit affine map: v = x @ ``weight`` + ``bias``
    (x [..., d_model] the projection's input, ``weight`` [d_model, n_kv · d_head], ``bias`` [n_kv · d_head]).

    With patterns frozen, queries and keys are constants, so the frozen forward computes each such layer's head
    outputs itself, z[b, q, h] = Σ_k pattern[h, q, k] · v[b, k, h // group], from this map, and the backward pass
    never touches the query and key columns of the fused projection (two thirds of its matmul) or the model's split
    of its output (a zero-filled [batch, pos, 3 · d_model] gradient per layer). Layers whose value projection is a
    module of its own need no map: the backward already reaches only it."""

    module: nn.Module
    weight: torch.Tensor
    bias: torch.Tensor
    n_kv: int
    d_head: int


def value_map(model: Any, layer: int, dtype: torch.dtype) -> ValueMap | None:
    """The :class:`ValueMap` of ``layer`` when the model's adapter says its values come out of a fused projection (one
    module site feeding ``attn.hook_q``, ``hook_k`` and ``hook_v``), read off the module itself (its outputs at 0 and
    at the unit vectors, split by the adapter's own layout); None otherwise (separate projections, TransformerLens)."""
    name = f"blocks.{layer}.attn.hook_v"
    sites = [s for s in getattr(model, "sites", []) if isinstance(s, Site) and name in s.names]
    if len(sites) != 1 or len(sites[0].names) == 1 or sites[0].when != "output" or sites[0].split is None:
        return None
    site, split = sites[0], sites[0].split
    parameter = next(site.module.parameters(), None)
    if parameter is None:
        return None
    d_model = model.cfg.d_model
    probe = torch.cat([torch.zeros(1, d_model), torch.eye(d_model)]).to(parameter)[None]  # [1, 1 + d, d]
    with torch.no_grad():
        output = site.module(probe)
    output = output[0] if isinstance(output, tuple) else output
    values = split(output)[site.names.index(name)][0].to(dtype)  # [1 + d, n_kv, d_head]
    n_kv, d_head = values.shape[1:]
    bias = values[0].flatten()
    return ValueMap(site.module, values[1:].flatten(1) - bias, bias, n_kv, d_head)


class ReplacementModel:
    """The local replacement model of ``tokens`` [pos] on ``model`` (a HookedModel) with ``transcoders``.

    Attributes (all on the model's device, in its dtype): ``logits`` [pos, d_vocab] (the model's), ``inputs``
    [n_layers, pos, d_model] (MLP inputs at each ``hook_in``), ``activations`` (per layer [pos, d_transcoder]),
    ``errors`` and ``writes`` [n_layers, pos, d_model], ``embed`` / ``pos_embed`` [pos, d_model], ``patterns`` (per
    layer [head, query, key]), ``scales`` (every norm's ``hook_scale`` -> [pos, 1], frozen), ``final_hook`` (the
    hook the unembedding reads: the final norm's ``ln_final.hook_normalized``, or the last ``hook_resid_post``
    without a final norm)."""

    def __init__(self, model: Any, transcoders: Transcoders, tokens: torch.Tensor):
        self.model, self.transcoders = model, transcoders
        given = torch.as_tensor(tokens)
        # pixels [channels, height, width] (a ViT): the positions (class token, patches) come from the embedding
        self.pixels = (
            given.reshape(1, *given.shape[-3:]).to(model.device) if given.is_floating_point() else None
        )
        self.tokens = given.reshape(-1).long().to(model.device) if self.pixels is None else torch.zeros(0)
        self.n_pos, self.n_layers = len(self.tokens), model.cfg.n_layers
        n_ctx = model.cfg.n_ctx
        if self.pixels is None and n_ctx and self.n_pos > n_ctx:
            raise AttributionError(
                f"the prompt has {self.n_pos} tokens but {model.cfg.name} has {n_ctx} positions; shorten the prompt"
            )
        names = set(model.hook_names())
        self.has_pos_embed = POS_EMBED_HOOK in names
        self.final_hook = model.capabilities.final_hook or f"blocks.{self.n_layers - 1}.hook_resid_post"
        self.scale_hooks = [name for name in model.hook_names() if name.endswith(".hook_scale")]
        self.dtype = transcoders.dtype
        self._clean_run()

    # ------------------------------------------------------------------ phase 1-2: the clean run
    def _clean_run(self) -> None:
        model, tc = self.model, self.transcoders
        hooks = ["hook_embed", self.final_hook, *(tc.hook_in(layer) for layer in range(self.n_layers))]
        hooks += [tc.hook_out(layer) for layer in range(self.n_layers)]
        hooks += [f"blocks.{layer}.attn.hook_pattern" for layer in range(self.n_layers)]
        hooks += [POS_EMBED_HOOK] if self.has_pos_embed else []
        hooks += self.scale_hooks
        activations = model.capabilities.activations
        hooks += [f"{prefix}.hook_{end}" for prefix in activations for end in ("pre", "post")]
        linear: list[
            tuple[nn.Module, torch.Tensor, torch.Tensor]
        ] = []  # the last nn.Linear run: the output head?

        def record_linear(module: nn.Module, args: tuple, output: Any) -> None:
            linear[:] = [(module, args[0].detach(), output)]

        maps = [value_map(model, layer, self.dtype) for layer in range(self.n_layers)]
        hooks += [f"blocks.{layer}.attn.hook_v" for layer, m in enumerate(maps) if m is not None]
        value_inputs: dict[nn.Module, torch.Tensor] = {}

        def record_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
            value_inputs[module] = (args[0] if args else next(iter(kwargs.values()))).detach()

        handles = [
            m.module.register_forward_pre_hook(record_input, with_kwargs=True) for m in maps if m is not None
        ]
        handles += [
            m.register_forward_hook(record_linear) for m in model.model.modules() if isinstance(m, nn.Linear)
        ]
        try:
            with torch.no_grad(), model.capture(sorted(set(hooks)), device=None) as cache:
                output = model(self._batched(1))
        finally:
            for handle in handles:
                handle.remove()
        self.logits = output[0].to(self.dtype)
        self.gains = {
            p: _gain(cache[f"{p}.hook_pre"][0].to(self.dtype), cache[f"{p}.hook_post"][0])
            for p in activations
        }
        self.scales = {name: cache[name][0] for name in self.scale_hooks}  # [pos, 1], the model's dtype

        def get(name: str) -> torch.Tensor:
            return cache[name][0].to(self.dtype)

        self.embed = get("hook_embed")
        if self.pixels is not None:
            self.n_pos = self.embed.shape[0]
            self.tokens = torch.arange(self.n_pos, device=model.device)
        self.pos_embed = get(POS_EMBED_HOOK) if self.has_pos_embed else None
        self.patterns = [get(f"blocks.{layer}.attn.hook_pattern") for layer in range(self.n_layers)]
        self.final = get(self.final_hook)
        self.inputs = torch.stack([get(tc.hook_in(layer)) for layer in range(self.n_layers)])
        outputs = torch.stack([get(tc.hook_out(layer)) for layer in range(self.n_layers)])
        self.activations = [tc.encode(layer, self.inputs[layer]) for layer in range(self.n_layers)]
        predicted = torch.stack(tc.reconstruct(list(self.inputs), self.activations))
        self.errors = outputs - predicted
        self.writes = outputs.clone()
        self._find_head(linear, output)
        # each value map must give the model's own values on the prompt, else that layer keeps the model's path
        self.value_maps: list[ValueMap | None] = []
        for layer, m in enumerate(maps):
            if m is not None:
                mine = (value_inputs[m.module][0].to(self.dtype) @ m.weight + m.bias).unflatten(
                    -1, (m.n_kv, m.d_head)
                )
                theirs = get(f"blocks.{layer}.attn.hook_v")
                m = (
                    m
                    if torch.allclose(mine, theirs, atol=1e-4 * max(1.0, float(theirs.abs().max())), rtol=0)
                    else None
                )
            self.value_maps.append(m)
        for layer in range(self.n_layers):
            skip = tc.skip_weight(layer)
            if skip is not None:
                self.writes[layer] -= self.inputs[layer] @ skip

    def _find_head(
        self, linear: list[tuple[nn.Module, torch.Tensor, torch.Tensor]], output: torch.Tensor
    ) -> None:
        """The output head: the last ``nn.Linear`` of the clean run when its output is what the model returns
        (an LM head, an MLM decoder, a classifier). ``head_position`` is None when it reads every position (its
        input is read at :data:`HEAD_INPUT`), else the one position of ``final_hook`` it reads (a class token)."""
        self.head: nn.Module | None = None
        self.head_position: int | None = None
        if not linear or linear[0][2].data_ptr() != output.data_ptr() or linear[0][2].shape != output.shape:
            return
        module, x, _ = linear[0]
        if x.ndim == 3:
            self.head = module
            return
        final = self.final.to(x.dtype)
        matches = [p for p in range(self.n_pos) if torch.allclose(final[p], x[0], atol=1e-6, rtol=1e-5)]
        if len(matches) == 1:
            self.head, self.head_position = module, matches[0]

    def _batched(self, batch: int) -> torch.Tensor:
        if self.pixels is not None:
            return self.pixels.expand(batch, -1, -1, -1)
        return self.tokens[None].expand(batch, -1)

    # ------------------------------------------------------------------ phase 3: the frozen forward
    def clean_sources(self, batch: int = 1, grad: bool = False) -> Sources:
        """The prompt's own sources repeated ``batch`` times (leaves requiring grad when ``grad``)."""

        def leaf(x: torch.Tensor | None) -> torch.Tensor | None:
            if x is None:
                return None
            return x[None].expand(batch, *x.shape).clone().requires_grad_(grad)

        embed, writes = leaf(self.embed), leaf(self.writes)
        assert embed is not None and writes is not None
        return Sources(embed, leaf(self.pos_embed), writes)

    def zero_sources(self) -> Sources:
        """Every node zero — features, errors, embeddings — with the decoder biases b_dec kept in each MLP's write
        (batch 1): the frozen forward then gives each read-out's bias constant."""
        sources = self.clean_sources()
        biases = torch.stack([self.transcoders.decoder_bias(layer) for layer in range(self.n_layers)])
        writes = biases[None, :, None].expand_as(sources.writes).to(sources.writes).clone()
        return Sources(
            torch.zeros_like(sources.embed),
            None if sources.pos_embed is None else torch.zeros_like(sources.pos_embed),
            writes,
        )

    def error_gap(self, has_logits: bool = True) -> dict[str, float]:
        """How far the replacement model is from the model, over every position of the prompt:
        ``reproduction_max_diff`` (with its error nodes: max |output − model output|, rounding only),
        ``errors_zeroed_max_diff`` (every error node zeroed: max |output − model output|) and, when the output is a
        logit vector (``has_logits``), ``errors_zeroed_kl`` (mean over positions of KL(model ‖ replacement without
        errors), nats) and ``errors_zeroed_top1`` (share of positions whose most likely output stays the same)."""
        with torch.no_grad():
            sources = self.clean_sources(batch=2)
            sources.writes[1] -= self.errors
            out, _ = self.forward(sources)
        assert out is not None
        out, truth = out.double(), self.logits.double()
        gap = {
            "reproduction_max_diff": float((out[0] - truth).abs().max()),
            "errors_zeroed_max_diff": float((out[1] - truth).abs().max()),
            "errors_zeroed_kl": float("nan"),
            "errors_zeroed_top1": float("nan"),
        }
        if has_logits:
            log_p, log_q = truth.log_softmax(-1), out[1].log_softmax(-1)
            gap["errors_zeroed_kl"] = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
            gap["errors_zeroed_top1"] = float((truth.argmax(-1) == out[1].argmax(-1)).double().mean())
        return gap

    def forward(
        self,
        sources: Sources,
        reads: Sequence[str] = (),
        patterns: Sequence[torch.Tensor] | None = None,
        until_head: bool = False,
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Run the frozen replacement model on ``sources`` → (logits [batch, pos, d_vocab], {hook: activation
        [batch, pos, ...]} for every transcoder ``hook_in`` and each hook of ``reads``, attached to the autograd
        graph: a read is on the path to the output, so a gradient with respect to it is the model's). ``patterns``
        (per layer [head, query, key]) replace the prompt's frozen patterns (head loadings use their diagonals).

        ``until_head``: stop where the output head starts (logits None): the backward passes of attribution rows
        read hooks only, and a batch of copies' logits ([batch, pos, d_vocab]) would be the largest tensor of the
        pass. Every MLP's hidden activation (``mlp.hook_pre``) is detached unless a read is inside that MLP: its
        output is replaced by a source, so keeping its hidden layer for a backward pass would only hold memory
        ([batch, pos, d_mlp] per layer)."""
        tc, batch = self.transcoders, sources.writes.shape[0]
        recorded: dict[str, torch.Tensor] = {}
        patterns = self.patterns if patterns is None else patterns

        def replace_with(value: torch.Tensor):
            def replace(activation: torch.Tensor, hook: Any) -> torch.Tensor:
                return value.to(activation.dtype)

            return replace

        def record(activation: torch.Tensor, hook: Any) -> torch.Tensor:
            recorded[hook.name] = activation.clone()  # a new tensor the model goes on with
            return recorded[hook.name]

        # one view per layer: its backward stacks the layers' gradients instead of zero-filling a copy per layer
        writes = sources.writes.unbind(1)

        def mlp_out(layer: int):
            skip = tc.skip_weight(layer)

            def replace(activation: torch.Tensor, hook: Any) -> torch.Tensor:
                out = writes[layer]
                if skip is not None:
                    out = out + recorded[tc.hook_in(layer)].to(skip.dtype) @ skip
                return out.to(activation.dtype)

            return replace

        # layers with a fused Q/K/V projection: the head outputs z from the frozen pattern and the value map
        value_inputs: dict[int, torch.Tensor] = {}

        def heads_from_values(layer: int, vm: ValueMap):
            name, pattern = f"blocks.{layer}.attn.hook_v", patterns[layer]
            group = pattern.shape[0] // vm.n_kv

            def replace(activation: torch.Tensor, hook: Any) -> torch.Tensor:
                x = value_inputs.pop(layer).to(vm.weight.dtype)
                values = (x @ vm.weight + vm.bias).unflatten(
                    -1, (vm.n_kv, vm.d_head)
                )  # [batch, pos, kv, d_head]
                recorded[name] = values  # the values on the path (hook_v's own activation is not, here)
                if group > 1:
                    values = values.repeat_interleave(group, dim=2)
                return torch.einsum("hqk,bkhd->bqhd", pattern.to(values.dtype), values).to(activation.dtype)

            return replace

        hooks = [("hook_embed", replace_with(sources.embed))]
        if (
            sources.pos_embed is not None
        ):  # the position embedding's output is [1, pos, d]: carried by hook_embed
            hooks = [
                ("hook_embed", replace_with(sources.embed + sources.pos_embed)),
                (POS_EMBED_HOOK, lambda activation, hook: torch.zeros_like(activation)),
            ]
        hooks += [
            (name, replace_with(scale[None].expand(batch, *scale.shape)))
            for name, scale in self.scales.items()
        ]
        bypassed = set()
        for layer, vm in enumerate(self.value_maps):
            if vm is not None:
                hooks.append((f"blocks.{layer}.attn.hook_z", heads_from_values(layer, vm)))
                bypassed.add(f"blocks.{layer}.attn.hook_v")
            else:
                pattern = patterns[layer][None].expand(batch, *patterns[layer].shape)
                hooks.append((f"blocks.{layer}.attn.hook_pattern", replace_with(pattern)))
        hooks += [(tc.hook_out(layer), mlp_out(layer)) for layer in range(self.n_layers)]
        detached = [
            f"blocks.{layer}.mlp"
            for layer in range(self.n_layers)
            if not any(r.startswith(f"blocks.{layer}.mlp.") for r in reads)
        ]
        hooks += [(f"{prefix}.hook_pre", lambda activation, hook: activation.detach()) for prefix in detached]
        # every other declared activation at its prompt gain: its output replaced before a read records it, its
        # input kept after (so the frozen output stays on the path of a read of the input)
        frozen = [
            _FrozenActivation(prefix, gain) for prefix, gain in self.gains.items() if prefix not in detached
        ]
        hooks += [(f"{f.prefix}.hook_post", f.output) for f in frozen]
        for name in dict.fromkeys([*(tc.hook_in(layer) for layer in range(self.n_layers)), *reads]):
            if name == HEAD_INPUT or name in bypassed:
                continue
            hooks.append((name, record))
        hooks += [(f"{f.prefix}.hook_pre", f.keep_input) for f in frozen]
        head = None
        if self.head is not None and self.head_position is None and HEAD_INPUT in reads:

            def head_input(module: nn.Module, args: tuple) -> tuple:
                recorded[HEAD_INPUT] = args[0].clone()
                return (recorded[HEAD_INPUT], *args[1:])

            head = self.head.register_forward_pre_hook(head_input)
        handles = [
            vm.module.register_forward_pre_hook(self._keep_input(value_inputs, layer), with_kwargs=True)
            for layer, vm in enumerate(self.value_maps)
            if vm is not None
        ]
        if until_head and self.head is not None:
            handles.append(self.head.register_forward_pre_hook(_stop))
        logits: torch.Tensor | None = None
        try:
            with self.model.hooks([h for h in hooks if h[0] != HEAD_INPUT]):
                logits = self.model(self._batched(batch))
        except _HeadReached:
            pass
        finally:
            if head is not None:
                head.remove()
            for handle in handles:
                handle.remove()
        return logits, recorded

    @staticmethod
    def _keep_input(store: dict[int, torch.Tensor], layer: int):
        def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
            store[layer] = args[0] if args else next(iter(kwargs.values()))

        return keep
