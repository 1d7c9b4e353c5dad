"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs"; Nabeshima
2024): BatchTopK latents, and the reconstruction loss is summed over nested prefixes of the dictionary.

With widths m_1 < m_2 < … < m_L = d_sae (``SAEConfig.matryoshka_widths``), the loss is
Σ_l ‖y − (b_dec + Σ_{i < m_l} f_i W_dec[i])‖², so the first m_1 latents must reconstruct on their own, the next ones
refine them, and general features are not absorbed into specific ones. Like BatchTopK it is saved as JumpReLU with
the learned global threshold (as SAELens does).
"""

from __future__ import annotations

from workbench.circuits.sae.batchtopk import BatchTopKSAE
from workbench.circuits.sae.registry import register
from workbench.circuits.sae.topk import _SparseDecode


@register("matryoshka_batchtopk")
class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """BatchTopK with nested-prefix reconstruction losses (the outer level is the usual MSE)."""

    def auxiliary_losses(self, x, y, f, pre):
        """{"matryoshka": Σ over the inner levels of ‖y − prefix reconstruction‖² (batch means)} for f [batch,
        d_sae] latents (dense, or the sparse training step's COO, whose kept entries ``chosen`` carry the
        gradient); the outer level (all latents) is the trainer's MSE."""
        widths = self.cfg.matryoshka_widths or [self.d_sae]
        partial = self.b_dec + (x @ self.W_skip if self.W_skip is not None else 0.0)
        total = self.b_dec.new_zeros(())
        if f.is_sparse and self.chosen is not None:  # each level adds the kept entries of its latent range
            index, values = self.chosen
            start = 0
            for width in widths[:-1]:
                level = values * ((index >= start) & (index < width)).to(values.dtype)
                partial = partial + _SparseDecode.apply(index, level, self.W_dec)
                total = total + (y - partial).pow(2).sum(-1).mean()
                start = width
            return {"matryoshka": total}
        start = 0
        for width in widths[:-1]:
            partial = partial + f[:, start:width] @ self.W_dec[start:width]
            total = total + (y - partial).pow(2).sum(-1).mean()
            start = width
        return {"matryoshka": total}
