"""SAE readouts on one prompt: the saved SAEs of a workspace, whether one fits a model, its top latents per token,
and a latent's decoder direction for steering (``workbench.interventions.Intervention.steer``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from workbench.circuits.sae.analysis import check_sae_fits, find_sae, hook_widths
from workbench.circuits.sae.base import CONFIG_FILE, SAE, SAEInputError, token_vectors
from workbench.identity import provenance_note
from workbench.interventions import Intervention
from workbench.workspace import Workspace


@dataclass(frozen=True)
class SavedSAE:
    """An SAE directory of ``workspace/saes`` as listed (its config, weights not read)."""

    sae_id: str
    hook_in: str
    hook_out: str
    architecture: str
    d_sae: int
    model: str | None
    checkpoint: int | None
    d_in: int = 0
    d_out: int = 0


def saved_saes(workspace: Any) -> list[SavedSAE]:
    """Every SAE / transcoder saved under ``workspace/saes`` (ours or SAELens format), sorted by id."""
    root = Workspace(workspace).root / "saes"
    found = []
    for directory in sorted(root.glob("*")) if root.is_dir() else []:
        config = directory / CONFIG_FILE
        if not config.exists():
            config = directory / "cfg.json"
        if not config.exists():
            continue
        cfg = json.loads(config.read_text())
        hook_in = cfg.get("hook_in") or cfg.get("hook_name") or ""
        found.append(
            SavedSAE(
                directory.name,
                hook_in,
                cfg.get("hook_out") or hook_in,
                str(cfg.get("architecture", "?")),
                int(cfg.get("d_sae", 0)),
                cfg.get("model") or cfg.get("model_name"),
                cfg.get("checkpoint"),
                int(cfg.get("d_in", 0)),
                int(cfg.get("d_out") or cfg.get("d_in", 0)),
            )
        )
    return found


def saes_for_model(model: Any, workspace: Any = None) -> list[tuple[SavedSAE, str]]:
    """The saved SAEs that fit ``model`` — it has their hooks, at their widths (from their configs; no weights are
    read) — each with the note to show ("" for the model's own; one naming both models, or both checkpoints, for
    one trained elsewhere that fits). SAEs of other hooks or widths are left out."""
    saved = saved_saes(workspace)
    known = set(model.hook_names())
    widths: dict[str, int] = {}
    for hook in sorted({h for s in saved for h in (s.hook_in, s.hook_out)} & known):
        try:
            widths |= hook_widths(model, [hook])[0]
        except SAEInputError:  # a hook whose activation is not one vector per token: no SAE reads it
            continue
    fits = []
    for entry in saved:
        if widths.get(entry.hook_in) != entry.d_in or widths.get(entry.hook_out) != entry.d_out:
            continue
        fits.append((entry, provenance_note(entry.model, entry.checkpoint, model)))
    return fits


def load_sae_for(model: Any, sae_id: str, workspace: Any = None) -> tuple[SAE, str]:
    """Load SAE ``sae_id`` and check it reads and writes hooks of ``model`` at their widths -> (SAE, note).

    Raises SAEInputError for an SAE of another model or hook (names both widths); ``note`` is non-empty when the
    SAE was trained on another model name or checkpoint with the same shapes (it runs, but say so)."""
    sae_id, sae = find_sae(sae_id, workspace)
    known = set(model.hook_names())
    missing = [h for h in dict.fromkeys([sae.hook_in, sae.hook_out]) if h not in known]
    if missing:
        raise SAEInputError(
            f"SAE {sae_id!r} reads/writes {', '.join(missing)}, which {model.cfg.name} does not have: it is an SAE "
            "for another model or hook; pick an SAE trained on this model"
        )
    widths, _ = hook_widths(model, list(dict.fromkeys([sae.hook_in, sae.hook_out])))
    note = check_sae_fits(sae, model, widths, sae_id)
    return sae.to(model.device), note


def latent_activations(model: Any, tokens: torch.Tensor, sae: SAE) -> torch.Tensor:
    """SAE latent activations [pos, d_sae] on ``tokens`` [1, pos] or pixels [1, C, H, W] (the SAE reads
    ``sae.hook_in``)."""
    with torch.no_grad(), model.capture([sae.hook_in], device=None) as cache:
        model(tokens.to(model.device))
        return sae.encode(token_vectors(cache[sae.hook_in][0], sae.d_in).to(sae.W_enc.dtype))


def top_latents(model: Any, tokens: torch.Tensor, sae: SAE, k: int = 3) -> pd.DataFrame:
    """The ``k`` most active latents per position of ``tokens`` [1, pos] or pixels [1, C, H, W] (active ones
    only). Columns: position, token (its text, or CLS / "row,column" of a patch), rank, latent, activation."""
    acts = latent_activations(model, tokens, sae).float().cpu()
    top = acts.topk(min(k, acts.shape[-1]), dim=-1)
    texts = model.position_labels(tokens)
    rows = [
        {
            "position": p,
            "token": texts[p],
            "rank": r,
            "latent": int(top.indices[p, r]),
            "activation": float(top.values[p, r]),
        }
        for p in range(acts.shape[0])
        for r in range(top.indices.shape[1])
        if top.values[p, r] > 0
    ]
    return pd.DataFrame(rows, columns=["position", "token", "rank", "latent", "activation"])


def latent_direction(sae: SAE, latent: int) -> torch.Tensor:
    """Decoder row of ``latent`` [d_out]: what the latent writes into ``sae.hook_out``."""
    if not 0 <= latent < sae.W_dec.shape[0]:
        raise SAEInputError(f"latent {latent} out of range: the SAE has {sae.W_dec.shape[0]} latents")
    return sae.W_dec[latent].detach().float().cpu()


def latent_steering(sae: SAE, sae_id: str, latent: int, scale: float, **kwargs: Any) -> Intervention:
    """Steer ``sae.hook_out`` by ``scale`` × the latent's decoder direction."""
    return Intervention.steer(
        sae.hook_out, latent_direction(sae, latent), scale, label=f"SAE {sae_id} latent {latent}", **kwargs
    )
