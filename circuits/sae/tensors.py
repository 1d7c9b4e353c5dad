"""What the SAE file readers share (every format loader, and the CLT's own loader): reading tensor files safely and
building a checked workbench SAE."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from workbench.circuits.sae.base import SAE, SAEConfig, SAEInputError, create_sae

PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # a raw pickle (protocol >= 2) or torch.save's zip archive


def refuse_pickle(path: Path, expected: str) -> None:
    """Raise SAEInputError when ``path`` is a pickle / torch.save archive where ``expected`` was expected."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if any(head.startswith(magic) for magic in PICKLE_MAGIC):
        raise SAEInputError(
            f"{path} is a pickle / torch.save file, not {expected}: the workbench never unpickles weights (a "
            "pickle can run arbitrary code); convert it with safetensors.torch.save_file(state_dict, PATH)"
        )


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file as float32 on the CPU; a pickle in its place is refused."""
    path = Path(path)
    if not path.is_file():
        raise SAEInputError(f"{path} is missing: the layout needs this safetensors file")
    refuse_pickle(path, "a safetensors file")
    try:
        tensors = load_file(str(path), device="cpu")
    except SafetensorError as err:
        raise SAEInputError(f"{path} is not a readable safetensors file ({err}): re-save it") from None
    return {key: value.float() if value.is_floating_point() else value for key, value in tensors.items()}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``torch.save``d state dict read with ``weights_only=True``; anything needing unpickling is refused."""
    path = Path(path)
    if not path.is_file():
        raise SAEInputError(f"{path} is missing: the layout needs this file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).splitlines()[0]
        raise SAEInputError(
            f"{path} needs unpickling beyond tensors ({reason}); the workbench loads only weights "
            "(torch.load(weights_only=True)): save the plain state dict (ae.state_dict()) instead"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SAEInputError(f"{path} holds {type(state).__name__}, not a state dict of tensors")
    return {key: value.float() if value.is_floating_point() else value for key, value in state.items()}


def require(tensors: Mapping[str, Any], keys: list[str], source: Path, what: str) -> None:
    """Raise SAEInputError naming the file and the missing keys."""
    missing = [key for key in keys if key not in tensors]
    if missing:
        raise SAEInputError(
            f"{source} lacks tensor(s) {missing} that {what} needs (it holds {sorted(tensors)}): the file is "
            "incomplete or of another architecture"
        )


def build_sae(
    architecture: str, tensors: Mapping[str, torch.Tensor], source: Path, device: str = "cpu", **config: Any
) -> SAE:
    """A workbench SAE of ``architecture`` holding ``tensors`` in its own convention (W_enc [d_in, d_sae],
    b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out], optional W_skip [d_in, d_out], threshold [d_sae]); d_in,
    d_sae, d_out come from W_enc / W_dec. Every tensor's shape is checked against them, naming ``source``."""
    d_in, d_sae = tensors["W_enc"].shape
    d_out = tensors["W_dec"].shape[1]
    cfg = SAEConfig(architecture, d_in=d_in, d_sae=d_sae, d_out=d_out, skip="W_skip" in tensors, **config)
    sae = create_sae(cfg)
    state = sae.state_dict()
    for key, expected in state.items():
        if key not in tensors:
            raise SAEInputError(f"{source} lacks tensor {key!r} that a {architecture} SAE needs")
        got = tensors[key]
        if key == "threshold" and got.ndim == 0:
            got = got.expand(expected.shape)
        if tuple(got.shape) != tuple(expected.shape):
            raise SAEInputError(
                f"{source}: tensor {key!r} has shape {list(got.shape)} but d_in={d_in}, d_sae={d_sae}, "
                f"d_out={d_out} (from W_enc / W_dec) need {list(expected.shape)}"
            )
        if not bool(torch.isfinite(got).all()):
            raise SAEInputError(f"{source}: tensor {key!r} holds NaN/inf values")
        state[key] = got.to(expected.dtype)
    with torch.no_grad():
        sae.load_state_dict(state)
    return sae.to(device)


def fold_input_centering(tensors: dict[str, torch.Tensor], center: torch.Tensor) -> None:
    """Layouts computing (x − center) @ W_enc + b_enc: fold the centring into b_enc (b_enc − center @ W_enc)."""
    tensors["b_enc"] = tensors["b_enc"] - center @ tensors["W_enc"]


def fold_decoder_norms(tensors: dict[str, torch.Tensor]) -> None:
    """Layouts whose latents are scaled by their decoder row norms (f·‖W_dec[i]‖, decoded with W_dec/‖W_dec[i]‖):
    scale the encoder side (W_enc, b_enc, threshold) up and the decoder rows to unit norm, same reconstruction."""
    norms = tensors["W_dec"].norm(dim=1).clamp_min(1e-12)
    tensors["W_enc"] = tensors["W_enc"] * norms
    tensors["b_enc"] = tensors["b_enc"] * norms
    if "threshold" in tensors:
        tensors["threshold"] = tensors["threshold"] * norms
    tensors["W_dec"] = tensors["W_dec"] / norms[:, None]
