"""Codebook readouts on one prompt: the codebook runs of a workspace, whether one fits a model, the codes each
token would choose at a site (read from the clean activations; the model runs unchanged), and a code's vector
for steering (``workbench.interventions``)."""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from workbench.circuits.codebook.module import CodebookError, CodebookSet
from workbench.circuits.codebook.runs import codebook_dir
from workbench.identity import provenance_note
from workbench.interventions import Intervention
from workbench.probes.readout import per_token_shapes
from workbench.workspace import Workspace


def saved_codebooks(workspace: Any) -> dict[str, list[str]]:
    """{run name: its sites} for every run under ``workspace/codebooks`` holding ``codebooks.safetensors``."""
    root = Workspace(workspace).root / "codebooks"
    runs = {}
    for directory in sorted(root.glob("*")) if root.is_dir() else []:
        if (directory / "codebooks.safetensors").exists():
            runs[directory.name] = [c["site"] for c in CodebookSet.metadata(directory)["configs"]]
    return runs


def codebooks_for_model(model: Any, workspace: Any = None) -> list[tuple[str, list[str], str]]:
    """The codebook runs that fit ``model`` — each site a hook of it with the codebook's per-token shape (d, or
    (heads, d) for per-head codebooks; from the saved configs, no weights read) — as (run, sites, note): "" for the
    model's own, a note naming both models (or checkpoints) for a run trained on another that fits."""
    root = Workspace(workspace).root / "codebooks"
    metas = {run: CodebookSet.metadata(root / run) for run in saved_codebooks(workspace)}
    known = set(model.hook_names())
    shapes = per_token_shapes(
        model, sorted({c["site"] for m in metas.values() for c in m["configs"]} & known)
    )
    fits = []
    for run, meta in metas.items():
        wanted = {
            c["site"]: (c["n_groups"], c["d"]) if c.get("n_groups", 1) > 1 else (c["d"],)
            for c in meta["configs"]
        }
        if any(shapes.get(site) != shape for site, shape in wanted.items()):
            continue
        note = provenance_note(meta.get("model"), meta.get("checkpoint"), model)
        fits.append((run, list(wanted), note))
    return fits


def load_codebooks_for(model: Any, run: str, workspace: Any = None) -> CodebookSet:
    """Load codebook run ``run`` and check every site is a hook of ``model`` with the codebook's width."""
    codebooks = CodebookSet.load(codebook_dir(Workspace(workspace), run), device=model.device)
    known = set(model.hook_names())
    missing = [s for s in codebooks.sites if s not in known]
    if missing:
        raise CodebookError(
            f"codebook run {run!r} sits on {', '.join(missing)}, which {model.cfg.name} does not "
            "have: it is a codebook for another model"
        )
    ids = torch.zeros((1, 2), dtype=torch.long, device=model.device)
    with torch.no_grad(), model.capture(codebooks.sites) as cache:
        model(ids)
    for site in codebooks.sites:
        config = codebooks[site].config
        shape = tuple(cache[site].shape[2:])
        wanted = (config.n_groups, config.d) if config.n_groups > 1 else (config.d,)
        if shape != wanted:
            raise CodebookError(
                f"codebook run {run!r} expects {list(wanted)} per token at {site}, but {model.cfg.name} has "
                f"{list(shape)}: it is a codebook for another model"
            )
    return codebooks


def token_codes(model: Any, tokens: torch.Tensor, codebooks: CodebookSet, site: str) -> pd.DataFrame:
    """The codes the codebook at ``site`` chooses for each token of ``tokens`` [1, pos] (and each head of a
    per-head codebook). Columns: position, token, group, rank, code, score (similarity)."""
    book = codebooks[site]
    with torch.no_grad(), model.capture([site], device=None) as cache:
        model(tokens.to(model.device))
    with torch.no_grad():
        _, idx, scores = book.encode(cache[site][0].to(book.codes.dtype))  # [pos, n_groups, k]
    texts = model.to_str_tokens(tokens[0])
    rows = [
        {
            "position": p,
            "token": texts[p],
            "group": g,
            "rank": r,
            "code": int(idx[p, g, r]),
            "score": float(scores[p, g, r]),
        }
        for p in range(idx.shape[0])
        for g in range(idx.shape[1])
        for r in range(idx.shape[2])
    ]
    return pd.DataFrame(rows)


def code_vector(codebooks: CodebookSet, site: str, code: int, group: int = 0) -> torch.Tensor:
    """The vector of ``code`` [d] (of head ``group`` for a per-head codebook): what the codebook writes."""
    book = codebooks[site]
    if not 0 <= code < book.config.n_codes:
        raise CodebookError(
            f"code {code} is out of range for {site} (valid codes: 0..{book.config.n_codes - 1})"
        )
    if not 0 <= group < book.config.n_groups:
        raise CodebookError(f"group {group} out of range for {site} ({book.config.n_groups} heads)")
    return book.codes[group, code].detach().float().cpu()


def code_steering(
    codebooks: CodebookSet, run: str, site: str, code: int, scale: float, group: int = 0, **kwargs: Any
) -> Intervention:
    """Steer ``site`` by ``scale`` × the code's vector (on head ``group`` only for a per-head codebook)."""
    heads = (group,) if codebooks[site].config.n_groups > 1 else None
    return Intervention.steer(
        site,
        code_vector(codebooks, site, code, group),
        scale,
        heads=heads,
        label=f"codebook {run} code {code}",
        **kwargs,
    )
