"""TopK SAE: keep the k largest pre-activations per row; AuxK loss revives dead latents.

Training exploits the sparsity: the pre-activations are computed once without autograd, and only the chosen
entries carry gradient (``_ChosenPreActivations``: a sparse backward into W_enc / b_enc), while the decoder is an
``embedding_bag`` over the k chosen rows of W_dec whose backward (``_SparseDecode``) is one sparse-dense product
for W_dec and one dense product + gather for the chosen values (no sort, unlike ``embedding_bag``'s own backward).
Gradients equal those of the dense formulation (tested).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from workbench.circuits.sae.base import SAE, register


def topk_activation(pre: torch.Tensor, k: int) -> torch.Tensor:
    """[.., d_sae] -> same shape with all but the k largest (then relu'd) entries zeroed."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


def _chosen_matrix(index: torch.Tensor, values: torch.Tensor, d_sae: int) -> torch.Tensor:
    """Sparse COO [d_sae, batch] holding values[row, j] at (index[row, j], row); index, values [batch, k]."""
    rows = torch.arange(index.shape[0], device=index.device).repeat_interleave(index.shape[1])
    return torch.sparse_coo_tensor(torch.stack([index.reshape(-1), rows]), values.reshape(-1),
                                   (d_sae, index.shape[0]), check_invariants=False)  # fmt: skip


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
        grad_w = torch.sparse.mm(_chosen_matrix(index, grad.to(x.dtype), ctx.d_sae), x)  # [d_sae, d_in]
        grad_b = torch.zeros(ctx.d_sae, dtype=grad.dtype, device=grad.device).index_add_(
            0, index.reshape(-1), grad.reshape(-1)
        )
        return None, grad_w.T, grad_b, None, None


class _SparseDecode(torch.autograd.Function):
    """Σ_j values[:, j] · W_dec[index[:, j]]: index, values [batch, k], W_dec [d_sae, d_out] -> [batch, d_out]."""

    @staticmethod
    def forward(ctx, index, values, w_dec):
        ctx.save_for_backward(index, values, w_dec)
        return F.embedding_bag(index, w_dec, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad):
        index, values, w_dec = ctx.saved_tensors
        grad_values = (grad @ w_dec.T).gather(1, index) if ctx.needs_input_grad[1] else None
        grad_w = None
        if ctx.needs_input_grad[2]:
            grad_w = torch.sparse.mm(_chosen_matrix(index, values.to(grad.dtype), w_dec.shape[0]), grad)
        return None, grad_values, grad_w


@register("topk")
class TopKSAE(SAE):
    """f = relu(topk_k(x W_enc + b_enc)).

    ``batch_gather`` (set by the data-parallel trainer, else None) gathers a tensor [n] of every rank into
    [world · n], so that batch-level statistics (the AuxK normaliser; BatchTopK's cut) are the global batch's."""

    batch_gather: Callable[[torch.Tensor], torch.Tensor] | None = None

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return topk_activation(pre, self.cfg.k)

    def _sparse_decode(self, x: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Σ_j values[:, j] · W_dec[index[:, j]] + b_dec (+ x W_skip): [batch, d_out]."""
        out = _SparseDecode.apply(index, values, self.W_dec) + self.b_dec
        return out + x @ self.W_skip if self.W_skip is not None else out

    def training_forward(self, x, dead_mask=None):
        """Latents come back as a sparse COO tensor [batch, d_sae] (k entries per row): no dense latent matrix."""
        with torch.no_grad():
            pre = self.pre_activation(x)
            chosen, index = pre.topk(self.cfg.k, dim=-1, sorted=False)
        values = _ChosenPreActivations.apply(x, self.W_enc, self.b_enc, index, chosen).relu()
        rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(index.shape[1])
        f = torch.sparse_coo_tensor(torch.stack([rows, index.reshape(-1)]), values.detach().reshape(-1),
                                    pre.shape, check_invariants=False)  # fmt: skip
        return f, self._sparse_decode(x, index, values), pre, {}

    def aux_loss(
        self, x: torch.Tensor, pre: torch.Tensor, residual: torch.Tensor, dead_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """AuxK loss (scalar []): the aux_k largest pre-activations among dead latents reconstruct the main error.

        x [batch, d_in]; pre [batch, d_sae] (detached pre-activations); residual [batch, d_out] = target −
        prediction (detached); dead_mask [d_sae] bool (any device). aux_k = cfg.aux_k or d_out // 2, at most the
        number of dead latents. Returns aux_k_coefficient · ‖Σ_dead f_j W_dec[j] − residual‖² / ‖residual −
        mean‖² (batch means), zero when no latent is dead."""
        if dead_mask is None or not bool(dead_mask.any()):
            return pre.new_zeros(())
        aux_k = min(self.cfg.aux_k or self.d_out // 2, int(dead_mask.sum()))
        with torch.no_grad():
            dead = dead_mask.to(pre.device)
            chosen, index = pre.masked_fill(~dead, -torch.inf).topk(aux_k, dim=-1)
        values = _ChosenPreActivations.apply(x, self.W_enc, self.b_enc, index, chosen.nan_to_num(0.0)).relu()
        recon = _SparseDecode.apply(index, values, self.W_dec)
        if self.batch_gather is None:
            denom = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-8)
        else:  # data-parallel: the residual's variance over the global batch
            local = torch.cat(
                [residual.sum(0), residual.pow(2).sum().reshape(1), residual.new_tensor([len(x)])]
            )
            total = self.batch_gather(local).view(-1, len(local)).sum(0)
            n = total[-1]
            denom = ((total[-2] - total[:-2].pow(2).sum() / n) / n).clamp_min(1e-8)
        return self.cfg.aux_k_coefficient * (recon - residual).pow(2).sum(-1).mean() / denom
