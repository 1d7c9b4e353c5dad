"""circuit-tracer transcoder layouts: a folder with ``config.yaml`` (``model_kind``, ``feature_input_hook``,
``feature_output_hook``, optional ``transcoders`` paths, ``activation`` / ``k``) and per-layer files.

``transcoder_set``: one file per layer (``layer_{L}.safetensors`` unless ``transcoders`` lists them; ``.npz``
entries are Gemma Scope params) with ``W_enc`` [d_transcoder, d_model], ``W_dec`` [d_transcoder, d_model],
``b_enc``, ``b_dec``, optional ``activation_function.threshold`` (JumpReLU), ``k`` (TopK) and ``W_skip``
[d_model, d_model] (applied as x @ W_skipᵀ); pre-activations are x @ W_encᵀ + b_enc. Each layer becomes a
workbench transcoder ``blocks.L.<input hook>`` → ``blocks.L.<output hook>``.

``cross_layer_transcoder``: per source layer i, ``W_enc_{i}.safetensors`` (``W_enc_{i}`` [d_transcoder,
d_model], ``b_enc_{i}``, ``b_dec_{i}`` [d_model], optional ``threshold_{i}``) and ``W_dec_{i}.safetensors``
(``W_dec_{i}`` [d_transcoder, n_layers − i, d_model]: layer i's features write to every layer j ≥ i). It loads as
``circuits.sae.clt.CrossLayerTranscoder`` (the class the workbench also trains), which :func:`evaluate_clt` scores
on any model and dataset.

Hook names: circuit-tracer's TransformerLens names (``hook_resid_mid``, ``ln2.hook_normalized``, ``hook_mlp_out``)
are ours; its TransformerBridge names map as ``mlp.hook_in`` → ``ln2.hook_normalized``, ``mlp.hook_out`` →
``hook_mlp_out``, and TL's ``hook_mlp_in`` (the residual entering ln2) → ``hook_resid_mid``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from workbench.circuits.sae.base import SAE, SAEInputError
from workbench.circuits.sae.clt import HOOK_ALIASES, CrossLayerTranscoder, block_hook
from workbench.circuits.sae.formats.gemmascope import load_gemmascope
from workbench.circuits.sae.tensors import build_sae, read_safetensors, require
from workbench.datasets import iter_model_batches

CONFIG_FILE = "config.yaml"
__all__ = [
    "CONFIG_FILE",
    "HOOK_ALIASES",
    "CrossLayerTranscoder",
    "block_hook",
    "evaluate_clt",
    "load_clt",
    "load_transcoder_set",
    "read_config",
]


def read_config(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(folder, config) of a circuit-tracer layout given its folder or its config.yaml."""
    import yaml  # optional: PyYAML (circuit-tracer's config.yaml)

    path = Path(path)
    file = path if path.is_file() else path / CONFIG_FILE
    if not file.is_file():
        raise SAEInputError(
            f"{file} is missing: a circuit-tracer transcoder set is described by {CONFIG_FILE}"
        )
    try:
        config = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise SAEInputError(f"{file} is not valid YAML ({err})") from None
    if not isinstance(config, dict):
        raise SAEInputError(f"{file} holds {type(config).__name__}, not a mapping")
    for key in ("model_kind", "feature_input_hook", "feature_output_hook"):
        if key not in config:
            raise SAEInputError(
                f"{file} lacks {key!r} (circuit-tracer's config.yaml names model_kind, "
                "feature_input_hook and feature_output_hook)"
            )
    return file.parent, config


def _layer_paths(folder: Path, config: dict[str, Any]) -> list[Path]:
    if "transcoders" in config:
        paths = []
        for entry in config["transcoders"]:
            if str(entry).startswith("hf://"):
                raise SAEInputError(
                    f"{folder / CONFIG_FILE} lists {entry}: download the hub files and list their local paths "
                    "(the workbench reads local files only)"
                )
            candidate = Path(str(entry)).expanduser()
            paths.append(candidate if candidate.is_absolute() else folder / candidate)
        return paths
    found = {
        int(m.group(1)): p
        for p in folder.glob("layer_*.safetensors")
        if (m := re.fullmatch(r"layer_(\d+)\.safetensors", p.name))
    }
    if not found:
        raise SAEInputError(
            f"{folder} has no layer_L.safetensors files and {CONFIG_FILE} lists no transcoders"
        )
    if sorted(found) != list(range(len(found))):
        raise SAEInputError(
            f"{folder}: layer files cover layers {sorted(found)}; circuit-tracer needs 0..{max(found)}"
        )
    return [found[layer] for layer in range(len(found))]


