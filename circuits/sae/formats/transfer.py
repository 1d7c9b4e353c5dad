"""Import foreign SAEs into the workspace and export workspace SAEs to the ecosystem's layouts; a cross-layer
transcoder (circuit-tracer's ``cross_layer_transcoder`` folder, or ours) imports as one CLT in our layout and
exports to circuit-tracer's.

An imported SAE is saved like one of ours (``workspace/saes/<id>/``: ``SAE.save`` + ``source.json`` naming the
format and path it came from), so ``sae eval``, feature pages, splicing, circuits and the dashboard treat it
alike. Every SAE of an import is read and checked before anything is written; each is staged in a hidden folder
under ``saes/`` and renamed into place, so an error leaves no SAE registered half-way.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from workbench.circuits.sae.analysis import _sae_hooks, check_sae_fits, hook_widths
from workbench.circuits.sae.base import CONFIG_FILE, SAE, SAEInputError
from workbench.circuits.sae.clt import CLT_CONFIG_FILE, CrossLayerTranscoder, is_clt_dir, load_clt_dir
from workbench.circuits.sae.clt_analysis import check_clt_fits
from workbench.circuits.sae.evals import sae_dir
from workbench.circuits.sae.features import logit_effects
from workbench.circuits.sae.formats import FORMATS, detect_format, read_saes
from workbench.circuits.sae.formats.circuit_tracer import CONFIG_FILE as CT_CONFIG_FILE
from workbench.circuits.sae.formats.circuit_tracer import load_clt, read_config
from workbench.circuits.sae.formats.neuronpedia import dashboard_batch, write_bulk_export
from workbench.circuits.sae.formats.saelens import save_saelens
from workbench.circuits.sae.formats.sparsify import save_sparsify
from workbench.fileio import atomic_write_json
from workbench.references import short_name
from workbench.workspace import Workspace, safe_name

CLT_EXPORT_FORMATS = ("circuit-tracer", "circuit_tracer")
EXPORT_FORMATS = ("saelens", "sparsify", "neuronpedia", *CLT_EXPORT_FORMATS)
SOURCE_FILE = "source.json"


def import_saes(
    path: str | Path,
    workspace: Any = None,
    *,
    format: str = "auto",
    sae_id: str | None = None,
    family: str | None = None,
    hook: str | None = None,
    hook_out: str | None = None,
    overwrite: bool = False,
    model=None,
) -> list[str]:
    """Register every SAE at ``path`` under ``workspace/saes/``; returns their ids. One SAE takes ``sae_id`` (default:
    the folder name); several (a sparsify run, a transcoder set) are ``<sae_id or folder>.<name>``. With ``model``
    (a HookedModel) every SAE's hooks and widths are checked against it before anything is registered."""
    path = Path(path).expanduser()
    clt = read_clt(path, format)
    if clt is not None:
        return [_import_clt(clt, path, workspace, sae_id=sae_id, overwrite=overwrite, model=model)]
    kind = detect_format(path) if format == "auto" else format
    if kind not in FORMATS:
        raise SAEInputError(f"unknown SAE format {format!r}; use auto or one of {', '.join(FORMATS)}")
    saes = read_saes(path, kind, family=family, hook=hook, hook_out=hook_out)
    base = sae_id or (path.parent.name if path.is_file() else path.name)
    named = [(base if len(saes) == 1 else f"{base}.{name}", name, sae) for name, sae in saes]
    ws = Workspace(workspace).ensure()
    for new_id, name, sae in named:
        safe_name(new_id, "for an SAE")
        if not sae.hook_in:
            raise SAEInputError(f"{path}: SAE {name!r} names no input hook: pass --hook (and --hook-out)")
        if sae_dir(ws, new_id).exists() and not overwrite:
            raise SAEInputError(
                f"SAE {new_id!r} already exists in {ws.root / 'saes'}: pass --id NAME or --overwrite"
            )
        if model is not None:
            widths, _ = hook_widths(model, _sae_hooks(sae, model, new_id))
            check_sae_fits(sae, model, widths, new_id)
    root = ws.root / "saes"
    root.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    try:
        for new_id, name, sae in named:
            stage = Path(tempfile.mkdtemp(dir=root, prefix=f".import-{new_id}."))
            stage.chmod(0o755)  # mkdtemp's 0700 would differ from the folders SAE.save creates
            staged.append((stage, sae_dir(ws, new_id)))
            atomic_write_json(
                stage / SOURCE_FILE, {"format": kind, "path": str(path.resolve()), "name": name}
            )
            sae.save(stage)
        for stage, final in staged:
            if final.exists():
                shutil.rmtree(final)
            os.replace(stage, final)
    finally:
        for stage, _ in staged:
            if stage.exists():
                shutil.rmtree(stage)
    return [new_id for new_id, _, _ in named]


