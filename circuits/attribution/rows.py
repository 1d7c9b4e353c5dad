"""Rows of the attribution adjacency: :class:`RowComputer` runs a replacement model's frozen forward once on
``batch_size`` copies and turns each batch of read-out vectors (:class:`Row`) into their rows over every source
column in one backward pass (feature edges through :class:`_DecoderBlocks`, one batched product per layer). Used by
the graph (``graph.attribute``), the heads that carry its edges (``heads.head_loadings``) and QK attribution."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workbench.circuits.attribution.replacement import ReplacementModel


@dataclass
class Row:
    """One row to compute: the read-out ``vector`` [d_model] at ``hook``, ``position``."""

    hook: str
    position: int
    vector: torch.Tensor


@dataclass
class _DecoderBlocks:
    """One layer's active features as direct-effect weights grouped by position, so that turning gradients into
    feature edges is one batched matmul per layer (no per-feature gather of gradients).

    Feature k (at position ``p_k``, activation a_k, decoder rows W_k [n_out, d_model] into MLP outputs layer ..
    layer + n_out − 1) has the edge a_k · Σ_o W_k[o] · ∂row/∂write[layer + o, p_k]. The features of a position
    are cut into blocks of at most ``width``; ``weights`` [n_blocks, width, n_out · d_model] holds a_k · W_k
    (zero in unused slots), ``position`` [n_blocks] each block's position, and feature k sits at (``block`` [k],
    ``slot`` [k]). ``width`` is the mean count per position (at least 8), so the padding stays below the features
    themselves plus one block per position."""

    weights: torch.Tensor
    position: torch.Tensor
    block: torch.Tensor
    slot: torch.Tensor
    n_out: int

    @classmethod
    def of(cls, positions: torch.Tensor, weighted: torch.Tensor, n_pos: int) -> _DecoderBlocks:
        """``positions`` [k] and activation-weighted decoder rows ``weighted`` [k, n_out, d_model]."""
        k, n_out, d_model = weighted.shape
        device = weighted.device
        width = max(8, -(-k // max(1, n_pos)))
        order = torch.sort(positions, stable=True).indices
        counts = torch.bincount(positions, minlength=n_pos)
        first = torch.cumsum(counts, 0) - counts  # the first of each position's features in sorted order
        rank = torch.empty(k, dtype=torch.long, device=device)
        rank[order] = torch.arange(k, device=device) - first[positions[order]]
        per_position = -(-counts // width)
        first_block = torch.cumsum(per_position, 0) - per_position
        block = first_block[positions] + rank // width
        slot = rank % width
        position = torch.repeat_interleave(torch.arange(n_pos, device=device), per_position)
        weights = torch.zeros(len(position), width, n_out * d_model, dtype=weighted.dtype, device=device)
        weights[block, slot] = weighted.reshape(k, n_out * d_model)
        return cls(weights, position, block, slot, n_out)

    def effects(self, by_position: torch.Tensor, layer: int) -> torch.Tensor:
        """``by_position`` [pos, n, n_layers, d_model]: n rows' gradients at every MLP write → [n, k] edges."""
        n_pos, n = by_position.shape[:2]
        if len(self.block) == 0:
            return by_position.new_zeros(n, 0)
        gradient = by_position[:, :, layer : layer + self.n_out].reshape(n_pos, n, -1)[self.position]
        return torch.bmm(gradient, self.weights.transpose(1, 2))[self.block, :, self.slot].T