def load_transcoder_set(path: str | Path, device: str = "cpu") -> list[tuple[str, SAE]]:
    """Every layer of a circuit-tracer ``transcoder_set`` as (``layer_L``, workbench transcoder)."""
    folder, config = read_config(path)
    if config["model_kind"] == "cross_layer_transcoder":
        raise SAEInputError(
            f"{folder} holds a cross-layer transcoder: its features write to every later layer, so it is not one "
            "SAE per hook; `workbench sae import` registers it as one CLT and `workbench sae eval PATH MODEL --data "
            "DATA` scores it (or load_clt / evaluate_clt in workbench.circuits.sae.formats.circuit_tracer)"
        )
    if config["model_kind"] != "transcoder_set":
        raise SAEInputError(
            f"{folder / CONFIG_FILE}: model_kind {config['model_kind']!r} is not transcoder_set "
            "or cross_layer_transcoder"
        )
    activation = config.get("activation")
    saes = []
    for layer, file in enumerate(_layer_paths(folder, config)):
        hook_in = block_hook(config["feature_input_hook"], layer)
        hook_out = block_hook(config["feature_output_hook"], layer)
        if file.suffix == ".npz":
            _, sae = load_gemmascope(file, hook=hook_in, hook_out=hook_out, device=device)
            saes.append((f"layer_{layer}", sae))
            continue
        tensors = read_safetensors(file)
        require(tensors, ["W_enc", "W_dec", "b_enc", "b_dec"], file, "a circuit-tracer transcoder")
        ours = {
            "W_enc": tensors["W_enc"].T.contiguous(),
            "b_enc": tensors["b_enc"],
            "W_dec": tensors["W_dec"],
            "b_dec": tensors["b_dec"],
        }
        if "W_skip" in tensors:
            ours["W_skip"] = tensors["W_skip"].T.contiguous()
        options: dict[str, Any] = {"hook_in": hook_in, "hook_out": hook_out}
        if activation == "topk" or "k" in tensors:
            options["k"] = int(config.get("k") or tensors["k"]) if "k" in tensors or config.get("k") else None
            architecture = "topk"
        elif "activation_function.threshold" in tensors and activation != "relu":
            ours["threshold"] = tensors["activation_function.threshold"]
            architecture = "jumprelu"
        else:
            architecture = "relu"
        saes.append((f"layer_{layer}", build_sae(architecture, ours, file, device, **options)))
    return saes


def load_clt(path: str | Path, device: str = "cpu") -> CrossLayerTranscoder:
    """A circuit-tracer ``cross_layer_transcoder`` folder as a :class:`CrossLayerTranscoder`."""
    folder, config = read_config(path)
    if config["model_kind"] != "cross_layer_transcoder":
        raise SAEInputError(
            f"{folder / CONFIG_FILE}: model_kind is {config['model_kind']!r}, not "
            "cross_layer_transcoder: load it with `workbench sae import`"
        )
    n_layers = len(list(folder.glob("W_enc_*.safetensors")))
    if n_layers == 0:
        raise SAEInputError(f"{folder} has no W_enc_L.safetensors files")
    enc, thr, b_enc, b_dec, dec = [], [], [], [], []
    for layer in range(n_layers):
        enc_file, dec_file = folder / f"W_enc_{layer}.safetensors", folder / f"W_dec_{layer}.safetensors"
        encoder, decoder = read_safetensors(enc_file), read_safetensors(dec_file)
        require(encoder, [f"W_enc_{layer}", f"b_enc_{layer}", f"b_dec_{layer}"], enc_file, "a CLT encoder")
        require(decoder, [f"W_dec_{layer}"], dec_file, "a CLT decoder")
        w_dec = decoder[f"W_dec_{layer}"]
        if w_dec.ndim != 3 or w_dec.shape[1] != n_layers - layer:
            raise SAEInputError(
                f"{dec_file}: tensor 'W_dec_{layer}' has shape {list(w_dec.shape)}, expected "
                f"[d_transcoder, {n_layers - layer}, d_model] for {n_layers} layers"
            )
        enc.append(encoder[f"W_enc_{layer}"].T)
        b_enc.append(encoder[f"b_enc_{layer}"])
        b_dec.append(encoder[f"b_dec_{layer}"])
        thr.append(encoder.get(f"threshold_{layer}", torch.zeros_like(encoder[f"b_enc_{layer}"])).reshape(-1))
        dec.append(w_dec.to(device))
    return CrossLayerTranscoder(
        torch.stack(enc).to(device),
        torch.stack(b_enc).to(device),
        torch.stack(thr).to(device),
        dec,
        torch.stack(b_dec).to(device),
        config["feature_input_hook"],
        config["feature_output_hook"],
    )


