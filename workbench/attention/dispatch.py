"""The one attention entry point the adapters call: torch SDPA, a materialised eager path, or the fused kernel.

Statistics are defined in :mod:`workbench.attention.reference`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from workbench.attention.reference import masked_scores, sdpa, stats_from_scores

PATHS = ("sdpa", "eager", "kernel")


class AttentionOutput(NamedTuple):
    """out [batch, heads, q_len, d_head]; pattern [batch, heads, q_len, k_len] or None; stats: name -> [b, h, q]."""

    out: torch.Tensor
    pattern: torch.Tensor | None
    stats: dict[str, torch.Tensor] | None


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    path: str = "sdpa",
    return_pattern: bool = False,
    return_stats: bool = False,
    sink_k: int = 1,
    edit_scores: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> AttentionOutput:
    """Attention of q [batch, heads, q_len, d] over k, v [batch, kv_heads, k_len, d] (GQA when kv_heads < heads).

    ``key_padding_mask`` [batch, k_len] is True for real keys. ``path``: "sdpa" (torch SDPA), "eager"
    (materialised softmax; the only path that returns the pattern), "kernel" (the fused Triton kernel).
    ``edit_scores`` (eager path): called on the masked scores [batch, heads, q_len, k_len] (float32, disallowed
    keys -inf) before the softmax; what it returns is used (``hook_attn_scores``).
    """
    if path not in PATHS:
        raise ValueError(f"attention path {path!r} is not one of {PATHS}")
    if (return_pattern or edit_scores is not None) and path == "kernel":
        raise ValueError(
            "hook_pattern needs the materialised pattern, which the fused kernel never builds; use the eager path "
            "(model.set_attention_path('eager') or uninstall_attention(model)) or capture the statistics hooks"
        )
    if path == "kernel":
        # Triton loads only when the kernel path is asked for (start-up time of every other path)
        from workbench.attention.kernel import flash_attention

        out, stats = flash_attention(
            q,
            k,
            v,
            scale=scale,
            causal=causal,
            key_padding_mask=key_padding_mask,
            return_stats=return_stats,
            sink_k=sink_k,
        )
        return AttentionOutput(out, None, stats)
    if path == "eager" or return_stats:
        scores = masked_scores(
            q, k, scale=scale, causal=causal, key_padding_mask=key_padding_mask, dtype=torch.float32
        )
        if edit_scores is not None and path == "eager":
            scores = edit_scores(scores).float()
        stats = stats_from_scores(scores, sink_k=sink_k) if return_stats else None
        if stats is not None:
            stats = {name: value.to(q.dtype) for name, value in stats.items()}
        if path == "eager":
            pattern = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(q.dtype)
            groups = q.shape[1] // v.shape[1]
            out = pattern @ (v.repeat_interleave(groups, dim=1) if groups > 1 else v)
            return AttentionOutput(out, pattern if return_pattern else None, stats)
    else:
        stats = None
    return AttentionOutput(
        sdpa(q, k, v, scale=scale, causal=causal, key_padding_mask=key_padding_mask), None, stats
    )
