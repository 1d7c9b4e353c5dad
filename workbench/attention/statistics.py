"""Per-layer × head attention statistics of a model on a corpus: the means of the statistic hooks the attention
paths record (eager and the fused kernel alike). The attention analysis (``workbench.analyses.attention``) writes
them as a table; the prompt lab reads them for one input.

The statistics hooks (``blocks.{l}.attn.hook_entropy|sink|lse|max_logit``, [batch, head, query]) are averaged
over the real (non-padding) query positions of a text corpus; position 0 is left out of the sink average, since
its only key is itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from workbench.datasets import Dataset, iter_model_batches
from workbench.deprecation import renamed_keywords

if TYPE_CHECKING:
    from workbench.model import HookedModel

STAT_HOOKS = ("entropy", "sink", "lse", "max_logit")


@renamed_keywords(max_length="context_length")
def attention_statistics(
    model: HookedModel,
    texts: Dataset | Sequence[str] | torch.Tensor,
    *,
    batch_size: int = 16,
    context_length: int = 128,
    sink_k: int = 1,
) -> pd.DataFrame:
    """Mean statistics per (layer, head) over ``texts`` (a Dataset, strings, token-id lists or ids [batch, pos]).

    Returns columns: model, checkpoint, layer, head, entropy, sink, lse, max_logit, n_queries.
    """
    names = [f"blocks.*.attn.hook_{s}" for s in STAT_HOOKS]
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    sums = {s: torch.zeros(n_layers, n_heads, dtype=torch.float64) for s in STAT_HOOKS}
    counts = torch.zeros(n_layers, dtype=torch.float64)
    previous_sink = model.sink_k
    model.sink_k = sink_k
    try:
        for _, batch in iter_model_batches(
            texts, model.tokenizer, batch_size=batch_size, context_length=context_length
        ):
            real = batch["attention_mask"].bool().clone()
            real[:, 0] = False
            with torch.no_grad(), model.capture(names, dtype=torch.float64) as cache:
                model(batch)
            weight = real[:, None, :].to(torch.float64)
            for layer in range(n_layers):
                for stat in STAT_HOOKS:
                    value = cache[f"blocks.{layer}.attn.hook_{stat}"]
                    sums[stat][layer] += (value.nan_to_num(0.0, neginf=0.0) * weight).sum(dim=(0, 2))
                counts[layer] += real.sum()
    finally:
        model.sink_k = previous_sink
    rows = []
    for layer in range(n_layers):
        for head in range(n_heads):
            row: dict[str, Any] = {
                "model": model.cfg.name,
                "checkpoint": model.cfg.checkpoint,
                "layer": layer,
                "head": head,
            }
            row.update({s: float(sums[s][layer, head] / counts[layer].clamp_min(1)) for s in STAT_HOOKS})
            row["n_queries"] = int(counts[layer])
            rows.append(row)
    return pd.DataFrame(rows)
