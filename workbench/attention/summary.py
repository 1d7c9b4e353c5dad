"""Per-layer × head attention statistics of a model or a checkpoint series, for tables and the dashboard.

The statistics hooks (``blocks.{l}.attn.hook_entropy|sink|lse|max_logit``, [batch, head, query]) are averaged
over the real (non-padding) query positions of a text corpus; position 0 is left out of the sink average, since
its only key is itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from workbench.analysis import Analysis, Table, write_tables
from workbench.datasets import Dataset, iter_model_batches

if TYPE_CHECKING:
    from pathlib import Path

    import plotly.graph_objects as go

    from workbench.model import HookedModel
    from workbench.workspace import Workspace

STAT_HOOKS = ("entropy", "sink", "lse", "max_logit")


def attention_statistics(
    model: HookedModel,
    texts: Dataset | Sequence[str] | torch.Tensor,
    *,
    batch_size: int = 16,
    max_length: int = 128,
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
            texts, model.tokenizer, batch_size=batch_size, context_length=max_length
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
            from workbench.attention.install import install_attention

            install_attention(model)
        frames.append(attention_statistics(model, texts, **kwargs))
    frame = pd.concat(frames, ignore_index=True).assign(dataset=dataset, hook="blocks.*.attn.hook_*")
    write_tables(workspace, ANALYSIS, {"attention_stats": frame})
    return frame


def layer_head_heatmap(
    table: pd.DataFrame, statistic: str = "entropy", checkpoint: int | None = None
) -> go.Figure:
    """Heatmap layer × head of one statistic (the latest checkpoint unless ``checkpoint`` is given)."""
    import plotly.express as px

    if checkpoint is None and table["checkpoint"].notna().any():
        checkpoint = int(table["checkpoint"].max())
    rows = table if checkpoint is None else table[table["checkpoint"] == checkpoint]
    grid = rows.pivot_table(index="layer", columns="head", values=statistic)
    title = f"attention {statistic} per layer × head" + (
        f" (step {checkpoint})" if checkpoint is not None else ""
    )
    return px.imshow(grid, labels={"x": "head", "y": "layer", "color": statistic}, title=title, aspect="auto")


def statistic_over_checkpoints(table: pd.DataFrame, statistic: str = "sink") -> go.Figure:
    """One line per layer: the head-averaged statistic against training step (log x axis)."""
    import plotly.express as px

    per_layer = table.groupby(["checkpoint", "layer"], as_index=False)[statistic].mean()
    # step 0 has no place on a log axis: it is drawn at half the first positive step, labelled "0"
    positive = per_layer.loc[per_layer["checkpoint"] > 0, "checkpoint"]
    zero_at = float(positive.min()) / 2 if len(positive) else 1.0
    per_layer["step_axis"] = per_layer["checkpoint"].astype(float).where(per_layer["checkpoint"] > 0, zero_at)
    fig = px.line(per_layer, x="step_axis", y=statistic, color="layer", markers=True, log_x=True,
                  hover_data={"checkpoint": True, "step_axis": False},
                  title=f"mean attention {statistic} over training", labels={"step_axis": "step"})  # fmt: skip
    return fig
