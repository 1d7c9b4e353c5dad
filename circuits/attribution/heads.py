"""Head loadings: which attention heads carry each edge between positions (beyond circuit-tracer, whose frozen
attention cannot say).

In a causal model every path from a source at position k to a target at another position leaves k for the first
time through exactly one attention head h of one layer L, from key k to some query q > k (before that it stays at
k: no path returns to a position it left). The edge is therefore the sum, over (L, h), of

    loading[t, s, L, h] = Σ_{q ≠ k} pattern[L, h, q, k] · ∂t/∂z_h(L, q) · ∂v_h(L, k)/∂s|same-position paths,

and the parts sum to the edge exactly. Computed with batched backward passes, never one per edge:

1. Target side: one backward pass per row batch of the frozen replacement model gives ∂t/∂z [pos, head, d_head]
   at every layer's ``attn.hook_z``; G[L, h, k] = Σ_{q≠k} pattern[L, h, q, k] ∂t/∂z_h(L, q) [d_head] is what t
   receives through head h from the value at key k, leaving k.
2. Source side: a second frozen forward whose patterns keep only their diagonals (every path stays at its
   position) carries G back from ``attn.hook_v`` of layer L (the key/value head h // group under grouped-query
   attention) to every source; one batch element per (row, layer, head).
3. The sources' gradients become direct effects exactly as the graph's edges do (activation × decoder · gradient,
   error · gradient, embedding · gradient); only sources at another position than the row's node are kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from workbench.circuits.attribution.rows import Row, RowComputer
from workbench.circuits.attribution.transcoders import AttributionError

HEAD_COLUMNS = ("target", "source", "layer", "head", "weight")


def head_loadings(
    computer: RowComputer,
    rows: Sequence[Row],
    row_nodes: Sequence[int],
    node_of_column: torch.Tensor,
    min_weight: float = 0.0,
) -> pd.DataFrame:
    """Loadings of every cross-position edge into ``rows`` (read-outs whose node indices are ``row_nodes``) over the
    heads carrying it: a frame (target, source, layer, head, weight); ``node_of_column`` [n_columns] maps the row
    computer's columns to graph nodes (−1: not in the graph). ``computer`` must have recorded every layer's
    ``attn.hook_z``. Loadings with |weight| ≤ ``min_weight`` are left out."""
    replacement = computer.replacement
    model = replacement.model
    if not model.cfg.causal:
        raise AttributionError(
            f"{model.cfg.name} is bidirectional: paths may return to a position they left, so an edge has no "
            "unique first head; head loadings need a causal model (attribute(..., heads=False))"
        )
    n_layers, n_heads = replacement.n_layers, model.cfg.n_heads
    group = n_heads // model.cfg.n_kv_heads
    z_hooks = [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    v_hooks = [f"blocks.{layer}.attn.hook_v" for layer in range(n_layers)]
    off_diagonal = [
        p * (1 - torch.eye(replacement.n_pos, dtype=p.dtype, device=p.device)) for p in replacement.patterns
    ]
    diagonal = [p - off for p, off in zip(replacement.patterns, off_diagonal, strict=True)]
    sources = RowComputer(replacement, v_hooks, computer.batch_size, patterns=diagonal)
    frames = []
    batch = computer.batch_size
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        injections: dict[str, torch.Tensor] = {}
        for element, row in enumerate(chunk):
            if row.hook not in injections:
                injections[row.hook] = torch.zeros_like(computer.reads[row.hook])
            injections[row.hook][element, row.position] += row.vector.to(injections[row.hook].dtype)
        grads = torch.autograd.grad(
            [computer.reads[h] for h in injections],
            [computer.reads[h] for h in z_hooks],
            list(injections.values()),
            retain_graph=True,
            allow_unused=True,
        )
        # received[L][b, h, k, d]: what row b gets through head h of layer L from the value at key k, leaving k
        received = [
            torch.zeros_like(computer.reads[h]).transpose(1, 2)
            if g is None
            else torch.einsum("hqk,bqhd->bhkd", off.to(g.dtype), g)
            for g, h, off in zip(grads, z_hooks, off_diagonal, strict=True)
        ]
        elements = [
            (b, layer, head)
            for b in range(len(chunk))
            for layer in range(n_layers)
            for head in range(n_heads)
        ]
        for first in range(0, len(elements), batch):
            part = elements[first : first + batch]
            inject = {h: torch.zeros_like(sources.reads[h]) for h in v_hooks}
            for element, (b, layer, head) in enumerate(part):
                inject[v_hooks[layer]][element, :, head // group] += received[layer][b, head]
            columns = sources.columns(sources.gradients(sources.reads, inject), len(part))
            index = torch.tensor(part, device=columns.device)
            target_nodes = torch.as_tensor(row_nodes, device=columns.device)[start + index[:, 0]]
            target_positions = torch.tensor([r.position for r in chunk], device=columns.device)[index[:, 0]]
            keep = (sources.positions[None] != target_positions[:, None]) & (node_of_column[None] >= 0)
            keep &= columns.abs() > min_weight
            kept, column = torch.nonzero(keep, as_tuple=True)
            frames.append(
                pd.DataFrame(
                    {
                        "target": target_nodes[kept].cpu().numpy(),
                        "source": node_of_column[column].cpu().numpy(),
                        "layer": index[kept, 1].cpu().numpy(),
                        "head": index[kept, 2].cpu().numpy(),
                        "weight": columns[kept, column].double().cpu().numpy(),
                    }
                )
            )
    if not frames:
        return pd.DataFrame(columns=list(HEAD_COLUMNS))
    return pd.concat(frames, ignore_index=True)
