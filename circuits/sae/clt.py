"""Cross-layer transcoder (CLT; Ameisen et al. 2025, "Circuit Tracing", transformer-circuits.pub): config, module,
training loss, and its two on-disk layouts (ours and circuit-tracer's).

A CLT over ``n_layers`` layers has one encoder per layer, reading that layer's MLP input, and a decoder from
layer i into the MLP output of every layer j ≥ i:

1. Encode: x_i [n, d_model] (``blocks.i.<hook_in>``) → pre-activations h_i = x_i W_enc[i] + b_enc[i]
   [n, d_transcoder] → features f_i = act(h_i): JumpReLU (h · 1[h > θ]; ReLU is θ = 0), TopK (the k largest of
   each layer's row) or BatchTopK (the k · n largest of each layer's batch while training, a learned per-layer
   threshold after).
2. Decode: out_j = Σ_{i≤j} f_i W_dec[i][:, j−i] + b_dec[j] (+ x_j W_skip[j] with a skip connection), the prediction
   of ``blocks.j.<hook_out>``.
3. Loss (``training_forward`` + ``sparsity_loss``): Σ_j ‖out_j − y_j‖² (mean over tokens) plus, for JumpReLU,
   λ_S Σ_{i,f} tanh(c · ‖W_dec[i][f]‖ · f_{i,f}) (or the straight-through L0 count, ``sparsity="l0"``) and the
   pre-activation term λ_P Σ_{i,f} ReLU(θ_{i,f} − h_{i,f}) · ‖W_dec[i][f]‖ that keeps latents from dying;
   ‖W_dec[i][f]‖ is latent f's decoder norm over every target layer (``decoder_norm``: "sum" of the per-target
   norms, or "concat": the norm of the concatenated decoders). TopK / BatchTopK: AuxK on dead latents instead.

Shapes are layer-major, as circuit-tracer's: W_enc [n_layers, d_model, d_transcoder], b_enc and threshold
[n_layers, d_transcoder], W_dec[i] [d_transcoder, n_layers − i, d_model], b_dec [n_layers, d_model], W_skip
[n_layers, d_model, d_model]; inputs x [n_layers, n, d_model] → latents [n_layers, n, d_transcoder] → outputs
[n_layers, n, d_model].

Layouts: ``save`` / ``load_clt_dir`` (``clt_weights.safetensors`` + ``workbench_clt.json``) and
``save_circuit_tracer`` (per layer ``W_enc_{i}.safetensors``: ``W_enc_{i}`` [d_transcoder, d_model], ``b_enc_{i}``,
``b_dec_{i}``, ``threshold_{i}``; ``W_dec_{i}.safetensors``: ``W_dec_{i}``; ``config.yaml``), read back by
``formats.circuit_tracer.load_clt``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.circuits.sae.base import SAEInputError
from workbench.circuits.sae.jumprelu import _JumpReLU, _Step
from workbench.circuits.sae.tensors import read_safetensors, require
from workbench.circuits.sae.topk import _ChosenPreActivations, _SparseDecode, largest_k, topk_activation
from workbench.fileio import atomic_save_tensors, atomic_write_text

CLT_WEIGHTS_FILE = "clt_weights.safetensors"
CLT_CONFIG_FILE = "workbench_clt.json"
CLT_ACTIVATIONS = ("jumprelu", "relu", "topk", "batchtopk")
CLT_ARCHITECTURES = {"clt": "jumprelu", "clt_relu": "relu", "clt_topk": "topk", "clt_batchtopk": "batchtopk"}
HOOK_ALIASES = {  # circuit-tracer's TransformerBridge names → ours
    "mlp.hook_in": "ln2.hook_normalized",
    "mlp.hook_out": "hook_mlp_out",
    "hook_mlp_in": "hook_resid_mid",
}


def block_hook(name: str, layer: int) -> str:
    """``blocks.{layer}.<hook>`` for a circuit-tracer per-layer hook name."""
    return f"blocks.{layer}.{HOOK_ALIASES.get(name, name)}"


@dataclass
class CLTConfig:
    """Everything needed to rebuild a CLT. ``hook_in`` / ``hook_out`` are per-layer hook names (``ln2.
    hook_normalized``, ``hook_mlp_out``; ``blocks.{layer}.`` is prefixed per layer); ``layers`` are the model layers
    of the CLT's n_layers (None: 0 … n_layers − 1). ``k``: TopK / BatchTopK latents per token and layer."""

    n_layers: int
    d_model: int
    d_transcoder: int
    activation: str = "jumprelu"
    k: int | None = None
    skip: bool = False
    sparsity: str = "tanh"  # JumpReLU: "tanh" (Anthropic) or "l0" (straight-through count)
    sparsity_coefficient: float = 0.1
    tanh_scale: float = 4.0
    decoder_norm: str = "sum"  # "sum" of per-target decoder norms, or "concat" (norm of the concatenation)
    pre_act_coefficient: float = 3e-6
    bandwidth: float = 0.05
    init_threshold: float = 0.05
    aux_k_coefficient: float = 1 / 32
    aux_k: int | None = None
    hook_in: str = "ln2.hook_normalized"
    hook_out: str = "hook_mlp_out"
    layers: list[int] | None = None
    model: str = ""
    checkpoint: int | None = None
    dataset: str = ""

    def __post_init__(self) -> None:
        if self.activation not in CLT_ACTIVATIONS:
            raise SAEInputError(
                f"unknown CLT activation {self.activation!r}; use one of {list(CLT_ACTIVATIONS)}"
            )
        if min(self.n_layers, self.d_model, self.d_transcoder) <= 0:
            raise SAEInputError(
                f"n_layers, d_model and d_transcoder must be positive, got {self.n_layers}, "
                f"{self.d_model}, {self.d_transcoder}"
            )
        if self.activation in ("topk", "batchtopk") and (
            self.k is None or not 0 < self.k <= self.d_transcoder
        ):
            raise SAEInputError(
                f"k={self.k} is invalid for d_transcoder={self.d_transcoder}: pass 1 <= k <= "
                "d_transcoder (latents per token and layer)"
            )
        if self.sparsity not in ("tanh", "l0") or self.decoder_norm not in ("sum", "concat"):
            raise SAEInputError(
                f"sparsity={self.sparsity!r}, decoder_norm={self.decoder_norm!r}: use 'tanh' or "
                "'l0', and 'sum' or 'concat'"
            )
        if self.layers is None:
            self.layers = list(range(self.n_layers))
        self.layers = [int(layer) for layer in self.layers]
        if len(self.layers) != self.n_layers or sorted(set(self.layers)) != self.layers:
            raise SAEInputError(f"layers={self.layers} must be {self.n_layers} increasing model layers")

    @property
    def architecture(self) -> str:
        return next(name for name, act in CLT_ARCHITECTURES.items() if act == self.activation)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CLTConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