def read_clt(path: Path, format: str = "auto") -> CrossLayerTranscoder | None:
    """The cross-layer transcoder at ``path`` (a folder of ours, ``workbench_clt.json``, or circuit-tracer's
    ``cross_layer_transcoder`` folder or its config.yaml), None for any other layout."""
    folder = path.parent if path.is_file() else path
    if format in ("auto", "workbench") and is_clt_dir(folder):
        return load_clt_dir(folder)
    ct = format in ("auto", "circuit_tracer") and (folder / CT_CONFIG_FILE).is_file()
    if ct and read_config(folder)[1]["model_kind"] == "cross_layer_transcoder":
        return load_clt(folder)
    return None


def _import_clt(
    clt: CrossLayerTranscoder, path: Path, workspace: Any, *, sae_id: str | None, overwrite: bool, model=None
) -> str:
    """Register a CLT under ``saes/<id>/`` in our layout (+ ``source.json``), staged and renamed like an SAE; with
    ``model`` its hooks and widths are checked first."""
    folder = path.parent if path.is_file() else path
    new_id = sae_id or folder.name
    safe_name(new_id, "for an SAE")
    ws = Workspace(workspace)
    if sae_dir(ws, new_id).exists() and not overwrite:
        raise SAEInputError(
            f"SAE {new_id!r} already exists in {ws.root / 'saes'}: pass --id NAME or --overwrite"
        )
    if model is not None:
        check_clt_fits(clt, model, new_id)
    root = ws.ensure().root / "saes"
    root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=root, prefix=f".import-{new_id}."))
    try:
        stage.chmod(0o755)
        kind = "workbench" if is_clt_dir(folder) else "circuit_tracer"
        atomic_write_json(
            stage / SOURCE_FILE, {"format": kind, "path": str(folder.resolve()), "name": folder.name}
        )
        clt.save(stage)
        final = sae_dir(ws, new_id)
        if final.exists():
            shutil.rmtree(final)
        os.replace(stage, final)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    return new_id


def export_clt(clt: CrossLayerTranscoder, out: str | Path, format: str) -> Path:
    """Write a CLT in circuit-tracer's ``cross_layer_transcoder`` layout (the only one that holds CLTs);
    ``CrossLayerTranscoder.save_circuit_tracer`` refuses skip connections and TopK with the reason."""
    if format == "saelens":
        raise SAEInputError(
            f"SAELens {_installed_version('sae-lens')} has no cross-layer transcoder class (its "
            "transcoders read and write one layer, and a CLT's layer-i latents also write every later "
            "layer, so no per-layer split is exact): export it with --format circuit-tracer "
            "(circuit-tracer's CLT layout)"
        )
    if format not in CLT_EXPORT_FORMATS:
        raise SAEInputError(
            f"a cross-layer transcoder exports to --format circuit-tracer (circuit-tracer's CLT layout) "
            f"only, not {format!r}: SAELens, sparsify and Neuronpedia hold one SAE per hook"
        )
    return clt.save_circuit_tracer(Path(out).expanduser())


