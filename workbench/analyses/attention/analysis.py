"""Attention statistics over a corpus, per layer × head (× checkpoint): the ``attention_stats`` table.

The statistics themselves (``workbench.attention.statistics.attention_statistics``) are the means of the attention
paths' statistic hooks; this analysis runs them over a model or a checkpoint series and writes the table.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import pandas as pd
import torch

from workbench.analysis import Analysis, Table, write_tables
from workbench.attention.install import install_attention
from workbench.attention.statistics import attention_statistics

if TYPE_CHECKING:
    from pathlib import Path

    from workbench.model import HookedModel
    from workbench.workspace import Workspace

RESULT_KEYS = ["model", "checkpoint", "dataset", "layer", "head"]
ANALYSIS = Analysis(
    name="attention",
    command="workbench attention MODEL --data DATA",
    tables=(Table("attention_stats", keys=tuple(RESULT_KEYS),
                  columns=("entropy", "sink", "lse", "max_logit", "n_queries"),
                  description="mean attention statistics per layer × head (× checkpoint)"),),
    requires=("text",),
    description="attention entropy, sink mass, log-sum-exp and max logit per layer × head",
)  # fmt: skip


def write_attention_statistics(
    models: Iterable[HookedModel],
    texts: Sequence[str] | torch.Tensor,
    workspace: Workspace | str | Path | None = None,
    *,
    dataset: str = "texts",
    kernel: bool = False,
    **kwargs,
) -> pd.DataFrame:
    """:func:`attention_statistics` for each model (e.g. ``series.iter()``, loaded one at a time), written to the
    workspace's ``attention_stats`` table (a rerun replaces its own rows) and returned.

    ``kernel=True`` computes the statistics inside the fused Triton kernel (``install_attention``) instead of the
    eager path; both give the same numbers.
    """
    frames = []
    for model in models:
        if kernel:
            install_attention(model)
        frames.append(attention_statistics(model, texts, **kwargs))
    frame = pd.concat(frames, ignore_index=True).assign(dataset=dataset, hook="blocks.*.attn.hook_*")
    write_tables(workspace, ANALYSIS, {"attention_stats": frame})
    return frame
