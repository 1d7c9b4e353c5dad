"""Probe readouts on one prompt: probes saved in the workspace (``workspace/probes/<name>/``), whether one fits a
model, its prediction per token, and its direction for steering (``workbench.interventions``).

A saved probe is ``probes.safetensors`` (:meth:`LinearProbes.save`) and ``probe.json`` (model, checkpoint, label
set, label names), written in that order, each atomically; a directory is listed once ``probe.json`` exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import safe_open

from workbench.fileio import atomic_write_json
from workbench.identity import provenance_note
from workbench.interventions import Intervention
from workbench.probes.linear import LinearProbes, ProbeError
from workbench.workspace import Workspace, safe_name

WEIGHTS = "probes.safetensors"
META = "probe.json"


@dataclass(frozen=True)
class SavedProbe:
    """A probe directory of ``workspace/probes`` as listed: its sites (hooks) and what it was fitted on."""

    name: str
    sites: list[str]
    task: str
    model: str | None
    checkpoint: int | None
    label_set: str | None
    label_names: list[str] | None


def probes_dir(workspace: Any) -> Path:
    return Workspace(workspace).root / "probes"


def save_probe(
    workspace: Any,
    name: str,
    probes: LinearProbes,
    *,
    model: Any = None,
    label_set: str | None = None,
    label_names: list[str] | None = None,
) -> Path:
    """Save fitted ``probes`` as ``workspace/probes/<name>/`` so the prompt lab (and notebooks) can read them."""
    directory = probes_dir(workspace) / safe_name(name, "for a probe")
    directory.mkdir(parents=True, exist_ok=True)
    probes.save(directory / WEIGHTS)
    meta = {
        "sites": probes.sites,
        "task": probes.task,
        "label_set": label_set,
        "label_names": label_names,
        "model": model.cfg.name if model is not None else None,
        "checkpoint": model.cfg.checkpoint if model is not None else None,
    }
    atomic_write_json(directory / META, meta)
    return directory


def saved_probes(workspace: Any) -> list[SavedProbe]:
    """Every complete probe directory under ``workspace/probes``, sorted by name."""
    root = probes_dir(workspace)
    found = []
    for directory in sorted(root.glob("*")) if root.is_dir() else []:
        if (directory / META).exists() and (directory / WEIGHTS).exists():
            meta = json.loads((directory / META).read_text())
            found.append(
                SavedProbe(
                    directory.name,
                    list(meta["sites"]),
                    meta["task"],
                    meta.get("model"),
                    meta.get("checkpoint"),
                    meta.get("label_set"),
                    meta.get("label_names"),
                )
            )
    return found


def probe_width(workspace: Any, name: str) -> int:
    """The activation width a saved probe reads (``weight`` [sites, d, outputs]), from the file's header only."""
    with safe_open(str(probes_dir(workspace) / name / WEIGHTS), framework="pt") as handle:
        return int(handle.get_slice("weight").get_shape()[1])


def per_token_shapes(model: Any, hooks: list[str]) -> dict[str, tuple[int, ...]]:
    """Each hook's activation shape per token (``shape[2:]``) on a two-token forward pass of ``model``."""
    if not hooks:
        return {}
    with torch.no_grad(), model.capture(hooks) as cache:
        model(torch.zeros((1, 2), dtype=torch.long, device=model.device))
    return {hook: tuple(cache[hook].shape[2:]) for hook in hooks}


def probes_for_model(model: Any, workspace: Any = None) -> list[tuple[SavedProbe, str]]:
    """The saved probes that fit ``model`` — every site is a hook of it with one vector per token of the probe's
    width (from the saved header; no probe weights are read) — each with the note to show ("" for the model's own;
    one naming both models, or both checkpoints, for one fitted elsewhere that fits)."""
    saved = saved_probes(workspace)
    known = set(model.hook_names())
    shapes = per_token_shapes(model, sorted({site for p in saved for site in p.sites} & known))
    fits = []
    for entry in saved:
        width = probe_width(workspace, entry.name)
        if any(shapes.get(site) != (width,) for site in entry.sites):
            continue
        fits.append((entry, provenance_note(entry.model, entry.checkpoint, model, "fitted")))
    return fits