def _installed_version(distribution: str) -> str:
    """The installed version of ``distribution`` as MAJOR.MINOR, or "(not installed here)"."""
    try:
        return ".".join(metadata.version(distribution).split(".")[:2])
    except metadata.PackageNotFoundError:
        return "(not installed here)"


def export_sae(
    sae: SAE,
    out: str | Path,
    format: str,
    *,
    family: str | None = None,
    features=None,
    sae_id: str = "",
    model_id: str = "",
    unembedding=None,
    writes=None,
    decode=None,
) -> Path:
    """Write ``sae`` in ``format`` (saelens, sparsify, neuronpedia) under ``out``; returns what was written.

    sparsify needs the model ``family`` (its folders are HF module names); neuronpedia needs ``features`` (the
    SAE's ``sae_features`` rows) and takes the model's ``unembedding`` [d_vocab, d_model], each latent's residual
    ``writes`` [d_sae, d_model] (``features.residual_writes``; default the decoder rows) and ``decode`` for the
    logit tables."""
    out = Path(out).expanduser()
    if format == "saelens":
        return save_saelens(sae, out)
    if format == "sparsify":
        if not family:
            raise SAEInputError(
                "sparsify names folders by the HF module: pass --family (gpt_neox, gpt2, llama) or --model"
            )
        return save_sparsify(sae, out, family=family)
    if format == "neuronpedia":
        if features is None or len(features) == 0:
            raise SAEInputError(
                f"SAE {sae_id!r} has no feature pages in the workspace (table sae_features): run `workbench sae "
                "train` for it, or `workbench sae eval` with feature pages, before exporting to Neuronpedia"
            )
        writes = sae.W_dec if writes is None else writes
        logits = logit_effects(writes, unembedding) if unembedding is not None else None
        batch = dashboard_batch(
            features,
            sae,
            model_id=short_name(model_id or sae.cfg.model or "model"),
            sae_set=sae_id,
            logits=logits,
            decode=decode,
        )
        return write_bulk_export(out, batch, sae)
    if format in CLT_EXPORT_FORMATS:
        raise SAEInputError(
            f"--format {format} writes cross-layer transcoders (circuit-tracer's CLT layout); "
            f"{sae_id or 'this SAE'} is one SAE of {sae.hook_in}: export it as saelens or sparsify"
        )
    raise SAEInputError(f"unknown export format {format!r}; use one of {', '.join(EXPORT_FORMATS)}")


def imported_saes(workspace: Any = None) -> pd.DataFrame:
    """The workspace's imported SAEs: sae_id, format, source (path), architecture, hook_in, hook_out, d_in, d_sae."""
    rows = []
    for source in sorted(Workspace(workspace).root.glob(f"saes/*/{SOURCE_FILE}")):
        config = source.parent / CONFIG_FILE
        if (source.parent / CLT_CONFIG_FILE).is_file():  # a CLT: d_in its d_model, d_sae its latents in all
            clt = json.loads((source.parent / CLT_CONFIG_FILE).read_text())
            config, clt["d_in"], clt["d_sae"] = (
                source.parent / CLT_CONFIG_FILE,
                clt["d_model"],
                clt["n_layers"] * clt["d_transcoder"],
            )
            origin, cfg = json.loads(source.read_text()), clt
        elif not config.is_file():
            continue
        else:
            origin, cfg = json.loads(source.read_text()), json.loads(config.read_text())
        rows.append(
            {
                "sae_id": source.parent.name,
                "format": origin.get("format"),
                "source": origin.get("path"),
                "architecture": cfg.get("architecture"),
                "hook_in": cfg.get("hook_in"),
                "hook_out": cfg.get("hook_out"),
                "d_in": cfg.get("d_in"),
                "d_sae": cfg.get("d_sae"),
            }
        )
    return pd.DataFrame(
        rows, columns=["sae_id", "format", "source", "architecture", "hook_in", "hook_out", "d_in", "d_sae"]
    )
