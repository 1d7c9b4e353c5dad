"""EleutherAI sparsify layouts: one SparseCoder per folder (``cfg.json`` + ``sae.safetensors``), a run folder
holding one folder per hookpoint (named by the HF module under the base model, ``layers.6``, ``h.0.mlp``,
``embed_tokens``, optionally ``.../seedK`` when several seeds were trained) and a top-level ``config.json``.

sparsify's tensors: ``encoder.weight`` [n_latents, d_in], ``encoder.bias`` [n_latents], ``W_dec`` [n_latents,
d_in], ``b_dec`` [d_in], optional ``W_skip`` [d_in, d_in] (applied as x @ W_skipᵀ). An SAE encodes
relu((x − b_dec) @ encoder.weightᵀ + encoder.bias) and keeps the top k (``activation: topk``; ``multi_topk`` only
changes the training loss); a transcoder (``transcode: true``) reads the module's input without subtracting b_dec
and predicts its output. Hookpoints map to hook names through ``workbench.adapters.module_names``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from workbench.adapters.module_names import (
    ModuleNameError,
    families_for_module,
    hook_for_module,
    module_for_hook,
)
from workbench.circuits.sae.base import SAE, SAEInputError
from workbench.circuits.sae.tensors import build_sae, fold_input_centering, read_safetensors, require
from workbench.fileio import atomic_save_tensors, atomic_write_json

SPARSIFY_CONFIG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
RUN_CONFIG = "config.json"


def hookpoint_folders(root: Path) -> list[Path]:
    """Folders under ``root`` (any depth up to ``hookpoint/seedK``) holding a sparsify coder, sorted by name."""
    found = [
        cfg.parent for cfg in root.glob(f"**/{SPARSIFY_CONFIG}") if (cfg.parent / SPARSIFY_WEIGHTS).exists()
    ]
    return sorted((p for p in found if len(p.relative_to(root).parts) <= 3), key=lambda p: str(p))


def _is_seed(name: str) -> bool:
    return name.startswith("seed") and name[4:].isdigit()


def _hookpoint(folder: Path, root: Path) -> str:
    """The HF module name of a coder folder: its path below the run root without a trailing ``seedK``."""
    parts = list(folder.relative_to(root).parts)
    if len(parts) > 1 and _is_seed(parts[-1]):
        parts = parts[:-1]
    return ".".join(parts)


def _hook(module: str, side: str, family: str | None, source: Path) -> str:
    if family:
        return hook_for_module(family, module, side)
    candidates = families_for_module(module)
    hooks = {hook_for_module(name, module, side) for name in candidates}
    if len(hooks) == 1:
        return hooks.pop()
    if not candidates:
        raise SAEInputError(
            f"{source}: hookpoint {module!r} is no module the workbench maps to a hook name (known: layers.L, "
            "layers.L.mlp, layers.L.attention|self_attn, h.L, h.L.mlp, h.L.attn, embed_in, embed_tokens, wte): "
            "pass --hook with the TransformerLens hook name"
        )
    raise SAEInputError(
        f"{source}: hookpoint {module!r} names different hooks in families {candidates}: pass --family"
    )


def load_coder(
    folder: Path,
    hookpoint: str,
    *,
    family: str | None,
    model: str,
    device: str = "cpu",
    hooks: tuple[str, str] | None = None,
) -> SAE:
    """One sparsify coder folder as a workbench TopK SAE / transcoder; ``hooks`` (in, out) replace the mapping of
    its hookpoint name."""
    cfg_path = folder / SPARSIFY_CONFIG
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise SAEInputError(f"{cfg_path} is not valid JSON ({err})") from None
    activation = raw.get("activation", "topk")
    if activation != "topk":
        raise SAEInputError(
            f"{cfg_path}: activation {activation!r} is not supported (the workbench reads sparsify's topk coders; "
            "groupmax keeps one latent per group and has no workbench architecture)"
        )
    weights = folder / SPARSIFY_WEIGHTS
    tensors = read_safetensors(weights)
    require(tensors, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], weights, "a sparsify coder")
    d_in = int(raw.get("d_in", tensors["encoder.weight"].shape[1]))
    if tensors["encoder.weight"].shape[1] != d_in:
        raise SAEInputError(
            f"{weights}: tensor 'encoder.weight' has shape {list(tensors['encoder.weight'].shape)} but "
            f"{cfg_path} says d_in={d_in}"
        )
    transcode = bool(raw.get("transcode", False))
    ours = {
        "W_enc": tensors["encoder.weight"].T.contiguous(),
        "b_enc": tensors["encoder.bias"],
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
    }
    if not transcode:
        fold_input_centering(ours, tensors["b_dec"])
    if "W_skip" in tensors:
        ours["W_skip"] = tensors["W_skip"].T.contiguous()
    if hooks is not None:
        hook_in, hook_out = hooks
    else:
        hook_in = _hook(hookpoint, "input" if transcode else "output", family, weights)
        hook_out = _hook(hookpoint, "output", family, weights) if transcode else hook_in
    return build_sae(
        "topk",
        ours,
        weights,
        device,
        k=int(raw.get("k", 32)),
        hook_in=hook_in,
        hook_out=hook_out,
        model=model,
    )


def load_sparsify(
    path: str | Path,
    *,
    family: str | None = None,
    device: str = "cpu",
    hook: str | None = None,
    hook_out: str | None = None,
) -> list[tuple[str, SAE]]:
    """Every coder of a sparsify folder or run folder as (name, SAE): the name is the hookpoint (and seed).
    ``hook`` / ``hook_out`` name the hooks of a single coder whose folder is no module name."""
    root = Path(path)
    folders = [root] if (root / SPARSIFY_CONFIG).exists() else hookpoint_folders(root)
    if not folders:
        raise SAEInputError(f"{root} holds no sparsify coder ({SPARSIFY_CONFIG} + {SPARSIFY_WEIGHTS})")
    if folders != [root]:
        run_root = root
    else:
        run_root = root.parent.parent if _is_seed(root.name) else root.parent
    model = ""
    for candidate in (root / RUN_CONFIG, run_root / RUN_CONFIG):
        if candidate.is_file():
            try:
                model = str(json.loads(candidate.read_text()).get("model") or "")
            except json.JSONDecodeError as err:
                raise SAEInputError(f"{candidate} is not valid JSON ({err})") from None
            break
    if hook and len(folders) > 1:
        raise SAEInputError(
            f"{root} holds {len(folders)} coders; --hook names the hook of one: import its folder"
        )
    hooks = (hook, hook_out or hook) if hook else None
    out = []
    for folder in folders:
        hookpoint = _hookpoint(folder, run_root)
        name = ".".join(folder.relative_to(run_root).parts)
        out.append(
            (name, load_coder(folder, hookpoint, family=family, model=model, device=device, hooks=hooks))
        )
    return out


def save_sparsify(sae: SAE, path: str | Path, *, family: str) -> Path:
    """Write ``sae`` as a sparsify run folder ``path/<module>/{cfg.json, sae.safetensors}`` + ``config.json`` so
    ``sparsify.SparseCoder.load_from_disk(path/<module>)`` (or ``load_many(path, local=True)``) rebuilds it with
    equal encodings. Only TopK coders with d_out = d_in have a sparsify form. Returns the coder folder."""
    architecture, tensors = sae.inference_state()
    if architecture != "topk":
        raise SAEInputError(
            f"sparsify has only TopK coders; this SAE is {architecture!r}: export it as saelens instead"
        )
    if sae.d_out != sae.d_in:
        raise SAEInputError(
            f"sparsify coders have d_out = d_in; this transcoder maps {sae.d_in} -> {sae.d_out}: export it as saelens"
        )
    transcode = sae.cfg.is_transcoder
    try:
        module, side = module_for_hook(family, sae.hook_in)
        if transcode:
            out_module, out_side = module_for_hook(family, sae.hook_out)
            if (out_module, out_side) != (module, "output") or side != "input":
                raise SAEInputError(
                    f"a sparsify transcoder reads a module's input and predicts the same module's output; this one "
                    f"maps {sae.hook_in} -> {sae.hook_out}: export it as saelens"
                )
    except ModuleNameError as err:
        raise SAEInputError(str(err)) from None
    b_enc = tensors["b_enc"] if transcode else tensors["b_enc"] + tensors["b_dec"] @ tensors["W_enc"]
    out = {
        "encoder.weight": tensors["W_enc"].T.contiguous(),
        "encoder.bias": b_enc.contiguous(),
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
    }
    if "W_skip" in tensors:
        out["W_skip"] = tensors["W_skip"].T.contiguous()
    unit = bool(torch.allclose(tensors["W_dec"].norm(dim=1), torch.ones(sae.d_sae), atol=1e-4))
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, sae.d_sae // sae.d_in),
        "normalize_decoder": unit,
        "num_latents": sae.d_sae,
        "k": sae.cfg.k,
        "multi_topk": False,
        "skip_connection": sae.W_skip is not None,
        "transcode": transcode,
        "d_in": sae.d_in,
    }
    root = Path(path)
    folder = root / module
    atomic_save_tensors(folder / SPARSIFY_WEIGHTS, out)
    atomic_write_json(folder / SPARSIFY_CONFIG, cfg)
    run = {
        "sae": {k: v for k, v in cfg.items() if k != "d_in"},
        "hookpoints": [module],
        "model": sae.cfg.model,
    }
    atomic_write_json(root / RUN_CONFIG, run)
    return folder