class RowComputer:
    """Batched rows of the adjacency over every source column of a replacement model.

    Columns: [active features (n_active, sorted by layer, position, feature), errors (n_layers × n_pos), token
    embeddings (n_pos), position embeddings (n_pos, when present)]. The frozen forward runs once on ``batch_size``
    copies; every :meth:`rows` call is one backward pass per ``batch_size`` rows."""

    def __init__(
        self,
        replacement: ReplacementModel,
        reads: Sequence[str],
        batch_size: int,
        patterns: Sequence[torch.Tensor] | None = None,
    ):
        self.replacement, self.batch_size = replacement, batch_size
        tc = replacement.transcoders
        self.active: list[torch.Tensor] = []  # per layer [n_l, 2] (position, feature)
        self.values: list[torch.Tensor] = []  # per layer [n_l]
        self.blocks: list[_DecoderBlocks] = []  # per layer: activation × decoder rows, grouped by position
        for layer, acts in enumerate(replacement.activations):
            index = torch.nonzero(acts)
            self.active.append(index)
            self.values.append(acts[index[:, 0], index[:, 1]])
            decoders = tc.decoder_vectors(layer, index[:, 1]).to(acts.device)  # [n_l, n_out, d_model]
            self.blocks.append(
                _DecoderBlocks.of(index[:, 0], decoders * self.values[-1][:, None, None], replacement.n_pos)
            )
        self.features = torch.cat(
            [
                torch.cat([torch.full((len(i), 1), layer, device=i.device), i], 1)
                for layer, i in enumerate(self.active)
            ]
        )
        self.activations = torch.cat(self.values)
        self.n_active = len(self.features)
        n_inputs = replacement.n_pos * (2 if replacement.has_pos_embed else 1)
        positions = torch.arange(replacement.n_pos, device=self.features.device)
        self.positions = torch.cat(
            [
                self.features[:, 1],
                positions.repeat(replacement.n_layers),
                positions.repeat(n_inputs // replacement.n_pos),
            ]
        )
        # self.positions [n_columns]: the position of each source column
        self.n_columns = self.n_active + replacement.n_layers * replacement.n_pos + n_inputs
        self.sources = replacement.clean_sources(batch_size, grad=True)
        _, self.reads = replacement.forward(self.sources, reads=reads, patterns=patterns, until_head=True)

    def rows(self, rows: Sequence[Row]) -> torch.Tensor:
        """[len(rows), n_columns]: every source's direct effect on each row's read-out."""
        if len(rows) > self.batch_size:
            raise ValueError(f"{len(rows)} rows exceed the batch size {self.batch_size}")
        injections: dict[str, torch.Tensor] = {}
        for element, row in enumerate(rows):
            if row.hook not in injections:
                injections[row.hook] = torch.zeros_like(self.reads[row.hook])
            injections[row.hook][element, row.position] += row.vector.to(injections[row.hook].dtype)
        grads = self.gradients(self.reads, injections)
        return self.columns(grads, len(rows))

    def gradients(
        self, reads: dict[str, torch.Tensor], injections: dict[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        """One backward pass: the gradient of Σ injection · read over ``reads`` (recorded by a frozen forward on
        ``self.sources``) at every source leaf ([batch, ...] each, zeros where unreached)."""
        leaves = self.sources.leaves()
        grads = torch.autograd.grad(
            [reads[h] for h in injections],
            leaves,
            list(injections.values()),
            retain_graph=True,
            allow_unused=True,
        )
        return [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, leaves, strict=True)]

    def columns(self, grads: Sequence[torch.Tensor], n: int) -> torch.Tensor:
        """[n, n_columns]: the first ``n`` batch elements' gradients at the sources (writes, embed[, pos_embed])
        turned into direct effects of every source node (activation × decoder · gradient, error · gradient,
        embedding · gradient)."""
        rep = self.replacement
        grad_writes, grad_embed = grads[0][:n], grads[1][:n]
        # [pos, n, n_layers · d]: each position's gradient at every MLP write, laid out for one bmm per layer
        by_position = grad_writes.permute(2, 0, 1, 3)
        parts = [block.effects(by_position, layer) for layer, block in enumerate(self.blocks)]
        # elementwise products summed over d_model (an einsum here would permute the gradients into a copy first)
        parts.append((grad_writes * rep.errors).sum(-1).flatten(1))
        parts.append((grad_embed * rep.embed).sum(-1))
        if rep.has_pos_embed:
            assert rep.pos_embed is not None
            parts.append((grads[2][:n] * rep.pos_embed).sum(-1))
        return torch.cat(parts, dim=1)

    def constants(self, rows: Sequence[Row]) -> torch.Tensor:
        """[len(rows)]: each row's read-out in the frozen model at zero sources (what biases contribute)."""
        with torch.no_grad():
            _, reads = self.replacement.forward(
                self.replacement.zero_sources(), reads=[r.hook for r in rows], until_head=True
            )
        return torch.stack([reads[r.hook][0, r.position].to(r.vector.dtype) @ r.vector for r in rows])
