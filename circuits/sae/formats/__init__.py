"""SAEs and transcoders in the ecosystem's on-disk layouts: detection in one place, one module per format.

=====================  ==========================================================================================
format                 what is on disk
=====================  ==========================================================================================
``workbench``          ``workbench_sae.json`` + ``sae_weights.safetensors`` (``SAE.save``)
``saelens``            ``cfg.json`` + ``sae_weights.safetensors`` (SAELens v6, ``saelens.py``)
``sparsify``           EleutherAI sparsify: ``cfg.json`` + ``sae.safetensors`` per hookpoint folder, or a run folder
                       (top-level ``config.json``, one folder per HF module, optional ``.../seedK``)
``gemmascope``         Gemma Scope ``params.npz`` (W_enc, W_dec, b_enc, b_dec, threshold: JumpReLU)
``dictionary_learning``  ``ae.pt`` (state dict, read with ``torch.load(weights_only=True)``) + ``config.json``
``circuit_tracer``     circuit-tracer transcoder set: ``config.yaml`` + per-layer safetensors (or a CLT)
=====================  ==========================================================================================

:func:`detect_format` names a path's layout; :func:`read_saes` loads every SAE a path holds as ``(name, SAE)``
pairs (a sparsify run or a transcoder set holds several); :func:`read_sae` expects exactly one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from workbench.circuits.sae.base import CONFIG_FILE, SAE, WEIGHTS_FILE, SAEConfig, SAEInputError, create_sae
from workbench.circuits.sae.clt import CLT_CONFIG_FILE
from workbench.circuits.sae.formats import circuit_tracer, dictionary_learning, gemmascope, sparsify
from workbench.circuits.sae.formats.saelens import load_saelens
from workbench.circuits.sae.formats.sparsify import hookpoint_folders

FORMATS = ("workbench", "saelens", "sparsify", "gemmascope", "dictionary_learning", "circuit_tracer")


def detect_format(path: str | Path) -> str:
    """The layout at ``path`` (a directory or a format's main file), one of FORMATS."""
    path = Path(path)
    if not path.exists():
        raise SAEInputError(f"{path} does not exist: pass an SAE directory or file")
    if path.is_file():
        by_name = {
            "params.npz": "gemmascope",
            "ae.pt": "dictionary_learning",
            "config.yaml": "circuit_tracer",
        }
        if path.name in by_name:
            return by_name[path.name]
        if path.suffix == ".npz":
            return "gemmascope"
        raise SAEInputError(
            f"{path} is not a file any SAE layout starts from (params.npz, ae.pt, config.yaml): pass its directory"
        )

    if (path / CLT_CONFIG_FILE).exists():
        raise SAEInputError(
            f"{path} holds a cross-layer transcoder ({CLT_CONFIG_FILE}): its features write to every later layer, "
            "so it is not one SAE per hook; `workbench sae eval` scores it and `workbench sae export "
            "--format circuit-tracer` writes it for circuit-tracer"
        )
    if (path / CONFIG_FILE).exists():
        return "workbench"
    if (path / "cfg.json").exists() and (path / "sae_weights.safetensors").exists():
        return "saelens"
    if (path / "cfg.json").exists() and (path / "sae.safetensors").exists():
        return "sparsify"
    if (path / "config.yaml").exists():
        return "circuit_tracer"
    if (path / "params.npz").exists():
        return "gemmascope"
    if (path / "ae.pt").exists():
        return "dictionary_learning"
    if (path / "cfg.json").exists():
        return "saelens"  # its loader names the missing weights file

    if hookpoint_folders(path):
        return "sparsify"
    raise SAEInputError(
        f"{path} holds no SAE layout the workbench reads: looked for {CONFIG_FILE} (workbench), cfg.json + "
        "sae_weights.safetensors (SAELens), cfg.json + sae.safetensors or hookpoint folders holding them "
        "(sparsify), params.npz (Gemma Scope), ae.pt (dictionary_learning), config.yaml (circuit-tracer)"
    )


def read_saes(
    path: str | Path,
    format: str = "auto",
    *,
    family: str | None = None,
    hook: str | None = None,
    hook_out: str | None = None,
    device: str = "cpu",
) -> list[tuple[str, SAE]]:
    """Every SAE / transcoder at ``path`` as (name, SAE), in the workbench's conventions (pre-activations
    x @ W_enc + b_enc, hook names in TransformerLens's convention). ``family`` picks the HF module-name table for
    sparsify layouts whose names fit several families; ``hook`` / ``hook_out`` name (or override) the hooks when
    the layout does not record them (Gemma Scope, dictionary_learning)."""
    path = Path(path)
    kind = detect_format(path) if format == "auto" else format
    if kind not in FORMATS:
        raise SAEInputError(f"unknown SAE format {format!r}; use auto or one of {', '.join(FORMATS)}")
    saes: list[tuple[str, SAE]]
    if kind == "workbench":
        saes = [(path.name, load_sae(path, device=device))]
    elif kind == "saelens":
        saes = [(path.name, load_saelens(path, device=device))]
    elif kind == "sparsify":
        saes = sparsify.load_sparsify(path, family=family, device=device, hook=hook, hook_out=hook_out)
    elif kind == "gemmascope":
        saes = [gemmascope.load_gemmascope(path, hook=hook, hook_out=hook_out, device=device)]
    elif kind == "dictionary_learning":
        saes = [
            dictionary_learning.load_dictionary_learning(path, hook=hook, hook_out=hook_out, device=device)
        ]
    else:
        saes = circuit_tracer.load_transcoder_set(path, device=device)
    if kind in ("workbench", "saelens", "circuit_tracer") and (hook or hook_out):
        if len(saes) > 1:
            raise SAEInputError(
                f"{path} holds {len(saes)} SAEs with their own hooks; --hook names the hook of one"
            )
        override_hooks(saes[0][1], hook, hook_out)
    return saes


def load_sae(path: str | Path, device: str = "cpu") -> SAE:
    """Load an SAE saved by `SAE.save`, or one SAE in any layout this package reads (SAELens, sparsify, Gemma
    Scope, dictionary_learning, a one-layer circuit-tracer set), detected from the files."""
    path = Path(path)
    if not (path / CONFIG_FILE).exists():
        return read_sae(path, device=device)
    cfg = SAEConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
    sae = create_sae(cfg)
    sae.load_state_dict(load_file(str(path / WEIGHTS_FILE), device=device))
    return sae.to(device)


def read_sae(path: str | Path, format: str = "auto", **options: Any) -> SAE:
    """The one SAE at ``path`` (see :func:`read_saes`); a layout holding several names them."""
    saes = read_saes(path, format, **options)
    if len(saes) != 1:
        raise SAEInputError(
            f"{path} holds {len(saes)} SAEs ({', '.join(name for name, _ in saes[:6])}"
            f"{', …' if len(saes) > 6 else ''}): pass one of their folders, or import them all with "
            "`workbench sae import`"
        )
    return saes[0][1]


def override_hooks(sae: SAE, hook: str | None, hook_out: str | None) -> None:
    """Set ``sae``'s hooks (a transcoder's output hook defaults to its input hook for an SAE)."""
    if hook:
        keep_out = sae.cfg.hook_out != sae.cfg.hook_in
        sae.cfg.hook_in = sae.hook_in = hook
        if not keep_out and not hook_out:
            sae.cfg.hook_out = sae.hook_out = hook
    if hook_out:
        sae.cfg.hook_out = sae.hook_out = hook_out
