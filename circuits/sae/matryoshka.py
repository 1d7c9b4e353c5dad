"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs"; Nabeshima
2024): BatchTopK latents, and the reconstruction loss is summed over nested prefixes of the dictionary.

With widths m_1 < m_2 < … < m_L = d_sae (``SAEConfig.matryoshka_widths``), the loss is
Σ_l ‖y − (b_dec + Σ_{i < m_l} f_i W_dec[i])‖², so the first m_1 latents must reconstruct on their own, the next ones
refine them, and general features are not absorbed into specific ones. Like BatchTopK it is saved as JumpReLU with
the learned global threshold (as SAELens does).
"""

from __future__ import annotations

import torch

from workbench.circuits.sae.batchtopk import BatchTopKSAE
from workbench.circuits.sae.registry import register
from workbench.circuits.sae.topk import _SparseDecode


@register("matryoshka_batchtopk")
class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """BatchTopK with nested-prefix reconstruction losses (the outer level is the usual MSE)."""

    partials: list[torch.Tensor] | None = None  # the sparse step's inner-level reconstructions

    def _kept_decode(self, x: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The sparse step's prediction decoded one level's latent range at a time (each kept entry once), the
        running sums kept as the inner levels' reconstructions (``partials``, for :meth:`auxiliary_losses`)."""
        widths = self.cfg.matryoshka_widths or [self.d_sae]
        level = torch.bucketize(
            index, index.new_tensor(widths[:-1]), right=True
        )  # latent < widths[0]: 0, ...
        partial = self.b_dec + (x @ self.W_skip if self.W_skip is not None else 0.0)
        partials = []
        for number in range(len(widths)):
            with torch.no_grad():
                member = level == number
                counts = member.sum(1)
                rows, slots = member.nonzero(as_tuple=True)  # row-major
                position = torch.arange(len(rows), device=index.device) - (counts.cumsum(0) - counts)[rows]
                width = max(int(counts.max()) if len(counts) else 0, 1)
                level_index = index.new_zeros(index.shape[0], width)
                level_index[rows, position] = index[rows, slots]
            level_values = values.new_zeros(index.shape[0], width).index_put(
                (rows, position), values[rows, slots]
            )
            partial = partial + _SparseDecode.apply(level_index, level_values, self.W_dec)
            partials.append(partial)
        self.partials = partials[:-1]
        return partials[-1]

    def auxiliary_losses(self, x, y, f, pre):
        """{"matryoshka": Σ over the inner levels of ‖y − prefix reconstruction‖² (batch means)} for f [batch,
        d_sae] latents (dense, or the sparse training step's COO, whose inner reconstructions ``partials`` carry
        the gradient); the outer level (all latents) is the trainer's MSE."""
        widths = self.cfg.matryoshka_widths or [self.d_sae]
        total = self.b_dec.new_zeros(())
        if f.is_sparse and self.partials is not None:
            for partial in self.partials:
                total = total + (y - partial).pow(2).sum(-1).mean()
            return {"matryoshka": total}
        partial = self.b_dec + (x @ self.W_skip if self.W_skip is not None else 0.0)
        start = 0
        for width in widths[:-1]:
            partial = partial + f[:, start:width] @ self.W_dec[start:width]
            total = total + (y - partial).pow(2).sum(-1).mean()
            start = width
        return {"matryoshka": total}
