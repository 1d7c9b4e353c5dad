"""TopK SAE: keep the k largest pre-activations per row; AuxK loss revives dead latents."""

from __future__ import annotations

import torch

from circuits.sae.base import SAE, register


def topk_activation(pre: torch.Tensor, k: int) -> torch.Tensor:
    """[.., d_sae] -> same shape with all but the k largest (then relu'd) entries zeroed."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


@register("topk")
class TopKSAE(SAE):
    """f = relu(topk_k(x W_enc + b_enc))."""

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return topk_activation(pre, self.cfg.k)

    def training_forward(self, x, dead_mask=None):
        pre = self.pre_activation(x)
        f = self.activation(pre)
        prediction = self.decode(f, x)
        return f, prediction, pre, {}

    def aux_loss(
        self, pre: torch.Tensor, residual: torch.Tensor, dead_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """AuxK: the top dead latents reconstruct the residual error [batch, d_out] (normalised MSE)."""
        if dead_mask is None or not bool(dead_mask.any()):
            return pre.new_zeros(())
        aux_k = min(self.cfg.aux_k or self.d_out // 2, int(dead_mask.sum()))
        dead_pre = torch.where(dead_mask, pre, torch.full_like(pre, -torch.inf))
        f_dead = topk_activation(dead_pre, aux_k).nan_to_num(0.0)
        recon = f_dead @ self.W_dec
        denom = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-8)
        return self.cfg.aux_k_coefficient * (recon - residual).pow(2).sum(-1).mean() / denom
