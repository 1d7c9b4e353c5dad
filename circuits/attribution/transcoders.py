"""One transcoder interface for attribution graphs: per-layer transcoders (with or without skip) and cross-layer
transcoders (CLTs) look the same to the replacement model.

A transcoder set replaces every MLP of a model. Its features of layer l read the MLP input of layer l (``hook_in``)
and write into the MLP output (``hook_out`` = ``blocks.j.hook_mlp_out``) of layers j ≥ l: a per-layer transcoder
writes to j = l only, a CLT to every later layer as well.

1. ``as_transcoders(model, transcoders)`` wraps what the user passes — ``{layer: SAE}``, a list of SAEs (keyed by
   the layer of their ``hook_in``), or a ``CrossLayerTranscoder`` — and checks it against the model: one layer per
   model layer, widths d_model, MLP-input hooks the model has.
2. MLP-input conventions, all accepted: ``blocks.L.hook_resid_mid`` (sequential blocks), ``blocks.L.hook_resid_pre``
   (parallel blocks only: there the MLP reads the block input), ``blocks.L.ln2.hook_normalized`` and its aliases
   ``mlp.hook_in`` (circuit-tracer, TransformerBridge) and ``hook_mlp_in`` (TransformerLens's name for the residual
   entering ln2, which is ``hook_resid_mid``).
3. ``encode`` / ``decoder_vectors`` / ``decoder_bias`` / ``skip_weight`` give the replacement model what it needs:
   activations [pos, d_transcoder], decoder rows of chosen features into each output layer [n, n_out, d_model],
   the constant each layer's output receives, and the linear skip path of skip transcoders.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from workbench.circuits.sae.base import SAE
from workbench.circuits.sae.formats.circuit_tracer import CrossLayerTranscoder

# Hook suffixes (after ``blocks.L.``) that name an MLP's input, mapped to the workbench's own name.
MLP_INPUT_HOOKS = {
    "hook_resid_mid": "hook_resid_mid",
    "hook_resid_pre": "hook_resid_pre",
    "ln2.hook_normalized": "ln2.hook_normalized",
    "mlp.hook_in": "ln2.hook_normalized",
    "hook_mlp_in": "hook_resid_mid",
}
MLP_OUTPUT_HOOKS = {"hook_mlp_out": "hook_mlp_out", "mlp.hook_out": "hook_mlp_out"}


class AttributionError(ValueError):
    """Bad attribution input: transcoders that do not fit the model, an unknown target, a prompt too long; the
    message names the problem and the fix."""


def _split_hook(hook: str) -> tuple[int, str] | None:
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook)
    return (int(match.group(1)), match.group(2)) if match else None


def mlp_input_hook(hook: str, parallel: bool) -> tuple[int, str]:
    """(layer, the workbench hook name) of an MLP-input hook in any accepted convention; anything else raises."""
    parsed = _split_hook(hook)
    if parsed is None or parsed[1] not in MLP_INPUT_HOOKS:
        raise AttributionError(
            f"transcoder hook_in {hook!r} is not an MLP input; attribution graphs need transcoders reading "
            "blocks.L.hook_resid_mid, blocks.L.ln2.hook_normalized (or mlp.hook_in), or blocks.L.hook_resid_pre "
            "on parallel-attention blocks"
        )
    layer, suffix = parsed
    name = MLP_INPUT_HOOKS[suffix]
    if name == "hook_resid_pre" and not parallel:
        raise AttributionError(
            f"transcoder hook_in {hook!r}: on sequential blocks the MLP reads hook_resid_mid (the residual after "
            "attention), not hook_resid_pre; train or import transcoders on blocks.L.hook_resid_mid or "
            "blocks.L.ln2.hook_normalized"
        )
    return layer, f"blocks.{layer}.{name}"


def mlp_output_hook(hook: str) -> tuple[int, str]:
    parsed = _split_hook(hook)
    if parsed is None or parsed[1] not in MLP_OUTPUT_HOOKS:
        raise AttributionError(
            f"transcoder hook_out {hook!r} is not an MLP output; attribution graphs need transcoders that predict "
            "blocks.L.hook_mlp_out (or mlp.hook_out)"
        )
    return parsed[0], f"blocks.{parsed[0]}.hook_mlp_out"


class Transcoders(ABC):
    """A transcoder for every MLP of a model: features of layer l read ``hook_in(l)`` and write to the MLP output of
    layers ``l .. l + n_outputs(l) − 1``.

    Tensors come back in ``dtype`` (the replacement model's), on the transcoders' device."""

    n_layers: int
    d_model: int
    dtype: torch.dtype = torch.float32

    @abstractmethod
    def hook_in(self, layer: int) -> str:
        """The workbench hook whose activation the layer's features read, ``blocks.{layer}.…``."""

    def hook_out(self, layer: int) -> str:
        return f"blocks.{layer}.hook_mlp_out"

    @abstractmethod
    def d_transcoder(self, layer: int) -> int: ...

    @abstractmethod
    def n_outputs(self, layer: int) -> int:
        """How many MLP outputs (layers ``layer``, ``layer + 1``, …) the layer's features write to."""

    @abstractmethod
    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """MLP input x [pos, d_model] → feature activations [pos, d_transcoder]."""

    @abstractmethod
    def encoder_vectors(self, layer: int, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_enc columns [n, d_model], b_enc [n]) of ``features`` [n]: pre-activation = W_enc · x + b_enc."""

    @abstractmethod
    def decoder_vectors(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """Decoder rows of ``features`` [n] into each output layer: [n, n_outputs(layer), d_model]."""

    @abstractmethod
    def decoder_bias(self, layer: int) -> torch.Tensor:
        """The constant [d_model] added to MLP output ``layer`` (every source's b_dec that writes there)."""

    def skip_weight(self, layer: int) -> torch.Tensor | None:
        """W_skip [d_model, d_model] of a skip transcoder (output += x @ W_skip), else None."""
        return None

    def reconstruct(
        self, inputs: Sequence[torch.Tensor], activations: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Each layer's predicted MLP output [pos, d_model] from every layer's input and activations [pos, ·]."""
        outputs = [
            self.decoder_bias(layer).expand_as(inputs[layer]).clone() for layer in range(self.n_layers)
        ]
        for layer in range(self.n_layers):
            features = torch.arange(self.d_transcoder(layer), device=activations[layer].device)
            decoder = self.decoder_vectors(layer, features)  # [d_transcoder, n_out, d_model]
            for offset in range(self.n_outputs(layer)):
                outputs[layer + offset] = outputs[layer + offset] + activations[layer] @ decoder[:, offset]
            skip = self.skip_weight(layer)
            if skip is not None:
                outputs[layer] = outputs[layer] + inputs[layer] @ skip
        return outputs


class PerLayerTranscoders(Transcoders):
    """One workbench transcoder (``SAE`` with hook_in ≠ hook_out, optional ``W_skip``) per layer."""

    def __init__(
        self, saes: Mapping[int, SAE], n_layers: int, d_model: int, parallel: bool, dtype: torch.dtype
    ):
        self.saes = dict(saes)
        self.n_layers, self.d_model, self.dtype = n_layers, d_model, dtype
        self._hooks: dict[int, str] = {}
        for layer, sae in sorted(self.saes.items()):
            read_layer, hook = mlp_input_hook(sae.hook_in, parallel)
            write_layer, _ = mlp_output_hook(sae.hook_out)
            if read_layer != layer or write_layer != layer:
                raise AttributionError(
                    f"the transcoder given for layer {layer} maps {sae.hook_in!r} → {sae.hook_out!r}; key each "
                    "transcoder by the layer it reads and writes (or pass a list, keyed by its hooks)"
                )
            if (sae.d_in, sae.d_out) != (d_model, d_model):
                trained_on = f" (trained on {sae.cfg.model!r})" if sae.cfg.model else ""
                raise AttributionError(
                    f"the layer-{layer} transcoder{trained_on} maps width {sae.d_in} → {sae.d_out} but the model "
                    f"has d_model={d_model}: it is a transcoder of another model; pass this model's transcoders"
                )
            self._hooks[layer] = hook
        missing = [layer for layer in range(n_layers) if layer not in self.saes]
        if missing:
            raise AttributionError(
                f"no transcoder for layer(s) {missing}: the replacement model replaces every MLP, so it needs one "
                f"transcoder per layer 0..{n_layers - 1}; train or import the missing ones and pass them all"
            )
        extra = [layer for layer in self.saes if not 0 <= layer < n_layers]
        if extra:
            raise AttributionError(
                f"transcoders for layer(s) {extra}, but the model has {n_layers} layers: these are transcoders "
                "of another model"
            )

    def _weight(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(self.dtype)

    def hook_in(self, layer: int) -> str:
        return self._hooks[layer]

    def d_transcoder(self, layer: int) -> int:
        return self.saes[layer].d_sae

    def n_outputs(self, layer: int) -> int:
        return 1

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        sae = self.saes[layer]
        with torch.no_grad():
            return sae.encode(x.to(device=sae.device, dtype=sae.W_enc.dtype)).to(self.dtype)

    def encoder_vectors(self, layer: int, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sae = self.saes[layer]
        return self._weight(sae.W_enc[:, features].T), self._weight(sae.b_enc[features])

    def decoder_vectors(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        return self._weight(self.saes[layer].W_dec[features])[:, None]

    def decoder_bias(self, layer: int) -> torch.Tensor:
        return self._weight(self.saes[layer].b_dec)

    def skip_weight(self, layer: int) -> torch.Tensor | None:
        skip = self.saes[layer].W_skip
        return None if skip is None else self._weight(skip)


class CrossLayerTranscoders(Transcoders):
    """A ``CrossLayerTranscoder`` (W_enc [n_layers, d_model, d_transcoder], b_enc, threshold [n_layers,
    d_transcoder], W_dec[i] [d_transcoder, n_layers − i, d_model], b_dec [n_layers, d_model]): JumpReLU features of
    layer i write to every layer j ≥ i."""

    def __init__(self, clt: Any, n_layers: int, d_model: int, parallel: bool, dtype: torch.dtype):
        self.clt = clt
        self.n_layers, self.d_model, self.dtype = n_layers, d_model, dtype
        if (clt.n_layers, clt.d_model) != (n_layers, d_model):
            raise AttributionError(
                f"the cross-layer transcoder has {clt.n_layers} layers of width {clt.d_model}, the model "
                f"{n_layers} layers of d_model={d_model}: it is a CLT of another model; pass this model's"
            )
        self._hooks = []
        for layer in range(n_layers):
            hook_in, hook_out = clt.hooks(layer)
            self._hooks.append(mlp_input_hook(hook_in, parallel)[1])
            mlp_output_hook(hook_out)

    def _weight(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(self.dtype)

    def hook_in(self, layer: int) -> str:
        return self._hooks[layer]

    def d_transcoder(self, layer: int) -> int:
        return int(self.clt.d_transcoder)

    def n_outputs(self, layer: int) -> int:
        return self.n_layers - layer

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        w_enc, b_enc = self._weight(self.clt.W_enc[layer]), self._weight(self.clt.b_enc[layer])
        pre = x.to(device=w_enc.device, dtype=self.dtype) @ w_enc + b_enc
        return pre.relu() * (pre > self._weight(self.clt.threshold[layer]))

    def encoder_vectors(self, layer: int, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._weight(self.clt.W_enc[layer][:, features].T), self._weight(
            self.clt.b_enc[layer][features]
        )

    def decoder_vectors(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        return self._weight(self.clt.W_dec[layer][features])

    def decoder_bias(self, layer: int) -> torch.Tensor:
        return self._weight(self.clt.b_dec[layer])


def as_transcoders(model: Any, transcoders: Any, dtype: torch.dtype | None = None) -> Transcoders:
    """The one interface over what a user passes: ``Transcoders`` as is, ``{layer: SAE}``, a list of SAEs (keyed by
    the layer their ``hook_in`` names), or a cross-layer transcoder; checked against ``model`` (a HookedModel)."""
    cfg = model.cfg
    dtype = dtype or next(model.model.parameters()).dtype
    parallel = bool(getattr(cfg, "parallel_residual", False))
    if isinstance(transcoders, Transcoders):
        found = transcoders
    elif (
        isinstance(transcoders, CrossLayerTranscoder)
        or hasattr(transcoders, "W_enc")
        and not isinstance(transcoders, SAE)
    ):
        found = CrossLayerTranscoders(transcoders, cfg.n_layers, cfg.d_model, parallel, dtype)
    else:
        if isinstance(transcoders, SAE):
            transcoders = [transcoders]
        if isinstance(transcoders, Mapping):
            keyed = {int(layer): sae for layer, sae in transcoders.items()}
        else:
            keyed = {}
            for sae in transcoders:
                layer = mlp_input_hook(sae.hook_in, parallel)[0]
                if layer in keyed:
                    raise AttributionError(
                        f"two transcoders read layer {layer} ({sae.hook_in}); pass one per layer"
                    )
                keyed[layer] = sae
        if not keyed:
            raise AttributionError("no transcoders given; pass one per layer (--transcoders ID ...)")
        found = PerLayerTranscoders(keyed, cfg.n_layers, cfg.d_model, parallel, dtype)
    names = set(model.hook_names())
    absent = [found.hook_in(layer) for layer in range(found.n_layers) if found.hook_in(layer) not in names]
    if absent:
        raise AttributionError(
            f"{cfg.name} has no hook {absent[0]!r} that the transcoders read; use transcoders trained on a hook "
            f"this model has (blocks.L.hook_resid_mid or blocks.L.ln2.hook_normalized)"
        )
    return found
