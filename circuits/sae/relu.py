"""ReLU SAE with an L1 penalty weighted by decoder row norms."""

from __future__ import annotations

import torch

from workbench.circuits.sae.base import SAE
from workbench.circuits.sae.registry import register


@register("relu")
class ReLUSAE(SAE):
    """f = relu(x W_enc + b_enc); loss adds l1_coefficient * sum_i f_i ||W_dec[i]||."""

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def sparsity_loss(self, f: torch.Tensor, pre: torch.Tensor) -> dict[str, torch.Tensor]:
        """f, pre [batch, d_sae] -> {"l1": scalar []}: l1_coefficient · mean_batch Σ_i f_i ‖W_dec[i]‖."""
        l1 = (f * self.W_dec.norm(dim=1)).sum(dim=-1).mean()
        return {"l1": self.cfg.l1_coefficient * l1}
