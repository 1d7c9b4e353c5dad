"""The attention function registered with transformers as ``"workbench"``.

With nothing hooked on the bare path it defers to transformers' own SDPA function, so logits are bit-identical
to the unwrapped model. When ``hook_attn_scores``, ``hook_pattern`` or a statistic is hooked, or the model's ``attention_path`` is
"eager" or "kernel", it computes attention with :func:`workbench.attention.attend` and fires the hook points.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from workbench.adapters.base import ATTENTION_OWNERS
from workbench.attention.dispatch import attend

IMPLEMENTATION = "workbench"
STAT_NAMES = ("entropy", "sink", "lse", "max_logit")


def register() -> None:
    """Register the ``"workbench"`` attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(IMPLEMENTATION, workbench_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)


def _key_padding(attention_mask: torch.Tensor | None, k_len: int) -> torch.Tensor | None:
    """[batch, 1, q, k] boolean mask -> [batch, k] keys that some query may attend (its last row)."""
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return attention_mask[:, 0, -1, -k_len:]


def workbench_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers attention interface: q [batch, heads, q, d], k/v [batch, kv_heads, k, d]
    -> (output [batch, q, heads, d], pattern or None)."""
    entry = ATTENTION_OWNERS.get(module)
    owner = entry[0]() if entry is not None else None
    if entry is None or owner is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    site = entry[1]
    points = owner.hook_points
    pattern_point = points[site.names["pattern"]]
    scores_point = points[site.names["attn_scores"]]
    stat_points = {s: points[site.names[s]] for s in STAT_NAMES}
    want_pattern, want_scores = pattern_point.active, scores_point.active
    want_stats = any(p.active for p in stat_points.values())
    path = owner.attention_path
    if path == "sdpa" and not (want_pattern or want_scores or want_stats):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if (want_pattern or want_scores) and path == "kernel":
        name = site.names["pattern" if want_pattern else "attn_scores"]
        raise ValueError(
            f"{name} needs the materialised pattern and its scores, which the fused kernel never builds; set "
            "model.set_attention_path('eager') (or workbench.attention.uninstall_attention(model)) to capture it, or "
            "capture the statistics hooks (hook_entropy, hook_sink, hook_lse, hook_max_logit) on the kernel path"
        )

    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    causal = bool(getattr(module, "is_causal", False))

    def edit_scores(scores: torch.Tensor) -> torch.Tensor:
        return scores_point(scores.to(query.dtype))

    result = attend(
        query,
        key,
        value,
        scale=scale,
        causal=causal,
        key_padding_mask=_key_padding(attention_mask, key.shape[2]),
        path="eager" if want_pattern or want_scores else path,
        return_pattern=want_pattern,
        return_stats=want_stats,
        sink_k=owner.sink_k,
        edit_scores=edit_scores if want_scores else None,
    )
    out = result.out
    if want_pattern:
        pattern = pattern_point(result.pattern)
        if pattern is not result.pattern:
            groups = query.shape[1] // value.shape[1]
            out = pattern.to(value.dtype) @ value.repeat_interleave(groups, dim=1)
    if want_stats:
        assert result.stats is not None  # attend(return_stats=True) always returns them
        for name, point in stat_points.items():
            if point.active:
                point(result.stats[name])
    return out.transpose(1, 2).contiguous(), None