def load_probe_for(model: Any, name: str, workspace: Any = None) -> tuple[LinearProbes, SavedProbe, str]:
    """Load probe ``name`` and check each of its sites is a hook of ``model`` with the probe's width ->
    (probes, listing, note); ``note`` is non-empty when it was fitted on another model name or checkpoint."""
    listing = {p.name: p for p in saved_probes(workspace)}
    if name not in listing:
        raise ProbeError(
            f"no saved probe {name!r} in {probes_dir(workspace)} (saved: {', '.join(listing) or 'none'}); save one "
            "with `workbench probe run MODEL --labels ... --save NAME` or probes.readout.save_probe(workspace, name, "
            "probes, model=model)"
        )
    saved = listing[name]
    probes = LinearProbes.load(probes_dir(workspace) / name / WEIGHTS)
    known = set(model.hook_names())
    missing = [s for s in probes.sites if s not in known]
    if missing:
        raise ProbeError(
            f"probe {name!r} reads {', '.join(missing)}, which {model.cfg.name} does not have: it is a "
            f"probe for another model or hook; fit one on this model (workbench probe run "
            f"{model.cfg.name} --labels ... --hooks HOOK --save NAME)"
        )
    ids = torch.zeros((1, 2), dtype=torch.long)
    with torch.no_grad(), model.capture(probes.sites) as cache:
        model(ids.to(model.device))
    for site in probes.sites:
        width = cache[site].shape[-1]
        if cache[site].ndim != 3 or width != probes.weight.shape[1]:
            there = (
                f"{width} features per token" if cache[site].ndim == 3 else f"a {cache[site].ndim}-d tensor"
            )
            raise ProbeError(
                f"probe {name!r} expects {probes.weight.shape[1]} features at {site}, but {model.cfg.name} has "
                f"{there} there: it is a probe for another model or hook; fit one on this model (workbench probe "
                f"run {model.cfg.name} --labels ... --hooks {site} --save NAME)"
            )
    note = provenance_note(saved.model, saved.checkpoint, model, "fitted")
    return probes, saved, f"probe {name!r} was {note}" if note else ""


def probe_predictions(
    model: Any, tokens: torch.Tensor, probes: LinearProbes, site: str, label_names: list[str] | None = None
) -> pd.DataFrame:
    """The probe's prediction per position of ``tokens`` [1, pos] or pixels [1, C, H, W] at ``site``. Columns:
    position, token (its text, or CLS / "row,column" of a patch), prediction, label, and for classifiers confidence
    (the predicted class's probability)."""
    index = probes.sites.index(site)
    with torch.no_grad(), model.capture([site], dtype=torch.float32) as cache:
        model(tokens.to(model.device))
    activations = cache[site][0]  # [pos, d]
    x = torch.zeros(len(probes.sites), activations.shape[0], probes.weight.shape[1])
    x[index] = activations
    out = probes.decision_function(x)[index]  # [pos, outputs]
    texts = model.position_labels(tokens)
    frame = pd.DataFrame({"position": range(len(texts)), "token": texts})
    if probes.task == "classification":
        assert probes.classes is not None
        proba = out.softmax(-1)
        best = proba.argmax(-1)
        classes = probes.classes[best].tolist()
        frame["prediction"] = classes
        frame["label"] = [
            label_names[int(c)] if label_names and 0 <= int(c) < len(label_names) else str(c) for c in classes
        ]
        frame["confidence"] = proba.max(-1).values.tolist()
    else:
        frame["prediction"] = out[:, 0].tolist()
        frame["label"] = [f"{v:.3g}" for v in frame["prediction"]]
    return frame


def probe_steering(
    probes: LinearProbes, name: str, site: str, label: int | None, scale: float, **kwargs: Any
) -> Intervention:
    """Steer ``site`` by ``scale`` × the probe's unit direction for ``label`` (:meth:`LinearProbes.direction`)."""
    direction = probes.direction(site, label)
    return Intervention.steer(site, direction, scale, label=f"probe {name} label {label}", **kwargs)
