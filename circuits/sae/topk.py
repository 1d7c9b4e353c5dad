"""TopK SAE: keep the k largest pre-activations per row; AuxK loss revives dead latents.

Training exploits the sparsity: the pre-activations are computed once without autograd, and only the chosen
entries carry gradient (``_ChosenPreActivations``: a sparse backward into W_enc / b_enc), while the decoder is an
``embedding_bag`` over the k chosen rows of W_dec. Gradients equal those of the dense formulation.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from circuits.sae.base import SAE, register


def topk_activation(pre: torch.Tensor, k: int) -> torch.Tensor:
    """[.., d_sae] -> same shape with all but the k largest (then relu'd) entries zeroed."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


class _ChosenPreActivations(torch.autograd.Function):
    """Pre-activations at chosen latents, ``values`` [batch, k] = (x @ W_enc + b_enc)[row, index], passed in already
    computed; the backward scatters into W_enc [d_in, d_sae] and b_enc [d_sae] only at the chosen latents."""

    @staticmethod
    def forward(ctx, x, w_enc, b_enc, index, values):
        ctx.save_for_backward(x, index)
        ctx.d_sae = w_enc.shape[1]
        return values

    @staticmethod
    def backward(ctx, grad):
        x, index = ctx.saved_tensors
        flat = index.reshape(-1)
        rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(index.shape[1])
        chosen = torch.sparse_coo_tensor(torch.stack([flat, rows]), grad.reshape(-1).to(x.dtype),
                                         (ctx.d_sae, x.shape[0]), check_invariants=False)  # fmt: skip
        grad_w = torch.sparse.mm(chosen, x)  # [d_sae, d_in]
        grad_b = torch.zeros(ctx.d_sae, dtype=grad.dtype, device=grad.device).index_add_(
            0, flat, grad.reshape(-1)
        )
        return None, grad_w.T, grad_b, None, None


@register("topk")
class TopKSAE(SAE):
    """f = relu(topk_k(x W_enc + b_enc))."""

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return topk_activation(pre, self.cfg.k)

    def _sparse_decode(self, x: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Σ_j values[:, j] · W_dec[index[:, j]] + b_dec (+ x W_skip): [batch, d_out]."""
        out = F.embedding_bag(index, self.W_dec, per_sample_weights=values, mode="sum") + self.b_dec
        return out + x @ self.W_skip if self.W_skip is not None else out

    def training_forward(self, x, dead_mask=None):
        with torch.no_grad():
            pre = self.pre_activation(x)
            chosen, index = pre.topk(self.cfg.k, dim=-1, sorted=False)
        values = _ChosenPreActivations.apply(x, self.W_enc, self.b_enc, index, chosen).relu()
        f = torch.zeros_like(pre).scatter(-1, index, values.detach())
        return f, self._sparse_decode(x, index, values), pre, {}

    def aux_loss(
        self, x: torch.Tensor, pre: torch.Tensor, residual: torch.Tensor, dead_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """AuxK: the top dead latents reconstruct the residual error [batch, d_out] (normalised MSE)."""
        if dead_mask is None or not bool(dead_mask.any()):
            return pre.new_zeros(())
        aux_k = min(self.cfg.aux_k or self.d_out // 2, int(dead_mask.sum()))
        with torch.no_grad():
            chosen, index = torch.where(dead_mask, pre, torch.full_like(pre, -torch.inf)).topk(aux_k, dim=-1)
        values = _ChosenPreActivations.apply(x, self.W_enc, self.b_enc, index, chosen.nan_to_num(0.0)).relu()
        recon = F.embedding_bag(index, self.W_dec, per_sample_weights=values, mode="sum")
        denom = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-8)
        return self.cfg.aux_k_coefficient * (recon - residual).pow(2).sum(-1).mean() / denom
