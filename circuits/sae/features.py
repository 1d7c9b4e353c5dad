"""Feature-page data: per latent, top activating contexts, quantile samples, activation histogram and the
tokens its decoder direction promotes / suppresses through the unembedding: rows of table ``sae_features``
(declared in ``circuits.sae.analysis.ANALYSIS``), read from the activation store of the SAE's own dataset."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from workbench.circuits.sae.base import SAE, SAEInputError

HIST_EDGES = torch.logspace(-3, 3, 31)
# Fine log-spaced bins (ratio 10**(8/256) ≈ 1.075) from which the quantile-band edges are read: a band edge is
# the upper edge of the bin where the cumulative count of non-zero activations reaches j / n_quantiles.
FINE_EDGES = torch.logspace(-4, 4, 257)


@torch.no_grad()
def feature_pages(
    sae: SAE,
    store,
    sae_id: str,
    *,
    model=None,
    tokenizer=None,
    top_k: int = 8,
    n_quantiles: int = 4,
    samples_per_quantile: int = 2,
    window: int = 6,
    n_tokens: int = 8,
    batch_size: int = 2048,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per latent from streaming passes over an ActivationStore holding `sae.hook_in`.

    Pass 1 encodes every batch and keeps, per latent, the `top_k` largest activations and their rows (a bounded
    [top_k, d_sae] tensor top-k merged batch by batch), density, maximum, a coarse histogram (HIST_EDGES) and a
    fine one (FINE_EDGES) giving the quantile bands: band j holds the non-zero activations a with
    edge[j] < a <= edge[j + 1], edge[0] = 0, edge[n_quantiles] = inf, the inner edges at the (j / n_quantiles)
    quantiles rounded up to a fine bin edge. Pass 2 re-encodes and draws `samples_per_quantile` rows uniformly
    at random from each (latent, band) (a bounded reservoir: the smallest random keys are kept). Pass 3 reads
    only the rows of the chosen contexts' token windows (window tokens before, 2 after, same sequence) and
    encodes just those rows. No pass holds more than one batch of activations.

    Columns: density, max_activation, top_contexts (JSON list of {activation, focus, tokens, acts}),
    quantile_activations (the inner band edges), quantile_samples (JSON list per band of {low, high, count,
    contexts}), histogram, head_shares (an ``attn.hook_z`` SAE with `model`: :func:`head_shares`, JSON list),
    n_prompts (sequences in the store) and n_tokens_in_prompt (tokens of its longest
    sequence; padding is never stored), and promoted/suppressed tokens from each latent's residual write
    (:func:`residual_writes`) @ W_U when `model` (HookedModel) is given and has an output embedding W_U
    [d_vocab, d_model] (an encoder such as MiniLM has none). `store` is an ActivationStore or a StoreUnion of
    several (a distributed run's per-rank stores).
    """
    device = sae.device
    n_rows, d_sae = store.n_rows, sae.d_sae
    coarse, fine = HIST_EDGES.to(device), FINE_EDGES.to(device)
    top_vals = torch.zeros((top_k, d_sae), device=device)
    top_rows = torch.full((top_k, d_sae), -1, dtype=torch.long, device=device)
    hist = torch.zeros(d_sae * (len(coarse) - 1), dtype=torch.long, device=device)
    fine_hist = torch.zeros(d_sae * (len(fine) - 1), dtype=torch.long, device=device)
    fires = torch.zeros(d_sae, dtype=torch.long, device=device)
    max_act = torch.zeros(d_sae, device=device)

    def encoded(desc: str):
        offset = 0
        bar = tqdm(total=n_rows, disable=not progress, desc=f"feature pages {sae_id}: {desc}")
        for batch in store.iter_batches(sae.hook_in, batch_size, shuffle=False):
            x = batch[sae.hook_in].to(device=device, dtype=torch.float32).reshape(-1, sae.d_in)
            sae.check_input(x, f"store rows {offset}..{offset + len(x) - 1}")
            yield offset, sae.encode(x)
            offset += len(x)
            bar.update(len(x))
        bar.close()

    for offset, f in encoded("pass 1/3 (top activations, histograms)"):
        rows = torch.arange(offset, offset + f.shape[0], device=device)
        values, order = torch.cat([top_vals, f]).topk(top_k, dim=0)
        top_vals = values
        top_rows = torch.cat([top_rows, rows[:, None].expand_as(f)]).gather(0, order)
        active = f > 0
        fires += active.sum(0)
        max_act = torch.maximum(max_act, f.max(0).values)
        row_index, latent = active.nonzero(as_tuple=True)
        acts = f[row_index, latent]
        hist.index_add_(0, latent * (len(coarse) - 1) + _bins(acts, coarse), torch.ones_like(latent))
        fine_hist.index_add_(0, latent * (len(fine) - 1) + _bins(acts, fine), torch.ones_like(latent))

    band_edges = _band_edges(fine_hist.view(d_sae, -1), fine, n_quantiles)  # [d_sae, n_quantiles + 1]
    generator = torch.Generator(device=device).manual_seed(seed)
    kept = torch.empty(0, dtype=torch.long, device=device)  # group ids (latent * n_quantiles + band)
    kept_key = torch.empty(0, device=device)
    kept_row = torch.empty(0, dtype=torch.long, device=device)
    kept_act = torch.empty(0, device=device)
    for offset, f in encoded("pass 2/3 (quantile samples)"):
        row_index, latent = (f > 0).nonzero(as_tuple=True)
        acts = f[row_index, latent]
        band = (acts[:, None] > band_edges[latent]).sum(1) - 1  # edge[band] < a <= edge[band + 1]
        keys = torch.rand(len(acts), generator=generator, device=device)
        groups = torch.cat([kept, latent * n_quantiles + band])
        select = keep_best_per_group(groups, -torch.cat([kept_key, keys]), samples_per_quantile)
        kept, kept_key = groups[select], torch.cat([kept_key, keys])[select]
        kept_row = torch.cat([kept_row, row_index + offset])[select]
        kept_act = torch.cat([kept_act, acts])[select]

    # Contexts: (row, latent) pairs, then their token windows read and encoded in pass 3.
    top_rows, top_vals = top_rows.T.cpu(), top_vals.T.cpu()  # [d_sae, top_k]
    kept, kept_row, kept_act = kept.cpu(), kept_row.cpu(), kept_act.cpu()
    locations = store.locations()
    token_ids = store.token_ids()
    n_prompts = int(locations[:, 0].unique().numel()) if n_rows else 0
    n_tokens_in_prompt = int(locations[:, 1].max()) + 1 if n_rows else 0
    windows = _windows(locations, window)
    wanted: dict[int, set[int]] = {}
    focus_rows = [
        (int(r), latent)
        for latent in range(d_sae)
        for r, v in zip(top_rows[latent], top_vals[latent], strict=True)
        if v > 0
    ] + [(int(r), int(g) // n_quantiles) for g, r in zip(kept, kept_row, strict=True)]
    for row, latent in focus_rows:
        for neighbour in windows(row):
            wanted.setdefault(neighbour, set()).add(latent)
    window_acts = _window_activations(sae, store, wanted, batch_size, device, progress, sae_id)
    decode = token_decoder(tokenizer or (model.tokenizer if model is not None else None))

    def context(row: int, latent: int, activation: float) -> dict:
        rows = windows(row)
        return {
            "activation": round(activation, 4),
            "focus": rows.index(row),
            "row": row,
            "tokens": [decode(int(token_ids[r])) for r in rows],
            "acts": [round(window_acts[(r, latent)], 4) for r in rows],
        }

    shares = head_shares(sae, model.cfg.n_heads) if model is not None else None
    promoted = suppressed = None
    head = model.unembedding_matrix() if model is not None else None
    writes = residual_writes(sae, model) if head is not None else None
    if head is not None and writes is not None and writes.shape[1] == head.shape[1]:
        logits = logit_effects(writes, head)  # [d_sae, d_vocab]
        promoted, suppressed = logits.topk(n_tokens, dim=1), (-logits).topk(n_tokens, dim=1)
    samples: dict[int, list[tuple[int, float]]] = {}
    for group, row, act in zip(kept.tolist(), kept_row.tolist(), kept_act.tolist(), strict=True):
        samples.setdefault(group, []).append((row, act))
    band_edges, hist, fires, max_act = (
        band_edges.cpu(),
        hist.view(d_sae, -1).cpu(),
        fires.cpu(),
        max_act.cpu(),
    )
    band_counts = _band_counts(fine_hist.view(d_sae, -1).cpu(), FINE_EDGES, band_edges)

    records = []
    for latent in tqdm(range(d_sae), disable=not progress, desc=f"feature pages {sae_id}: rows"):
        contexts = [
            context(int(r), latent, float(v))
            for v, r in zip(top_vals[latent], top_rows[latent], strict=True)
            if v > 0
        ]
        edges = band_edges[latent].tolist()
        quantile_samples = []
        if fires[latent] > 0:
            for band in range(n_quantiles):
                chosen = sorted(samples.get(latent * n_quantiles + band, []), key=lambda item: -item[1])
                quantile_samples.append(
                    {
                        "low": edges[band],
                        "high": edges[band + 1] if math.isfinite(edges[band + 1]) else None,
                        "count": int(band_counts[latent, band]),
                        "contexts": [context(r, latent, a) for r, a in chosen],
                    }
                )
        record = {
            "sae_id": sae_id,
            "latent": latent,
            "model": sae.cfg.model,
            "checkpoint": sae.cfg.checkpoint,
            "hook": sae.hook_in,
            "dataset": sae.cfg.dataset,
            "density": float(fires[latent]) / max(n_rows, 1),
            "max_activation": float(max_act[latent]),
            "top_contexts": json.dumps(contexts),
            "quantile_activations": json.dumps(
                [round(e, 4) for e in edges[1:-1]] if fires[latent] > 0 else []
            ),
            "quantile_samples": json.dumps(quantile_samples),
            "histogram": json.dumps({"edges": HIST_EDGES.tolist(), "counts": hist[latent].tolist()}),
            "n_prompts": n_prompts,
            "n_tokens_in_prompt": n_tokens_in_prompt,
        }
        if shares is not None:
            record["head_shares"] = json.dumps([round(float(v), 4) for v in shares[latent]])
        if promoted is not None and suppressed is not None:
            record["promoted_tokens"] = json.dumps(
                [
                    [decode(int(t)), round(float(v), 4)]
                    for v, t in zip(promoted.values[latent], promoted.indices[latent], strict=True)
                ]
            )
            record["suppressed_tokens"] = json.dumps(
                [
                    [decode(int(t)), round(-float(v), 4)]
                    for v, t in zip(suppressed.values[latent], suppressed.indices[latent], strict=True)
                ]
            )
        records.append(record)
    return pd.DataFrame(records)


def keep_best_per_group(groups: torch.Tensor, scores: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of the (up to) m highest-scoring entries of each group: groups, scores [n] -> LongTensor[kept]."""
    if groups.numel() == 0:
        return groups.new_empty(0)
    by_score = scores.argsort(descending=True)
    order = by_score[groups[by_score].argsort(stable=True)]  # grouped, best first within a group
    sorted_groups = groups[order]
    first = torch.searchsorted(sorted_groups, sorted_groups, right=False)
    rank = torch.arange(len(order), device=groups.device) - first
    return order[rank < m]


def _bins(values: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Bin index of each value in log-spaced `edges` (below the first -> 0, above the last -> last bin)."""
    return (torch.bucketize(values, edges, right=False) - 1).clamp(0, len(edges) - 2)


def _band_edges(fine_hist: torch.Tensor, edges: torch.Tensor, n_bands: int) -> torch.Tensor:
    """[d_sae, n_bins] counts -> [d_sae, n_bands + 1] band edges: 0, the j/n_bands quantiles (upper edge of the
    bin where the cumulative count reaches j/n_bands of the total, j = 1..n_bands-1), inf."""
    cumulative = fine_hist.cumsum(1).float()
    total = cumulative[:, -1:].clamp_min(1)
    targets = (
        total * torch.arange(1, n_bands, device=fine_hist.device).float() / n_bands
    )  # [d_sae, n_bands-1]
    bin_index = torch.searchsorted(cumulative.contiguous(), targets.contiguous()).clamp(max=len(edges) - 2)
    inner = edges[1:][bin_index]
    inner = torch.where(inner >= edges[-1], torch.inf, inner)  # the top bin also holds everything above it
    zero = torch.zeros(len(fine_hist), 1, device=fine_hist.device)
    return torch.cat([zero, inner, torch.full_like(zero, torch.inf)], dim=1)


def _band_counts(fine_hist: torch.Tensor, edges: torch.Tensor, band_edges: torch.Tensor) -> torch.Tensor:
    """Non-zero activations per band, [d_sae, n_bands], read off the fine histogram (band edges are bin edges)."""
    upper = edges[1:].clone()
    upper[-1] = torch.inf  # the last bin also holds everything above the last edge
    band_of_bin = (upper[None, :, None] > band_edges[:, None, 1:]).sum(-1)  # [d_sae, n_bins]
    n_bands = band_edges.shape[1] - 1
    return torch.zeros(len(fine_hist), n_bands, dtype=torch.long).scatter_add_(
        1, band_of_bin.clamp(max=n_bands - 1), fine_hist
    )


def _windows(locations: torch.Tensor, window: int):
    """row -> the rows of its token window (`window` positions before, 2 after, same sequence), in position
    order; works for any row order of the store (rows are sorted by (sequence, position) once)."""
    seq, pos = locations[:, 0].long(), locations[:, 1].long()
    order = torch.from_numpy(np.lexsort((pos.numpy(), seq.numpy())))  # by sequence, then position
    where = torch.empty_like(order)
    where[order] = torch.arange(len(order))
    seq_sorted, pos_sorted = seq[order].tolist(), pos[order].tolist()
    order_list = order.tolist()

    def rows(row: int) -> list[int]:
        at = int(where[row])
        s, p = seq_sorted[at], pos_sorted[at]
        lo = at
        while lo > 0 and seq_sorted[lo - 1] == s and pos_sorted[lo - 1] >= p - window:
            lo -= 1
        hi = at
        while hi + 1 < len(order_list) and seq_sorted[hi + 1] == s and pos_sorted[hi + 1] <= p + 2:
            hi += 1
        return order_list[lo : hi + 1]

    return rows


def _window_activations(sae, store, wanted: dict[int, set[int]], batch_size, device, progress, sae_id):
    """{(row, latent): activation} for the wanted rows and latents, encoding only those rows (pass 3)."""
    out: dict[tuple[int, int], float] = {}
    needed = torch.tensor(sorted(wanted), dtype=torch.long)
    offset = 0
    bar = tqdm(total=store.n_rows, disable=not progress, desc=f"feature pages {sae_id}: pass 3/3 (contexts)")
    for batch in store.iter_batches(sae.hook_in, batch_size, shuffle=False):
        n = len(batch[sae.hook_in])
        lo, hi = torch.searchsorted(needed, torch.tensor([offset, offset + n])).tolist()
        if hi > lo:
            rows = needed[lo:hi]
            x = batch[sae.hook_in][rows - offset].to(device=device, dtype=torch.float32).reshape(-1, sae.d_in)
            f = sae.encode(x).cpu()
            for i, row in enumerate(rows.tolist()):
                latents = sorted(wanted[row])
                for latent, value in zip(latents, f[i, latents].tolist(), strict=True):
                    out[(row, latent)] = value
        offset += n
        bar.update(n)
    bar.close()
    return out


def token_decoder(tokenizer):
    if tokenizer is None:
        return str
    return lambda token: tokenizer.decode([token])


def head_shares(sae: SAE, n_heads: int) -> torch.Tensor | None:
    """Each latent's decoder norm² split over the heads of an ``attn.hook_z`` SAE, [d_sae, n_heads] summing to 1
    per latent (Kissane et al. 2024's weight-based head attribution: which heads a latent's direction lives in);
    None for any other hook."""
    if not sae.hook_out.endswith("attn.hook_z") or sae.d_out % n_heads:
        return None
    per_head = sae.W_dec.detach().float().view(sae.d_sae, n_heads, sae.d_out // n_heads).pow(2).sum(-1)
    return (per_head / per_head.sum(-1, keepdim=True).clamp_min(1e-30)).cpu()


def residual_writes(sae: SAE, model) -> torch.Tensor | None:
    """What each latent writes into the residual stream, [d_sae, d_model] (float32): the decoder rows W_dec
    [d_sae, d_out] themselves for a d_model-wide hook, or, for ``blocks.L.attn.hook_z`` (heads flattened), each
    row split into heads [n_heads, d_head] and summed through the heads' output projections W_O[L]. None when the
    hook's write is not known (no model, or another width)."""
    if model is None:
        return None
    w_dec = sae.W_dec.detach().float()
    layer = re.fullmatch(r"blocks\.(\d+)\.attn\.hook_z", sae.hook_out)
    if layer is None:  # n_heads·d_head often equals d_model: the hook, not the width, says what is written
        return w_dec if sae.d_out == model.cfg.d_model else None
    w_o = (
        model.head_output_weights(int(layer.group(1))).detach().float().to(w_dec.device)
    )  # [heads, d_head, d]
    if w_o.shape[0] * w_o.shape[1] != sae.d_out:
        return None
    return torch.einsum("shd,hdm->sm", w_dec.view(sae.d_sae, w_o.shape[0], w_o.shape[1]), w_o)


def logit_effects(writes: torch.Tensor, unembedding: torch.Tensor) -> torch.Tensor:
    """Direct logit effect of each latent: its residual-stream write [d_sae, d_model] (``features.residual_writes``:
    the decoder rows, or an ``attn.hook_z`` SAE's rows through W_O) @ W_Uᵀ [d_model, d_vocab] -> [d_sae, d_vocab]."""
    if writes.shape[1] != unembedding.shape[1]:
        raise SAEInputError(
            f"the SAE writes vectors of width {writes.shape[1]} but the unembedding has d_model="
            f"{unembedding.shape[1]}: logits need the SAE's own model"
        )
    return writes.detach().float().cpu() @ unembedding.detach().float().cpu().T
