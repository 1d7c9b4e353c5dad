"""Read and write SAELens's on-disk format (cfg.json + sae_weights.safetensors) for our SAEs and transcoders."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from workbench.circuits.sae.base import SAE, SAEConfig, SAEInputError, create_sae
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
}
_FROM_SAELENS = {name: arch for (arch, _, _), name in _TO_SAELENS.items()}


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
        "reshape_activations": "none",
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
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / SAELENS_CONFIG).exists():
        raise SAEInputError(
            f"{path} has no {SAELENS_CONFIG}: pass a directory written by sae_lens save_model"
        )
    raw = json.loads((path / SAELENS_CONFIG).read_text())
    name = raw.get("architecture", "standard")
    if name not in _FROM_SAELENS:
        raise SAEInputError(
            f"SAELens architecture {name!r} in {path / SAELENS_CONFIG} is not supported: "
            f"convert it to one of {sorted(_FROM_SAELENS)}"
        )
    if raw.get("normalize_activations", "none") not in ("none", None):
        raise SAEInputError(
            f"{path}: normalize_activations={raw['normalize_activations']!r} is not supported; "
            "fold the normalisation into the weights and save with 'none'"
        )
    tensors = {k: v.float() for k, v in load_file(str(path / SAELENS_WEIGHTS), device="cpu").items()}
    meta = raw.get("metadata") or {}
    d_in, d_sae = int(raw["d_in"]), int(raw["d_sae"])
    d_out = int(raw.get("d_out", d_in))
    architecture = _FROM_SAELENS[name]
    if name == "topk" and raw.get("rescale_acts_by_decoder_norm"):
        norms = tensors["W_dec"].norm(dim=1)
        tensors["W_enc"] = tensors["W_enc"] * norms
        tensors["b_enc"] = tensors["b_enc"] * norms
        tensors["W_dec"] = tensors["W_dec"] / norms[:, None]
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
        tensors["b_enc"] = tensors["b_enc"] - tensors["b_dec"] @ tensors["W_enc"]
    if "W_skip" in tensors:
        tensors["W_skip"] = tensors["W_skip"].T.contiguous()
    sae = create_sae(cfg)
    missing = [k for k in sae.state_dict() if k not in tensors]
    if missing:
        raise SAEInputError(
            f"{path / SAELENS_WEIGHTS} lacks tensor(s) {missing} that a SAELens {name!r} SAE needs (it holds "
            f"{sorted(tensors)}): re-save it with sae_lens (SAE.save_model) or fix the architecture in cfg.json"
        )
    state = {k: tensors[k] for k in sae.state_dict()}
    with torch.no_grad():
        sae.load_state_dict(state)
    return sae.to(device)