def clt_parameter_count(cfg: CLTConfig) -> int:
    """Encoders L·d·F, decoders L(L+1)/2·F·d, biases, thresholds and the optional skip matrices."""
    n, d, f = cfg.n_layers, cfg.d_model, cfg.d_transcoder
    return n * d * f + n * (n + 1) // 2 * f * d + 2 * n * f + n * d + (n * d * d if cfg.skip else 0)


def clt_training_bytes(cfg: CLTConfig, batch_rows: int) -> int:
    """Bytes one training process holds for a CLT: float32 weights, gradients and two Adam moments (16 bytes per
    parameter) and a step's activations (inputs, targets, predictions and their gradients, ≈ 6 · L · rows · d, and
    pre-activations, features and their gradients, ≈ 5 · L · rows · F, float32)."""
    activations = cfg.n_layers * batch_rows * (6 * cfg.d_model + 5 * cfg.d_transcoder)
    return 16 * clt_parameter_count(cfg) + 4 * activations


class CrossLayerTranscoder(nn.Module):
    """A cross-layer transcoder: features of layer i read ``hook_in`` of layer i and write to the ``hook_out`` of
    every layer j ≥ i (the module docstring gives the algorithm and shapes).

    Built from tensors (``load_clt`` reads circuit-tracer's files into this) or from a config (:meth:`create`,
    random initialisation for training). ``W_dec`` is a ParameterList: ``W_dec[i]`` [d_transcoder, n_layers − i,
    d_model]. ``threshold`` is a parameter for a JumpReLU CLT and a buffer otherwise (zeros: ReLU; BatchTopK: its
    learned per-layer threshold, −1 until trained)."""

    # data-parallel (set by the trainer): gathers a tensor [n] of every rank into [world · n]
    batch_gather: Callable[[torch.Tensor], torch.Tensor] | None = None
    # W_enc stays [n_layers, d_model, F]: the sparse TopK / AuxK backward adds its [n_layers · F, d_model] rows
    # through one temporary, 1 / batch of the step's dense encoder product
    latent_major_parameters: tuple[str, ...] = ()
    # False: TopK trains through the dense formulation (benchmarks/clt.py times both)
    sparse_training: bool = True

    def __init__(
        self,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        threshold: torch.Tensor,
        W_dec: Sequence[torch.Tensor],
        b_dec: torch.Tensor,
        hook_in: str,
        hook_out: str,
        W_skip: torch.Tensor | None = None,
        cfg: CLTConfig | None = None,
    ):
        super().__init__()
        n_layers, d_model, d_transcoder = W_enc.shape
        if len(W_dec) != n_layers or any(
            tuple(w.shape) != (d_transcoder, n_layers - i, d_model) for i, w in enumerate(W_dec)
        ):
            raise SAEInputError(
                f"W_dec must hold {n_layers} tensors [d_transcoder, n_layers − i, d_model] = "
                f"[{d_transcoder}, {n_layers} − i, {d_model}], got "
                f"{[list(w.shape) for w in W_dec]}"
            )
        if cfg is None:
            activation = "jumprelu" if bool((threshold > 0).any()) else "relu"
            cfg = CLTConfig(
                n_layers,
                d_model,
                d_transcoder,
                activation=activation,
                skip=W_skip is not None,
                hook_in=hook_in,
                hook_out=hook_out,
            )
        self.cfg = cfg
        self.n_layers, self.d_model, self.d_transcoder = n_layers, d_model, d_transcoder
        self.hook_in, self.hook_out = hook_in, hook_out
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(b_enc)
        if cfg.activation == "jumprelu":
            self.threshold = nn.Parameter(threshold.float())
        else:
            self.register_buffer("threshold", threshold.float())
        self.W_dec = nn.ParameterList([nn.Parameter(w) for w in W_dec])
        self.b_dec = nn.Parameter(b_dec)
        self.W_skip = nn.Parameter(W_skip) if W_skip is not None else None

    @classmethod
    def create(cls, cfg: CLTConfig) -> CrossLayerTranscoder:
        """A freshly initialised CLT (draws from the global RNG): each latent's decoders are a random direction per
        target layer, scaled so that their concatenation has unit norm, and its encoder is its own-layer decoder
        direction (the trainer's data initialisation then centres and scales the encoder)."""
        n, d, f = cfg.n_layers, cfg.d_model, cfg.d_transcoder
        decoders = []
        for i in range(n):
            w = torch.randn(f, n - i, d)
            decoders.append(w / w.norm(dim=-1, keepdim=True) / math.sqrt(n - i))
        w_enc = torch.stack([w[:, 0] / w[:, 0].norm(dim=-1, keepdim=True) for w in decoders]).transpose(1, 2)
        threshold = torch.full((n, f), cfg.init_threshold if cfg.activation == "jumprelu" else 0.0)
        if cfg.activation == "batchtopk":
            threshold = torch.full((n, f), -1.0)
        return cls(
            w_enc.contiguous(),
            torch.zeros(n, f),
            threshold,
            decoders,
            torch.zeros(n, d),
            cfg.hook_in,
            cfg.hook_out,
            torch.zeros(n, d, d) if cfg.skip else None,
            cfg,
        )

    # ------------------------------------------------------------------------------------------------ names
    @property
    def layers(self) -> list[int]:
        return list(self.cfg.layers or range(self.n_layers))

    def hooks(self, layer: int) -> tuple[str, str]:
        """(input hook, output hook) of the CLT's ``layer``-th layer (model layer ``layers[layer]``)."""
        model_layer = self.layers[layer]
        return block_hook(self.hook_in, model_layer), block_hook(self.hook_out, model_layer)

    @property
    def hook_names(self) -> tuple[list[str], list[str]]:
        """(every input hook, every output hook), in layer order."""
        pairs = [self.hooks(i) for i in range(self.n_layers)]
        return [a for a, _ in pairs], [b for _, b in pairs]

    @property
    def d_sae(self) -> int:
        """Latents in all: n_layers · d_transcoder."""
        return self.n_layers * self.d_transcoder

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    # ------------------------------------------------------------------------------------------------ forward
    def check_input(self, x: torch.Tensor, name: str = "x") -> None:
        """Raise SAEInputError unless x is [n_layers, n, d_model] and finite."""
        if x.ndim != 3 or x.shape[0] != self.n_layers or x.shape[-1] != self.d_model:
            raise SAEInputError(
                f"{name} has shape {list(x.shape)}, but this CLT reads [n_layers={self.n_layers}, "
                f"n, d_model={self.d_model}]: stack each layer's {self.hook_in!r}"
            )
        if x.numel() and not bool(torch.isfinite(x.sum())):
            bad = (~torch.isfinite(x).all(-1)).nonzero()
            if len(bad):
                layer, row = (int(v) for v in bad[0])
                raise SAEInputError(
                    f"{name} has NaN/inf values in row {row} of layer {self.layers[layer]} "
                    f"({self.hooks(layer)[0]}): fix or drop those activations"
                )

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """x [n_layers, n, d_model] → h [n_layers, n, d_transcoder] (one batched product)."""
        return torch.baddbmm(self.b_enc[:, None], x.to(self.W_enc.dtype), self.W_enc)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """Inference features from pre-activations [n_layers, n, d_transcoder] (same shape)."""
        if self.cfg.activation == "topk" or (
            self.cfg.activation == "batchtopk" and float(self.threshold.min()) < 0
        ):
            return topk_activation(pre, int(self.cfg.k or 1))
        return pre.relu() * (pre > self.threshold[:, None]).to(pre.dtype)

    def encode_layer(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """One layer's features: x [n, d_model] (layer ``layer``'s input) → [n, d_transcoder]."""
        pre = torch.addmm(self.b_enc[layer], x.to(self.W_enc.dtype), self.W_enc[layer])
        if self.cfg.activation == "topk" or (
            self.cfg.activation == "batchtopk" and float(self.threshold.min()) < 0
        ):
            return topk_activation(pre, int(self.cfg.k or 1))
        return pre.relu() * (pre > self.threshold[layer]).to(pre.dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [n_layers, n, d_model] (each layer's input) → latents [n_layers, n, d_transcoder]."""
        return self.activation(self.pre_activation(x))

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """latents [n_layers, n, d_transcoder] → outputs [n_layers, n, d_model]: out_j = Σ_{i≤j} f_i W_dec[i][:, j−i]
        + b_dec[j] (+ x_j W_skip[j] for a skip CLT, which needs its input x [n_layers, n, d_model])."""
        n = f.shape[1]
        out = self.b_dec[:, None].expand(-1, n, -1).to(f.dtype).clone()
        for source in range(self.n_layers):
            w = self.W_dec[source]
            writes = f[source] @ w.reshape(self.d_transcoder, -1).to(f.dtype)  # [n, (L − i) · d]
            out[source:] += writes.view(n, self.n_layers - source, self.d_model).transpose(0, 1)
        if self.W_skip is not None:
            if x is None:
                raise SAEInputError("a skip CLT's decode needs its input x: call decode(f, x)")
            out = out + torch.bmm(x.to(self.W_skip.dtype), self.W_skip).to(out.dtype)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted MLP outputs [n_layers, n, d_model] of inputs x [n_layers, n, d_model]."""
        return self.decode(self.encode(x), x)

    def decoder_norms(self) -> torch.Tensor:
        """[n_layers, d_transcoder]: each latent's decoder norm over its target layers (``cfg.decoder_norm``)."""
        norms = []
        for w in self.W_dec:
            per_target = w.norm(dim=-1)  # [F, L − i]
            norms.append(
                per_target.sum(-1) if self.cfg.decoder_norm == "sum" else per_target.pow(2).sum(-1).sqrt()
            )
        return torch.stack(norms)

    # ------------------------------------------------------------------------------------------------ training
    def training_forward(
        self, x: torch.Tensor, dead_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """x [n_layers, batch, d_model] → (latents [n_layers, batch, F], prediction [n_layers, batch, d_model],
        pre-activations [n_layers, batch, F], {}) with straight-through threshold gradients (JumpReLU) or the
        batch-level cut (BatchTopK). TopK goes sparse (:meth:`_sparse_topk_forward`; its latents a sparse COO
        tensor)."""
        act = self.cfg.activation
        if act == "topk" and self.sparse_training:
            return self._sparse_topk_forward(x)
        pre = self.pre_activation(x)
        if act == "jumprelu" and self.threshold.requires_grad:
            f = torch.stack(
                [_JumpReLU.apply(pre[i], self.threshold[i], self.cfg.bandwidth) for i in range(self.n_layers)]
            ).relu()
        elif act == "batchtopk":
            f = self._batch_topk(pre)
        else:
            f = self.activation(pre)
        return f, self.decode(f, x), pre, {}

    def _chosen_values(self, x: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The pre-activations ``values`` [n_layers, batch, k] (computed without autograd) at latents index
        [n_layers, batch, k], relu'd, carrying gradient into W_enc and b_enc at those latents only
        (``topk._ChosenPreActivations`` over every layer at once: latent (i, f) is row i · F + f)."""
        n_layers, batch, k = index.shape
        offset = torch.arange(n_layers, device=index.device)[:, None, None] * self.d_transcoder
        flat = _ChosenPreActivations.apply(
            x.reshape(n_layers * batch, self.d_model),
            self.W_enc,
            self.b_enc,
            (index + offset).reshape(-1, k),
            values.reshape(-1, k),
        )
        return flat.view(n_layers, batch, k).relu()

    def _sparse_writes(self, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Σ_{i≤j} Σ_m values[i, :, m] · W_dec[i][index[i, :, m], j − i]: what the chosen latents (index, values
        [n_layers, batch, k]) write to each layer, [n_layers, batch, d_model], through the k chosen decoder rows
        of each source layer only (``topk._SparseDecode``: an embedding_bag whose backward touches those rows)."""
        batch = index.shape[1]
        out = values.new_zeros(self.n_layers, batch, self.d_model)
        for source in range(self.n_layers):
            writes = _SparseDecode.apply(index[source], values[source], self.W_dec[source])
            out[source:] += writes.view(batch, self.n_layers - source, self.d_model).transpose(0, 1)
        return out

    def _sparse_topk_forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """TopK training without dense latents: the pre-activations [n_layers, batch, F] once without autograd
        (the step's one dense product), the k largest per row, gradient only at those; the latents come back as a
        sparse COO tensor [n_layers, batch, F] (n_layers · batch · k entries). Gradients equal the dense
        formulation's (tested)."""
        with torch.no_grad():
            pre = self.pre_activation(x)
            chosen, index = largest_k(pre, int(self.cfg.k or 1))
        values = self._chosen_values(x, index, chosen)
        out = self._sparse_writes(index, values) + self.b_dec[:, None]
        if self.W_skip is not None:
            out = out + torch.bmm(x.to(self.W_skip.dtype), self.W_skip)
        n_layers, batch, k = index.shape
        layer = torch.arange(n_layers, device=x.device).repeat_interleave(batch * k)
        row = torch.arange(batch, device=x.device).repeat_interleave(k).repeat(n_layers)
        f = torch.sparse_coo_tensor(
            torch.stack([layer, row, index.reshape(-1)]),
            values.detach().reshape(-1),
            pre.shape,
            check_invariants=False,
        )
        return f, out, pre, {}

    def _batch_topk(self, pre: torch.Tensor) -> torch.Tensor:
        """pre [n_layers, batch, F] → latents keeping, per layer, the k · batch largest positive entries of the
        (global, data-parallel) batch; the per-layer threshold follows the smallest kept value (EMA 0.99)."""
        k = int(self.cfg.k or 1)
        flat = pre.relu().flatten(1)  # [L, batch · F]
        with torch.no_grad():
            if self.batch_gather is not None:
                rows = int(self.batch_gather(pre.new_tensor([pre.shape[1]])).sum())
                n_global = min(k * rows, rows * self.d_transcoder)
                offered = flat.detach().topk(min(n_global, flat.shape[1]), dim=1).values
                pad = offered.new_full((self.n_layers, n_global - offered.shape[1]), -torch.inf)
                candidates = self.batch_gather(torch.cat([offered, pad], 1).reshape(-1))
                candidates = candidates.view(-1, self.n_layers, n_global).transpose(0, 1).flatten(1)
                cut = candidates.topk(n_global, dim=1).values[:, -1]
            else:
                cut = flat.topk(min(k * pre.shape[1], flat.shape[1]), dim=1).values[:, -1]
            cut = cut.clamp_min(torch.finfo(pre.dtype).tiny)
            current = self.threshold[:, 0]
            updated = torch.where(current < 0, cut.float(), 0.99 * current + 0.01 * cut.float())
            self.threshold.copy_(updated[:, None].expand_as(self.threshold))
        return pre.relu() * (pre >= cut[:, None, None]).to(pre.dtype)

    def sparsity_loss(self, f: torch.Tensor, pre: torch.Tensor) -> dict[str, torch.Tensor]:
        """f, pre [n_layers, batch, F] → {name: scalar []}: JumpReLU's tanh (or L0) penalty and pre-activation term,
        ReLU's decoder-norm-weighted L1; TopK / BatchTopK none (AuxK is :meth:`aux_loss`)."""
        act = self.cfg.activation
        if act in ("topk", "batchtopk"):
            return {}
        norms = self.decoder_norms()[:, None]  # [L, 1, F]
        if act == "relu":
            return {"l1": self.cfg.sparsity_coefficient * (f * norms).sum((0, 2)).mean()}
        if self.cfg.sparsity == "tanh":
            penalty = torch.tanh(self.cfg.tanh_scale * norms * f).sum((0, 2)).mean()
        else:
            penalty = (
                torch.stack(
                    [
                        _Step.apply(pre[i], self.threshold[i], self.cfg.bandwidth).sum(-1)
                        for i in range(self.n_layers)
                    ]
                )
                .sum(0)
                .mean()
            )
        losses = {"sparsity": self.cfg.sparsity_coefficient * penalty}
        if self.cfg.pre_act_coefficient:
            below = (self.threshold[:, None] - pre).relu() * norms
            losses["pre_act"] = self.cfg.pre_act_coefficient * below.sum((0, 2)).mean()
        return losses

    def auxiliary_losses(self, x, y, f, pre) -> dict[str, torch.Tensor]:
        return {}

    def aux_loss(
        self, x: torch.Tensor, pre: torch.Tensor, residual: torch.Tensor, dead_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """AuxK for TopK / BatchTopK CLTs (scalar []): per source layer, the aux_k largest pre-activations among its
        dead latents (dead_mask [n_layers, F]; pre [n_layers, batch, F], detached) decode through every decoder to
        reconstruct the residual [n_layers, batch, d_model] (detached), with gradient into those latents' encoders
        and decoders (sparse, as the TopK step); normalised by the residual's variance. aux_k = cfg.aux_k or
        d_model // 2, at most the most dead latents of any layer (a layer with fewer adds zeros). Zero when
        nothing is dead."""
        if self.cfg.activation not in ("topk", "batchtopk") or dead_mask is None or not bool(dead_mask.any()):
            return pre.new_zeros(())
        dead = dead_mask.to(pre.device)
        aux_k = min(self.cfg.aux_k or self.d_model // 2, int(dead.sum(-1).max()))
        with torch.no_grad():
            chosen, index = largest_k(pre.detach().masked_fill(~dead[:, None], -torch.inf), aux_k)
        recon = self._sparse_writes(index, self._chosen_values(x, index, chosen.nan_to_num(0.0, neginf=0.0)))
        denom = (residual - residual.mean(1, keepdim=True)).pow(2).sum((0, 2)).mean().clamp_min(1e-8)
        return self.cfg.aux_k_coefficient * (recon - residual).pow(2).sum((0, 2)).mean() / denom

    @torch.no_grad()
    def initialize_from_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Data initialisation from the first batch x, y [n_layers, batch, d_model]: b_dec = mean target (less the
        skip path), encoders centred on the mean input (b_enc = −mean(x) W_enc), and the encoder (and JumpReLU
        thresholds) scaled by the least-squares factor making the initial reconstruction best fit y − b_dec."""
        skip = torch.bmm(x, self.W_skip) if self.W_skip is not None else torch.zeros_like(y)
        self.b_dec.copy_((y - skip).mean(1))
        self.b_enc.copy_(-(x.mean(1)[:, None] @ self.W_enc)[:, 0])
        pred = self.decode(self.encode(x), x) - self.b_dec[:, None] - skip
        c = float((pred * (y - skip - self.b_dec[:, None])).sum() / pred.pow(2).sum().clamp_min(1e-12))
        if math.isfinite(c) and c > 0:
            self.W_enc.mul_(c)
            self.b_enc.mul_(c)
            if self.cfg.activation == "jumprelu":
                self.threshold.mul_(c)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """TopK / BatchTopK: each latent's concatenated decoder to unit norm (JumpReLU / ReLU penalise the norm)."""
        if self.cfg.activation in ("topk", "batchtopk"):
            for w in self.W_dec:
                w.div_(w.flatten(1).norm(dim=1).clamp_min(1e-8)[:, None, None])

    @torch.no_grad()
    def clamp_threshold(self) -> None:
        if self.cfg.activation == "jumprelu":
            self.threshold.clamp_(min=1e-6)

    @torch.no_grad()
    def fold_scaling(self, scale_in: Sequence[float], scale_out: Sequence[float]) -> None:
        """Make a CLT trained on x_l · scale_in[l] → y_l · scale_out[l] act on raw activations (same latents)."""
        s_in = torch.tensor(list(scale_in), dtype=self.W_enc.dtype, device=self.device)
        s_out = torch.tensor(list(scale_out), dtype=self.W_enc.dtype, device=self.device)
        self.W_enc.mul_(s_in[:, None, None])
        for i, w in enumerate(self.W_dec):
            w.div_(s_out[i:][None, :, None])
        self.b_dec.div_(s_out[:, None])
        if self.W_skip is not None:
            self.W_skip.mul_((s_in / s_out)[:, None, None])

    # ------------------------------------------------------------------------------------------------ files
    def inference_state(self) -> tuple[CLTConfig, dict[str, torch.Tensor]]:
        """(config to save, fp32 tensors): a trained BatchTopK CLT is saved as JumpReLU at its learned thresholds;
        an untrained one (thresholds −1) is refused."""
        cfg = CLTConfig.from_dict(asdict(self.cfg))
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        if cfg.activation == "batchtopk":
            if float(self.threshold.min()) < 0:
                raise SAEInputError(
                    "this BatchTopK CLT has not been trained (its thresholds are still −1), so it "
                    "has no JumpReLU form to save: train it first, or use activation 'topk'"
                )
            cfg.activation = "jumprelu"
        return cfg, tensors

    def save(self, path: str | Path) -> Path:
        """Write ``clt_weights.safetensors`` + ``workbench_clt.json`` atomically into directory ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg, tensors = self.inference_state()
        atomic_save_tensors(path / CLT_WEIGHTS_FILE, tensors)
        atomic_write_text(
            path / CLT_CONFIG_FILE, json.dumps(asdict(cfg) | {"architecture": cfg.architecture}, indent=2)
        )
        return path

    def save_circuit_tracer(self, path: str | Path) -> Path:
        """Write circuit-tracer's ``cross_layer_transcoder`` layout (module docstring) into directory ``path``; its
        loader (and ``formats.circuit_tracer.load_clt``) reads it back. Refused: skip connections and TopK (the
        layout has neither), layers not 0 … n_layers − 1."""
        cfg, tensors = self.inference_state()
        if cfg.skip or cfg.activation == "topk" or self.layers != list(range(self.n_layers)):
            raise SAEInputError(
                "circuit-tracer's CLT layout holds JumpReLU / ReLU CLTs without skip connections over layers 0 … "
                f"n_layers − 1 (this one: activation {cfg.activation!r}, skip={cfg.skip}, layers {self.layers}): "
                "train --architecture clt or clt_batchtopk without --skip over every layer, or keep our layout"
            )
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for i in range(self.n_layers):
            encoder = {
                f"W_enc_{i}": tensors["W_enc"][i].T.contiguous(),
                f"b_enc_{i}": tensors["b_enc"][i],
                f"b_dec_{i}": tensors["b_dec"][i],
            }
            if cfg.activation == "jumprelu":
                encoder[f"threshold_{i}"] = tensors["threshold"][i]
            atomic_save_tensors(path / f"W_enc_{i}.safetensors", encoder)
            atomic_save_tensors(path / f"W_dec_{i}.safetensors", {f"W_dec_{i}": tensors[f"W_dec.{i}"]})
        atomic_write_text(
            path / "config.yaml",
            f"model_kind: cross_layer_transcoder\nfeature_input_hook: "
            f"{cfg.hook_in}\nfeature_output_hook: {cfg.hook_out}\n",
        )
        return path


def create_clt(cfg: CLTConfig) -> CrossLayerTranscoder:
    """A freshly initialised CLT of ``cfg`` (:meth:`CrossLayerTranscoder.create`)."""
    return CrossLayerTranscoder.create(cfg)


def is_clt_dir(path: str | Path) -> bool:
    """True for a folder written by :meth:`CrossLayerTranscoder.save`."""
    return (Path(path) / CLT_CONFIG_FILE).is_file()


def load_clt_dir(path: str | Path, device: str | torch.device = "cpu") -> CrossLayerTranscoder:
    """A CLT saved by :meth:`CrossLayerTranscoder.save`."""
    path = Path(path)
    if not is_clt_dir(path):
        raise SAEInputError(f"{path} holds no {CLT_CONFIG_FILE}: not a CLT saved by the workbench")
    cfg = CLTConfig.from_dict(json.loads((path / CLT_CONFIG_FILE).read_text()))
    tensors = read_safetensors(path / CLT_WEIGHTS_FILE)
    names = ["W_enc", "b_enc", "threshold", "b_dec", *(f"W_dec.{i}" for i in range(cfg.n_layers))]
    require(tensors, names + (["W_skip"] if cfg.skip else []), path / CLT_WEIGHTS_FILE, "a CLT")
    clt = CrossLayerTranscoder(
        tensors["W_enc"],
        tensors["b_enc"],
        tensors["threshold"],
        [tensors[f"W_dec.{i}"] for i in range(cfg.n_layers)],
        tensors["b_dec"],
        cfg.hook_in,
        cfg.hook_out,
        tensors.get("W_skip"),
        cfg,
    )
    return clt.to(device)
