"""dictionary_learning (saprmarks) ``ae.pt`` + ``config.json``: a torch-saved state dict, read with
``torch.load(weights_only=True)`` (a file needing unpickling is refused), and the trainer config naming the class.

=========================  ==================================================================  ======================
``trainer.dict_class``     state dict keys                                                     workbench architecture
=========================  ==================================================================  ======================
AutoEncoder                encoder.weight [d_sae, d_in], encoder.bias, decoder.weight           relu
                           [d_in, d_sae], bias [d_in] (centres the input)
AutoEncoderTopK            encoder.*, decoder.weight, b_dec, k (, threshold)                    topk
BatchTopKSAE,              encoder.*, decoder.weight, b_dec, k, threshold (global, scalar)      jumprelu (relu while
MatryoshkaBatchTopKSAE                                                                          threshold < 0)
JumpReluAutoEncoder        W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec, threshold    jumprelu
GatedAutoEncoder           encoder.weight, decoder.weight, decoder_bias, r_mag, gate_bias,      gated
                           mag_bias
=========================  ==================================================================  ======================

Latents equal dictionary_learning's ``encode``: inputs are centred by the decoder bias (folded into b_enc), and
JumpReluAutoEncoder's latents scaled by the decoder row norms are folded into the weights. Hooks come from
``trainer.submodule_name`` / ``layer`` (``resid_post_layer_3`` → ``blocks.3.hook_resid_post``) or ``hook``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from workbench.circuits.sae.base import SAE, SAEInputError
from workbench.circuits.sae.registry import architectures
from workbench.circuits.sae.tensors import (
    build_sae,
    fold_decoder_norms,
    fold_input_centering,
    read_state_dict,
    require,
)

WEIGHTS_FILE = "ae.pt"
CONFIG_FILE = "config.json"
_LINEAR = ["encoder.weight", "encoder.bias", "decoder.weight"]
_SUBMODULE = re.compile(r"(resid_post|resid_pre|resid_mid|mlp_out|attn_out|mlp_in)_layer_(\d+)")
_HOOK_OF = {
    "resid_post": "hook_resid_post",
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "mlp_out": "hook_mlp_out",
    "attn_out": "hook_attn_out",
    "mlp_in": "ln2.hook_normalized",
}


def _hooks(trainer: dict, hook: str | None, hook_out: str | None, source: Path) -> tuple[str, str]:
    if hook:
        return hook, hook_out or hook
    match = _SUBMODULE.fullmatch(str(trainer.get("submodule_name") or ""))
    if match is None:
        raise SAEInputError(
            f"{source}: trainer.submodule_name {trainer.get('submodule_name')!r} names no hook the workbench knows "
            "(resid_post_layer_L, mlp_out_layer_L, attn_out_layer_L, ...): pass --hook"
        )
    name = f"blocks.{match.group(2)}.{_HOOK_OF[match.group(1)]}"
    return name, hook_out or name


def _linear(state: dict[str, torch.Tensor], center_key: str) -> dict[str, torch.Tensor]:
    """encoder/decoder nn.Linear weights -> W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec."""
    tensors = {
        "W_enc": state["encoder.weight"].T.contiguous(),
        "b_enc": state["encoder.bias"],
        "W_dec": state["decoder.weight"].T.contiguous(),
        "b_dec": state[center_key],
    }
    fold_input_centering(tensors, state[center_key])
    return tensors


def load_dictionary_learning(
    path: str | Path, *, hook: str | None = None, hook_out: str | None = None, device: str = "cpu"
) -> tuple[str, SAE]:
    """(name, SAE) from a dictionary_learning folder (``ae.pt`` + ``config.json``) or its ``ae.pt``."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    weights = folder / WEIGHTS_FILE
    cfg_path = folder / CONFIG_FILE
    state = read_state_dict(weights)
    try:
        config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    except json.JSONDecodeError as err:
        raise SAEInputError(f"{cfg_path} is not valid JSON ({err})") from None
    trainer = config.get("trainer") or {}
    dict_class = trainer.get("dict_class")
    if dict_class is None:
        raise SAEInputError(
            f"{cfg_path} is missing or has no trainer.dict_class: dictionary_learning's config.json names the "
            "dictionary class (AutoEncoder, AutoEncoderTopK, BatchTopKSAE, JumpReluAutoEncoder, GatedAutoEncoder)"
        )
    hook_in, out = _hooks(trainer, hook, hook_out, cfg_path)
    common = {"hook_in": hook_in, "hook_out": out, "model": str(trainer.get("lm_name") or "")}
    if dict_class == "AutoEncoder":
        require(state, [*_LINEAR, "bias"], weights, "an AutoEncoder")
        return folder.name, build_sae("relu", _linear(state, "bias"), weights, device, **common)
    if dict_class == "AutoEncoderTopK":
        require(state, [*_LINEAR, "b_dec"], weights, "an AutoEncoderTopK")
        k = int(state["k"]) if "k" in state else int(trainer.get("k") or 0)
        return folder.name, build_sae("topk", _linear(state, "b_dec"), weights, device, k=k, **common)
    if dict_class in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        require(state, [*_LINEAR, "b_dec", "threshold"], weights, f"a {dict_class}")
        tensors = _linear(state, "b_dec")
        threshold = float(state["threshold"])
        if threshold < 0:  # never calibrated: encode keeps every positive pre-activation
            return folder.name, build_sae("relu", tensors, weights, device, **common)
        tensors["threshold"] = torch.full((tensors["W_enc"].shape[1],), threshold)
        return folder.name, build_sae("jumprelu", tensors, weights, device, **common)
    if dict_class == "JumpReluAutoEncoder":
        require(state, ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"], weights, "a JumpReluAutoEncoder")
        tensors = {key: state[key] for key in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
        fold_decoder_norms(tensors)
        return folder.name, build_sae("jumprelu", tensors, weights, device, **common)
    if dict_class == "GatedAutoEncoder" and "gated" in architectures():
        return folder.name, _gated(state, weights, device, common)
    if dict_class == "GatedAutoEncoder":
        raise SAEInputError(
            f"{cfg_path}: GatedAutoEncoder needs the workbench's gated architecture, which this registry lacks "
            f"(it has {sorted(architectures())})"
        )
    raise SAEInputError(
        f"{cfg_path}: dict_class {dict_class!r} is not supported; the workbench reads AutoEncoder, AutoEncoderTopK, "
        "BatchTopKSAE, MatryoshkaBatchTopKSAE, JumpReluAutoEncoder and GatedAutoEncoder"
    )


def _gated(state: dict[str, torch.Tensor], weights: Path, device: str, common: dict) -> SAE:
    """GatedAutoEncoder -> the workbench gated SAE. Its encode is f = 1[(x−c)W + gate_bias > 0] ·
    relu(exp(r_mag) ⊙ (x−c)W + mag_bias) · ‖W_dec[i]‖ with c = decoder_bias; the centring goes into b_enc / b_mag
    and the decoder norms into r_mag (+log‖W_dec[i]‖) and b_mag, the decoder rows to unit norm."""
    require(
        state,
        ["encoder.weight", "decoder.weight", "decoder_bias", "r_mag", "gate_bias", "mag_bias"],
        weights,
        "a GatedAutoEncoder",
    )
    norms = state["decoder.weight"].norm(dim=0).clamp_min(1e-12)  # [d_sae]
    w_enc = state["encoder.weight"].T.contiguous()
    center = state["decoder_bias"] @ w_enc  # [d_sae]
    tensors = {
        "W_enc": w_enc,
        "b_enc": state["gate_bias"] - center,
        "r_mag": state["r_mag"] + norms.log(),
        "b_mag": (state["mag_bias"] - state["r_mag"].exp() * center) * norms,
        "W_dec": (state["decoder.weight"] / norms).T.contiguous(),
        "b_dec": state["decoder_bias"],
    }
    return build_sae("gated", tensors, weights, device, **common)
