"""Attention statistics over a corpus, per layer × head (× checkpoint): the ``attention_stats`` table.

The statistics themselves (``workbench.attention.statistics.attention_statistics``) are the means of the attention
paths' statistic hooks; this analysis runs them over a model or a checkpoint series (:func:`run`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from workbench.analysis import Analysis, Table, settings_with
from workbench.attention.install import install_attention
from workbench.attention.statistics import attention_statistics
from workbench.checkpoints import CheckpointSeries
from workbench.datasets import Dataset
from workbench.model import HookedModel

RESULT_KEYS = ["model", "checkpoint", "dataset", "layer", "head"]
ANALYSIS = Analysis(
    name="attention",
    command="workbench attention run MODEL --data DATA",
    tables=(
        Table(
            "attention_stats",
            keys=tuple(RESULT_KEYS),
            columns=("entropy", "sink", "lse", "max_logit", "n_queries"),
            description="mean attention statistics per layer × head (× checkpoint)",
        ),
    ),
    requires=("text",),
    description="attention entropy, sink mass, log-sum-exp and max logit per layer × head",
)


@dataclass(frozen=True)
class AttentionSettings:
    """One attention-statistics run's settings, shared by :func:`run` and ``workbench attention run`` (its options).

    kernel: the statistics from the fused Triton kernel (``install_attention``) instead of the eager path (the
    same numbers); sink_k: sink mass is the attention on the first k keys; batch_size / context_length: how the
    data is read."""

    kernel: bool = False
    sink_k: int = 1
    batch_size: int = 16
    context_length: int = 128


def run(
    model: CheckpointSeries | HookedModel | Iterable[HookedModel],
    data: Dataset | Sequence[str] | torch.Tensor,
    settings: AttentionSettings | None = None,
    *,
    dataset: str | None = None,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, pd.DataFrame]:
    """Attention statistics of a model, of every checkpoint of a series (loaded one at a time) or of each model of
    an iterable, on ``data`` → ``{"attention_stats": frame}`` (one row per model × checkpoint × layer × head) for
    ``write_tables``.

    ``data``: a Dataset, strings, token-id lists or ids [n, pos]; ``dataset``: the name the rows carry (default:
    the Dataset's name, else "texts"). ``settings``: :class:`AttentionSettings`; ``overrides`` replace its fields
    by keyword (``kernel=``, ``sink_k=``, ``batch_size=``, ``context_length=``).
    """
    chosen = settings_with(settings, AttentionSettings, overrides)
    if isinstance(model, CheckpointSeries):
        models: Iterable[HookedModel] = model.iter(progress=progress)
    elif isinstance(model, HookedModel):
        models = [model]
    else:
        models = model
    frames = []
    for each in models:
        if chosen.kernel:
            install_attention(each)
        frames.append(
            attention_statistics(
                each,
                data,
                batch_size=chosen.batch_size,
                context_length=chosen.context_length,
                sink_k=chosen.sink_k,
            )
        )
    name = dataset or (data.name if isinstance(data, Dataset) else "texts")
    frame = pd.concat(frames, ignore_index=True).assign(dataset=name, hook="blocks.*.attn.hook_*")
    return {"attention_stats": frame}
