"""k-means initialisation of codebooks: Lloyd's k-means with k-means++ seeding, and ``init_kmeans`` that sets every
code from the LayerNorm-ed activations at its site."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from workbench.circuits.codebook.module import CodebookError, CodebookSet


def kmeans(x: torch.Tensor, n_clusters: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding: points [n, d] -> centres [n_clusters, d] (on x's device; the
    seeding draws come from a CPU generator, so the result does not depend on the device's RNG). With fewer
    distinct points than clusters the surplus centres are duplicates (dead codes, replaced during training)."""
    if x.shape[0] < n_clusters:
        raise CodebookError(
            f"k-means needs at least {n_clusters} rows, got {x.shape[0]}; capture more tokens"
        )
    gen = torch.Generator().manual_seed(seed)
    x = x.double()
    first = torch.randint(x.shape[0], (1,), generator=gen).to(x.device)
    centres = x[first]
    dist = torch.cdist(x, centres).squeeze(1) ** 2
    for _ in range(1, n_clusters):
        weights = (
            dist.cpu() if dist.sum() > 0 else torch.ones(x.shape[0], dtype=x.dtype)
        )  # fewer distinct rows
        pick = torch.multinomial(weights / weights.sum(), 1, generator=gen).to(x.device)
        centres = torch.cat([centres, x[pick]])
        dist = torch.minimum(dist, ((x - x[pick]) ** 2).sum(-1))
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=n_clusters)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
    return centres.float()


def init_kmeans(codebooks: CodebookSet, model: Any, tokens: torch.Tensor, seed: int = 0) -> None:
    """Initialise every codebook from k-means on the LayerNorm-ed activations of ``tokens`` [batch, pos]."""
    with torch.no_grad(), model.capture(codebooks.sites, device=None) as cache:
        model(tokens.to(model.device))
    with torch.no_grad():
        for site in codebooks.sites:
            book = codebooks[site]
            flat = book._grouped(cache[site].to(book.codes.device))
            u = F.layer_norm(flat, (flat.shape[-1],))
            for g in range(book.config.n_groups):
                book.codes[g] = kmeans(u[:, g], book.config.n_codes, seed=seed + g).to(book.codes)
