"""Evaluate SAEs / transcoders: reconstruction, sparsity and the model's loss when the SAE is spliced in.

:func:`evaluate_sae` gives one ``sae_evals`` row (table declared in ``circuits.sae.analysis.ANALYSIS``); the CE
metrics need next-token logits, so on an encoder (MiniLM) they are NaN and ``ce_note`` says why;
``ce_recovered_note`` says when CE recovered is not meaningful because zero-ablating the hook barely moves the loss
(:func:`ce_recovered_note`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from workbench.circuits.sae.base import SAE, SAEInputError, token_vectors
from workbench.workspace import safe_name


@torch.no_grad()
def reconstruction_metrics(
    sae: SAE, batches: Iterable, dense_threshold: float = 0.1, progress: bool = True
) -> dict:
    """Streaming L0, FVU, explained variance, cosine, dead/dense fractions and density histogram.

    `batches` yields x [batch, d_in] (target = x) or (x [batch, d_in], y [batch, d_out]) pairs, on any device
    (moved to the SAE's); sums are accumulated in float64. `density` comes back on the CPU, [d_sae].
    """
    n = 0
    sq_err = 0.0
    y_sum = y_sq = None
    cos_sum = l0_sum = 0.0
    fires = torch.zeros(sae.d_sae, dtype=torch.float64, device=sae.device)
    for batch in tqdm(batches, disable=not progress, desc="reconstruction metrics", unit="batch"):
        x, y = batch if isinstance(batch, (tuple, list)) else (batch, batch)
        x, y = token_vectors(x, sae.d_in), token_vectors(y, sae.d_out)
        x = x.reshape(-1, x.shape[-1]).to(device=sae.device, dtype=torch.float32)
        y = y.reshape(-1, y.shape[-1]).to(device=sae.device, dtype=torch.float32)
        sae.check_input(x)
        f = sae.encode(x)
        out = sae.decode(f, x)
        sq_err += float((out - y).double().pow(2).sum())
        y64 = y.double()
        y_sum = y64.sum(0) if y_sum is None else y_sum + y64.sum(0)
        y_sq = y64.pow(2).sum(0) if y_sq is None else y_sq + y64.pow(2).sum(0)
        cos_sum += float(F.cosine_similarity(out, y, dim=-1).sum())
        active = f > 0
        l0_sum += float(active.sum())
        fires += active.sum(0).double()
        n += x.shape[0]
    if y_sum is None or y_sq is None:
        raise ValueError("no activation batches to evaluate the SAE on; pass at least one batch")
    total_var = float((y_sq - y_sum.pow(2) / n).sum())
    density = (fires / n).cpu()
    fvu = sq_err / max(total_var, 1e-30)
    return {
        "n_tokens": n,
        "L0": l0_sum / n,
        "FVU": fvu,
        "explained_variance": 1 - fvu,
        "cosine": cos_sum / n,
        "dead_fraction": float((density == 0).double().mean()),
        "dense_fraction": float((density > dense_threshold).double().mean()),
        "density": density.float(),
    }


def density_histogram(density: torch.Tensor, bins: int = 30) -> dict:
    """Histogram of log10 latent density [d_sae] (dead latents counted separately)."""
    alive = density[density > 0].double().log10()
    counts, edges = (
        torch.histogram(alive.float(), bins=bins)
        if alive.numel()
        else (torch.zeros(bins), torch.zeros(bins + 1))
    )
    return {
        "log10_density_edges": edges.tolist(),
        "counts": counts.tolist(),
        "dead": int((density == 0).sum()),
    }


def splice_hooks(sae: SAE, mode: str = "sae") -> list:
    """Forward hooks replacing `sae.hook_out` with the SAE's output (mode "sae") or zeros (mode "zero").

    A transcoder reads `sae.hook_in` earlier in the same forward. A per-head hook ([batch, pos, n_heads, d_head],
    e.g. attn.hook_z) is read with its heads flattened and written back in its own shape.
    """
    seen: dict[str, torch.Tensor] = {}

    def read_input(act, hook):
        seen["x"] = act
        return None

    def replace(act, hook):
        if mode == "zero":
            return torch.zeros_like(act)
        x = token_vectors(seen.pop("x") if sae.hook_in != sae.hook_out else act, sae.d_in)
        sae.check_input(x, f"activation of {sae.hook_in!r} while splicing the SAE")
        out = sae(x.to(device=sae.device, dtype=torch.float32)).to(device=act.device, dtype=act.dtype)
        return out.reshape(act.shape)  # a per-head hook gets its heads back

    if sae.hook_in != sae.hook_out:
        return [(sae.hook_in, read_input), (sae.hook_out, replace)]
    return [(sae.hook_out, replace)]


@torch.no_grad()
def splice_metrics(
    model,
    sae: SAE,
    tokens: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
    attention_mask: torch.Tensor | None = None,
) -> dict:
    """CE loss clean / spliced / zero-ablated, CE loss recovered and KL(clean || spliced) per predicted token.

    Args:
        tokens: token ids [batch, pos]; ``attention_mask`` [batch, pos] (1 = real token, default all real): only
            next-token predictions from a real token to a real token count.
    A hook activation whose width is not the SAE's d_in (or that holds NaN/inf) raises SAEInputError."""
    mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
    sums = {"ce_clean": 0.0, "ce_spliced": 0.0, "ce_zero": 0.0, "kl": 0.0}
    gap_squares = 0.0  # Σ (zero-ablated − clean loss)² per token, for the standard error of the ablation gap
    count = 0
    for start in tqdm(range(0, tokens.shape[0], batch_size), disable=not progress, desc="splice metrics"):
        batch = {
            "input_ids": tokens[start : start + batch_size].to(model.device),
            "attention_mask": mask[start : start + batch_size].to(model.device),
        }
        valid = (batch["attention_mask"][:, 1:] * batch["attention_mask"][:, :-1]).bool().reshape(-1)
        targets = batch["input_ids"][:, 1:].reshape(-1)[valid]
        clean, spliced, zero = (
            _next_token_log_probs(model, batch, valid, hooks)
            for hooks in ([], splice_hooks(sae), splice_hooks(sae, "zero"))
        )
        clean_loss = F.nll_loss(clean, targets, reduction="none").double()
        zero_loss = F.nll_loss(zero, targets, reduction="none").double()
        sums["ce_clean"] += float(clean_loss.sum())
        sums["ce_spliced"] += float(F.nll_loss(spliced, targets, reduction="sum"))
        sums["ce_zero"] += float(zero_loss.sum())
        gap_squares += float((zero_loss - clean_loss).pow(2).sum())
        sums["kl"] += float((clean.exp() * (clean - spliced)).sum())
        count += targets.numel()
    if count == 0:
        raise SAEInputError("no next-token prediction to score: every row has fewer than 2 real tokens")
    out = {key: value / count for key, value in sums.items()}
    gap = out["ce_zero"] - out["ce_clean"]
    out["ce_recovered"] = (out["ce_zero"] - out["ce_spliced"]) / gap if abs(gap) > 1e-12 else float("nan")
    variance = max(gap_squares / count - gap**2, 0.0) * count / max(count - 1, 1)
    out["ce_gap_se"] = math.sqrt(variance / count)
    return out


CE_MIN_GAP = 0.1  # nats
CE_GAP_STANDARD_ERRORS = 3.0


def ce_recovered_note(metrics: Mapping[str, float], hook: str) -> str:
    """Why CE recovered (``(ce_zero − ce_spliced) / (ce_zero − ce_clean)``) is not meaningful for ``metrics`` (a
    :func:`splice_metrics` result), or "" when it is.

    The ratio divides by the zero-ablation gap, so it is noise when the gap is: when it is within
    ``CE_GAP_STANDARD_ERRORS`` standard errors of the per-token gap (tokens of one sequence are correlated, so the
    per-token standard error is optimistic), or below ``CE_MIN_GAP`` nats — a site whose removal costs less than a
    tenth of a nat carries little the loss sees, and a spliced loss off by a hundredth of a nat then moves the
    ratio by a tenth or more (the 1.007 "recovered" of an MLP whose ablation costs 0.02-0.07 nats).
    """
    gap = metrics["ce_zero"] - metrics["ce_clean"]
    se = metrics.get("ce_gap_se", float("nan"))
    if not math.isfinite(gap):
        return ""
    bound = max(CE_MIN_GAP, CE_GAP_STANDARD_ERRORS * se if math.isfinite(se) else 0.0)
    if gap >= bound:
        return ""
    why = (
        f"{CE_GAP_STANDARD_ERRORS:g} standard errors ({se:.3f} nats each)"
        if bound > CE_MIN_GAP
        else f"{CE_MIN_GAP:g} nats"
    )
    return (
        f"CE recovered not meaningful: zero-ablating {hook} moves the loss by only {gap:.3f} nats, less than "
        f"{why}, so the ratio divides by noise; judge the SAE by CE spliced − clean "
        f"({metrics['ce_spliced'] - metrics['ce_clean']:+.3f} nats) and KL instead"
    )


def _next_token_log_probs(model, batch: dict, valid: torch.Tensor, hooks: list) -> torch.Tensor:
    """Log-probabilities [n_valid, d_vocab] of the predictions at the ``valid`` ([batch * (pos - 1)]) positions."""
    logits = model.run_with_hooks(batch, fwd_hooks=hooks) if hooks else model(batch)
    return logits[:, :-1].float().log_softmax(-1).flatten(0, 1)[valid]


CE_COLUMNS = ("ce_clean", "ce_spliced", "ce_zero", "kl", "ce_recovered", "ce_gap_se")


def evaluate_sae(
    model,
    sae: SAE,
    tokens: torch.Tensor,
    sae_id: str,
    batch_size: int = 8,
    dataset: str = "",
    progress: bool = True,
    attention_mask: torch.Tensor | None = None,
    ce_note: str = "",
) -> pd.DataFrame:
    """One ``sae_evals`` row for ``sae`` on ``model`` over tokens [batch, pos] (``attention_mask`` [batch, pos],
    default all real): reconstruction metrics over every real token, and the splice metrics unless ``ce_note``
    says why they do not apply (a model without next-token logits): then the CE columns are NaN."""
    hooks = [sae.hook_in] if sae.hook_in == sae.hook_out else [sae.hook_in, sae.hook_out]
    mask = torch.ones_like(tokens) if attention_mask is None else attention_mask

    def pairs():
        for start in range(0, tokens.shape[0], batch_size):
            batch = {
                "input_ids": tokens[start : start + batch_size].to(model.device),
                "attention_mask": mask[start : start + batch_size].to(model.device),
            }
            _, cache = model.run_with_cache(batch, hooks)
            real = batch["attention_mask"].bool()
            x = cache[sae.hook_in][real]
            yield x if len(hooks) == 1 else (x, cache[sae.hook_out][real])

    recon = reconstruction_metrics(sae, pairs(), progress=progress)
    density = recon.pop("density")
    splice = (
        dict.fromkeys(CE_COLUMNS, float("nan"))
        if ce_note
        else splice_metrics(model, sae, tokens, batch_size, progress=progress, attention_mask=mask)
    )
    row = {
        "model": model.cfg.name,
        "checkpoint": model.cfg.checkpoint,
        "hook": sae.hook_in,
        "dataset": dataset,
        "sae_id": sae_id,
        "hook_out": sae.hook_out,
        "architecture": sae.cfg.architecture,
        "transcoder": sae.cfg.is_transcoder,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": sae.cfg.k,
        **recon,
        **splice,
        "ce_note": ce_note,
        "ce_recovered_note": "" if ce_note else ce_recovered_note(splice, sae.hook_out),
        "density_histogram": density_histogram(density),
    }
    return pd.DataFrame([row])


def sae_dir(workspace, sae_id: str):
    """Where SAE `sae_id` is saved inside the workspace."""
    return workspace.root / "saes" / safe_name(sae_id)
