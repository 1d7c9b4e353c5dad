"""Attention statistics from a materialised score matrix (the float64 reference and the eager path), and torch
SDPA with those statistics (the bare path, and the fused kernel's fallback where Triton cannot run).

For each (batch, head, query) with scores s_j over allowed keys (masked keys hold -inf) and p = softmax(s):
``lse = logsumexp(s)``, ``max_logit = max s``, ``entropy = lse − Σ p_j s_j`` (nats) and ``sink = Σ_{j<k} p_j``.
A fully masked row has lse = max_logit = −inf, entropy = 0 and sink = 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

STATISTICS = ("entropy", "sink", "lse", "max_logit")


def stats_from_scores(
    scores: torch.Tensor, sink_k: int = 1, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Statistics of scores [batch, head, query, key] (masked keys = -inf) -> dict of [batch, head, query].

    Computed in ``dtype`` (default: float32, or float64 for float64 input) and returned in the scores' dtype.
    """
    if sink_k < 0:
        raise ValueError(f"sink_k must be >= 0, got {sink_k}")
    work = dtype or (torch.float64 if scores.dtype == torch.float64 else torch.float32)
    s = scores.to(work)
    lse = torch.logsumexp(s, dim=-1)
    max_logit = s.amax(dim=-1)
    empty = torch.isneginf(max_logit)
    p = torch.exp(s - torch.where(empty, 0.0, lse).unsqueeze(-1))
    p = torch.where(torch.isneginf(s), 0.0, p)
    expected = (p * torch.where(torch.isneginf(s), 0.0, s)).sum(-1)
    entropy = torch.where(empty, 0.0, lse - expected).clamp_min(0.0)
    sink = p[..., :sink_k].sum(-1)
    out = {"entropy": entropy, "sink": sink, "lse": lse, "max_logit": max_logit}
    return {k: v.to(scores.dtype) for k, v in out.items()}


def masked_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Scores q·kᵀ·scale [batch, heads, q_len, k_len] with disallowed keys set to -inf.

    q [batch, heads, q_len, d]; k [batch, kv_heads, k_len, d] (GQA: repeated to heads). Causal queries are
    aligned to the end of the keys: query i sees keys j <= i + k_len - q_len.
    """
    work = dtype or q.dtype
    groups = q.shape[1] // k.shape[1]
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads is not a multiple of {k.shape[1]} key/value heads")
    k = k.repeat_interleave(groups, dim=1) if groups > 1 else k
    scores = (q.to(work) @ k.to(work).transpose(-1, -2)) * scale
    allowed = allowed_keys(
        scores.shape[0],
        *scores.shape[-2:],
        causal=causal,
        key_padding_mask=key_padding_mask,
        device=scores.device,
    )
    return scores.masked_fill(~allowed, float("-inf"))


def allowed_keys(
    batch: int,
    q_len: int,
    k_len: int,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Which key each query may attend, [batch, 1, q_len, k_len] bool: causal queries aligned to the end of the keys
    (query i sees keys j <= i + k_len - q_len), and only real keys where ``key_padding_mask`` [batch, k_len] says so."""
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed.tril(diagonal=k_len - q_len)
    allowed = allowed.expand(batch, 1, q_len, k_len)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.bool()[:, None, None, :].to(device)
    return allowed


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    sink_k: int = 1,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Materialised attention in ``dtype``: (out [b, h, q, d], pattern [b, h, q, k], statistics [b, h, q])."""
    scores = masked_scores(q, k, scale=scale, causal=causal, key_padding_mask=key_padding_mask, dtype=dtype)
    stats = stats_from_scores(scores, sink_k=sink_k, dtype=dtype)
    pattern = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    groups = q.shape[1] // v.shape[1]
    v = v.repeat_interleave(groups, dim=1) if groups > 1 else v
    out = pattern @ v.to(dtype)
    return out, pattern, stats


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """torch SDPA of q [b, h, q, d] over k, v [b, kv_h, k, d] (GQA repeated) -> out [b, h, q, d]; causal queries are
    aligned to the end of the keys, and a query with no allowed key gets zeros (SDPA alone would give NaN)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    q_len, k_len = q.shape[2], k.shape[2]
    if key_padding_mask is None and (not causal or q_len == k_len):
        return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=causal and q_len > 1)
    allowed = allowed_keys(
        q.shape[0], q_len, k_len, causal=causal, key_padding_mask=key_padding_mask, device=q.device
    )
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    return out.masked_fill(~allowed.any(-1, keepdim=True), 0.0)


def sdpa_with_statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    sink_k: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(out [b, h, q, d] from torch SDPA, statistics name -> [b, h, q] in float32 from the masked scores)."""
    scores = masked_scores(
        q, k, scale=scale, causal=causal, key_padding_mask=key_padding_mask, dtype=torch.float32
    )
    stats = stats_from_scores(scores, sink_k=sink_k)
    return sdpa(q, k, v, scale=scale, causal=causal, key_padding_mask=key_padding_mask), stats
