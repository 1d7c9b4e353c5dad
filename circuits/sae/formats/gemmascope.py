"""Gemma Scope ``params.npz``: ``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_out], ``b_dec``
[d_out], ``threshold`` [d_sae]; JumpReLU f = pre · 1[pre > threshold] with pre = x @ W_enc + b_enc (no b_dec
subtraction), the workbench's own convention. The file records no hook: it is read from the release path
(``gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_71/params.npz``: ``-res`` → ``blocks.12.hook_resid_post``,
``-mlp`` → ``hook_mlp_out``, ``-att`` → ``attn.hook_z`` (flattened heads), ``-transcoders`` → the MLP's input
``ln2.hook_normalized`` → ``hook_mlp_out``) or given as ``hook`` / ``hook_out``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from workbench.circuits.sae.base import SAE, SAEInputError
from workbench.circuits.sae.tensors import build_sae, require

PARAMS_FILE = "params.npz"
KEYS = ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"]


def hooks_from_path(path: Path) -> tuple[str, str] | None:
    """(hook_in, hook_out) read from a Gemma Scope release path, or None when it does not say."""
    text = path.as_posix()
    layer = re.search(r"layer_(\d+)", text)
    if layer is None:
        return None
    prefix = f"blocks.{layer.group(1)}."
    if "transcoder" in text:
        return prefix + "ln2.hook_normalized", prefix + "hook_mlp_out"
    for marker, hook in (("-res", "hook_resid_post"), ("-mlp", "hook_mlp_out"), ("-att", "attn.hook_z")):
        if marker in text:
            return prefix + hook, prefix + hook
    return None


def load_gemmascope(
    path: str | Path, *, hook: str | None = None, hook_out: str | None = None, device: str = "cpu"
) -> tuple[str, SAE]:
    """(name, JumpReLU SAE) from a ``params.npz`` file or its directory; the name is the path below the release."""
    path = Path(path)
    file = path if path.is_file() else path / PARAMS_FILE
    if not file.is_file():
        raise SAEInputError(f"{file} is missing: a Gemma Scope SAE is a {PARAMS_FILE} file")
    try:
        with np.load(file, allow_pickle=False) as archive:
            require(dict.fromkeys(archive.files), KEYS, file, "a Gemma Scope JumpReLU SAE")
            tensors = {key: torch.from_numpy(np.asarray(archive[key], dtype=np.float32)) for key in KEYS}
    except ValueError as err:
        raise SAEInputError(
            f"{file} is not a plain npz archive of arrays ({err}); the workbench never unpickles "
            "weights: save the arrays with numpy.savez"
        ) from None
    inferred = hooks_from_path(file.parent)
    if hook is None and inferred is None:
        raise SAEInputError(
            f"{file} records no hook and its path names none (layer_L under a gemma-scope-*-res|mlp|att|transcoders "
            "release): pass --hook (and --hook-out for a transcoder)"
        )
    hook_in = hook or (inferred[0] if inferred else "")
    out = hook_out or (inferred[1] if inferred and not hook else hook_in)
    name = "--".join(file.parent.parts[-3:])
    return name, build_sae("jumprelu", tensors, file, device, hook_in=hook_in, hook_out=out)