@torch.no_grad()
def evaluate_clt(
    model,
    data,
    clt: CrossLayerTranscoder,
    *,
    max_tokens: int = 4096,
    context_length: int = 64,
    batch_size: int = 8,
) -> pd.DataFrame:
    """Per layer: FVU and cosine of the CLT's predicted ``hook_out`` against the model's, mean L0 of its
    features and the fractions of its latents that never fire (``dead_fraction``) or fire on more than a tenth of
    the tokens (``dense_fraction``), over up to ``max_tokens`` real tokens of ``data`` (a Dataset, or token-id
    rows) on ``model`` (a HookedModel)."""
    ins = [clt.hooks(layer)[0] for layer in range(clt.n_layers)]
    outs = [clt.hooks(layer)[1] for layer in range(clt.n_layers)]
    missing = [h for h in ins + outs if h not in set(model.hook_names())]
    if missing:
        raise SAEInputError(f"{model.cfg.name} has no hook {missing[0]!r} that this CLT reads or writes")
    err = torch.zeros(clt.n_layers, dtype=torch.float64)
    total = torch.zeros_like(err)
    cos = torch.zeros_like(err)
    l0 = torch.zeros_like(err)
    sums = torch.zeros(clt.n_layers, clt.d_model, dtype=torch.float64)
    squares = torch.zeros_like(err)
    fires = torch.zeros(clt.n_layers, clt.d_transcoder, dtype=torch.float64)
    seen = 0
    for _, batch in iter_model_batches(
        data,
        model.tokenizer,
        batch_size=batch_size,
        context_length=context_length,
        max_tokens=max_tokens,
        progress=False,
    ):
        with model.capture(ins + outs) as cache:
            model(batch)
        mask = batch["attention_mask"].bool()
        x = torch.stack([cache[h][mask] for h in ins])
        y = torch.stack([cache[h][mask] for h in outs]).double()
        f = clt.encode(x)
        pred = clt.decode(f, x).double()
        err += (pred - y).pow(2).sum((1, 2))
        sums += y.sum(1)
        squares += y.pow(2).sum((1, 2))
        cos += torch.nn.functional.cosine_similarity(pred, y, dim=-1).sum(1)
        l0 += (f > 0).sum(-1).double().sum(1).cpu()
        fires += (f > 0).sum(1).double().cpu()
        seen += y.shape[1]
    if seen == 0:
        raise SAEInputError("the dataset gave no tokens to evaluate the CLT on")
    total = squares - sums.pow(2).sum(1) / seen
    return pd.DataFrame(
        {
            "layer": range(clt.n_layers),
            "hook_in": ins,
            "hook_out": outs,
            "n_tokens": seen,
            "FVU": (err / total).tolist(),
            "cosine": (cos / seen).tolist(),
            "L0": (l0 / seen).tolist(),
            "dead_fraction": (fires == 0).double().mean(1).tolist(),
            "dense_fraction": (fires / seen > 0.1).double().mean(1).tolist(),
        }
    )
