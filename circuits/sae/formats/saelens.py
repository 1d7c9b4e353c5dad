"""Read and write SAELens's on-disk format (cfg.json + sae_weights.safetensors) for our SAEs and transcoders.

Architecture names are sae_lens's registry names (``sae_lens.registry.SAE_CLASS_REGISTRY``, checked against the
installed package by the tests): standard, topk, jumprelu, transcoder, skip_transcoder, jumprelu_transcoder,
jumprelu_skip_transcoder. ``normalize_activations``: ``none``, ``expected_average_only_in`` and
``covariance_whitening`` are the identity at inference in sae_lens (their factors are folded into the weights
before saving), so they load as is; ``constant_norm_rescale`` and ``layer_norm`` rescale every token by its own norm
(nonlinear, not foldable) and are refused. ``reshape_activations: hook_z`` SAEs read ``attn.hook_z`` flattened to
[.., n_heads·d_head]; ``hook_head_index`` (one head's slice of hook_z) is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from workbench.circuits.sae.base import SAE, SAEConfig, SAEInputError, create_sae
from workbench.circuits.sae.tensors import fold_decoder_norms, fold_input_centering, read_safetensors
from workbench.fileio import atomic_save_tensors, atomic_write_text

SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CONFIG = "cfg.json"

_TO_SAELENS = {
    ("relu", False, False): "standard",
    ("topk", False, False): "topk",
    ("jumprelu", False, False): "jumprelu",
    ("relu", True, False): "transcoder",
    ("relu", True, True): "skip_transcoder",
    ("jumprelu", True, False): "jumprelu_transcoder",
    ("jumprelu", True, True): "jumprelu_skip_transcoder",
    ("gated", False, False): "gated",  # our b_enc is SAELens's b_gate (GATED_RENAMES)
}
GATED_RENAMES = {"b_enc": "b_gate"}
_FROM_SAELENS = {name: arch for (arch, _, _), name in _TO_SAELENS.items()}
SAELENS_ARCHITECTURES = tuple(_FROM_SAELENS)
IDENTITY_NORMALIZATIONS = ("none", "expected_average_only_in", "covariance_whitening")


def save_saelens(sae: SAE, path: str | Path) -> Path:
    """Write `sae` so that `sae_lens.SAE.load_from_disk(path)` rebuilds it with identical encodings."""

    architecture, tensors = sae.inference_state()
    key = (architecture, sae.cfg.is_transcoder, sae.W_skip is not None)
    if key not in _TO_SAELENS:
        raise SAEInputError(
            f"SAELens has no {architecture} {'transcoder' if key[1] else 'SAE'}"
            f"{' with skip' if key[2] else ''}: save with SAE.save instead"
        )
    name = _TO_SAELENS[key]
    if name == "gated":
        tensors = {GATED_RENAMES.get(k, k): v for k, v in tensors.items()}
    if "W_skip" in tensors:
        tensors["W_skip"] = tensors["W_skip"].T.contiguous()
    cfg = {
        "architecture": name,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if sae.hook_in.endswith("attn.hook_z") else "none",  # heads flattened
        "metadata": {
            "model_name": sae.cfg.model,
            "hook_name": sae.hook_in,
            "hook_name_out": sae.hook_out,
            "dataset_path": sae.cfg.dataset,
            "workbench_architecture": sae.cfg.architecture,
        },
    }
    if name == "topk":
        cfg |= {"k": sae.cfg.k, "rescale_acts_by_decoder_norm": False}
    if key[1]:
        cfg["d_out"] = sae.d_out
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(path / SAELENS_WEIGHTS, tensors)
    atomic_write_text(path / SAELENS_CONFIG, json.dumps(cfg, indent=2))
    return path


def load_saelens(path: str | Path, device: str = "cpu") -> SAE:
    """Load a SAELens directory as one of our SAEs (b_dec input-centering folded into b_enc)."""
    path = Path(path)
    if not (path / SAELENS_CONFIG).exists():
        raise SAEInputError(
            f"{path} has no {SAELENS_CONFIG}: pass a directory written by sae_lens save_model"
        )
    try:
        raw = json.loads((path / SAELENS_CONFIG).read_text())
    except json.JSONDecodeError as err:
        raise SAEInputError(f"{path / SAELENS_CONFIG} is not valid JSON ({err})") from None
    name = raw.get("architecture", "standard")
    if name not in _FROM_SAELENS:
        raise SAEInputError(
            f"SAELens architecture {name!r} in {path / SAELENS_CONFIG} is not supported: "
            f"convert it to one of {sorted(_FROM_SAELENS)}"
        )
    normalize = raw.get("normalize_activations") or "none"
    if normalize not in IDENTITY_NORMALIZATIONS:
        raise SAEInputError(
            f"{path / SAELENS_CONFIG}: normalize_activations={normalize!r} rescales each token by its own norm at "
            f"inference, which no fixed weights reproduce; the workbench reads {', '.join(IDENTITY_NORMALIZATIONS)}"
        )
    meta = raw.get("metadata") or {}
    if meta.get("hook_head_index", raw.get("hook_head_index")) is not None:
        raise SAEInputError(
            f"{path / SAELENS_CONFIG}: hook_head_index={meta.get('hook_head_index', raw.get('hook_head_index'))} "
            "(an SAE on one head's slice of hook_z) is not supported: the workbench splices whole hooks"
        )
    tensors = read_safetensors(path / SAELENS_WEIGHTS)
    d_in, d_sae = int(raw["d_in"]), int(raw["d_sae"])
    d_out = int(raw.get("d_out", d_in))
    architecture = _FROM_SAELENS[name]
    needed = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if architecture == "jumprelu" else [])
    if name == "gated":
        tensors = {({v: k for k, v in GATED_RENAMES.items()}).get(k, k): v for k, v in tensors.items()}
        needed += ["r_mag", "b_mag"]
        if raw.get("apply_b_dec_to_input", True) and all(
            k in tensors for k in needed
        ):  # the magnitude path too
            tensors["b_mag"] = tensors["b_mag"] - tensors["b_dec"] @ (
                tensors["W_enc"] * tensors["r_mag"].exp()
            )
    missing = [k for k in needed + (["W_skip"] if "skip" in name else []) if k not in tensors]
    if missing:
        raise SAEInputError(
            f"{path / SAELENS_WEIGHTS} lacks tensor(s) {missing} that a SAELens {name!r} SAE needs (it holds "
            f"{sorted(tensors)}): re-save it with sae_lens (SAE.save_model) or fix the architecture in cfg.json"
        )
    if name == "topk" and raw.get("rescale_acts_by_decoder_norm"):
        fold_decoder_norms(tensors)
    cfg = SAEConfig(
        architecture,
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out,
        skip="W_skip" in tensors,
        k=raw.get("k"),
        hook_in=meta.get("hook_name") or raw.get("hook_name", ""),
        hook_out=meta.get("hook_name_out") or raw.get("hook_name_out", ""),
        model=meta.get("model_name") or "",
        dataset=meta.get("dataset_path") or "",
    )
    if raw.get("apply_b_dec_to_input", True) and d_out == d_in and "transcoder" not in name:
        fold_input_centering(tensors, tensors["b_dec"])
    if "W_skip" in tensors:
        tensors["W_skip"] = tensors["W_skip"].T.contiguous()
    sae = create_sae(cfg)
    for key, expected in sae.state_dict().items():
        if tuple(tensors[key].shape) != tuple(expected.shape):
            raise SAEInputError(
                f"{path / SAELENS_WEIGHTS}: tensor {key!r} has shape {list(tensors[key].shape)} but {SAELENS_CONFIG} "
                f"says d_in={d_in}, d_sae={d_sae}, d_out={d_out} (expected {list(expected.shape)})"
            )
    state = {k: tensors[k] for k in sae.state_dict()}
    with torch.no_grad():
        sae.load_state_dict(state)
    return sae.to(device)
