"""TopK SAE: keep the k largest pre-activations per row; AuxK loss revives dead latents.

Training exploits the sparsity: the pre-activations are computed once without autograd (the step's one dense
product, batch × d_in × d_sae), and only the chosen entries carry gradient (``_ChosenPreActivations``: a backward
into W_enc / b_enc at the chosen latents only), while the decoder is an ``embedding_bag`` over the k chosen rows of
W_dec whose backward (``_SparseDecode``) reads and writes only those rows. The weight gradients (batch · k rows of
d_in or d_out each) are added in place into ``W_enc.grad`` / ``W_dec.grad``; the trainer stores W_enc latent-major
so each such row is contiguous. Gradients equal those of the dense formulation (tested).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch.nn import functional as F

from workbench.circuits.sae.base import SAE
from workbench.circuits.sae.registry import register

_BLOCK = 32  # latents per block of the two-level top-k


def largest_k(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [.., k] of the k largest entries of each row of pre [.., d_sae], in no particular order.

    Exact, like ``pre.topk(k, sorted=False)``; a wide row on the CPU goes in two levels: the maxima of blocks of 32
    latents, the k blocks with the largest maxima, then the k largest of those k · 32 candidates. Every entry
    above the k-th largest value lies in a block whose maximum is above it, and there are fewer than k such blocks,
    so the candidates hold the same k values (at d_sae 24576, k 32: 2× faster than ``topk`` over the whole row,
    whose CPU kernel selects in a copy of each row)."""
    width = pre.shape[-1]
    if pre.device.type != "cpu" or width % _BLOCK or k * _BLOCK * 8 > width:
        return pre.topk(k, dim=-1, sorted=False)
    rows = pre.reshape(-1, width // _BLOCK, _BLOCK)
    _, blocks = rows.amax(-1).topk(k, dim=-1, sorted=False)  # [rows, k]
    candidates = rows.gather(1, blocks[:, :, None].expand(-1, -1, _BLOCK)).flatten(1)  # [rows, k · block]
    values, picked = candidates.topk(k, dim=-1, sorted=False)
    indices = blocks.gather(1, picked // _BLOCK) * _BLOCK + picked % _BLOCK
    return values.view(*pre.shape[:-1], k), indices.view(*pre.shape[:-1], k)


def topk_activation(pre: torch.Tensor, k: int) -> torch.Tensor:
    """[.., d_sae] -> same shape with all but the k largest (then relu'd) entries zeroed."""
    values, indices = largest_k(pre, k)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A sparse CSR matrix of ``shape`` (torch's "CSR support is in beta" warning silenced; invariants unchecked:
    the callers build them valid)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _latent_rows(index: torch.Tensor, weights: torch.Tensor, n_latents: int) -> torch.Tensor:
    """Sparse CSR [n_latents, batch] holding weights[b, j] at (index[b, j], b), for index and weights [batch, k]:
    the choice as a matrix whose rows are latents (entries sorted by latent; one stable sort of batch · k)."""
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    crow = torch.zeros(n_latents + 1, dtype=torch.long, device=index.device)
    crow[1:] = torch.bincount(flat, minlength=n_latents).cumsum(0)
    return _csr(crow, order // index.shape[1], weights.reshape(-1)[order], (n_latents, index.shape[0]))


def _gradient_rows(grad: torch.Tensor, latent_dim: int) -> torch.Tensor | None:
    """``grad`` as a view [n_latents, width] whose row l is latent l's gradient, or None when its layout has no
    such view. latent_dim 0: W_dec [d_sae, d_out] (or a CLT's [d_sae, n_targets, d_model], rows flattened);
    1: W_enc [d_in, d_sae] (or a CLT's [n_layers, d_in, d_sae]: latent (i, f) is row i · d_sae + f)."""
    if latent_dim == 0:
        return grad if grad.ndim == 2 else (grad.view(grad.shape[0], -1) if grad.is_contiguous() else None)
    rows = grad.transpose(-2, -1)
    if rows.ndim == 2:
        return rows
    try:
        return rows.view(-1, rows.shape[-1])
    except RuntimeError:  # not stored latent-major
        return None


def _add_to_gradient(
    param: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, source: torch.Tensor, latent_dim: int
) -> None:
    """param.grad += the gradient of a matrix whose rows along ``latent_dim`` (0: W_dec [d_sae, d_out]; 1: W_enc
    [d_in, d_sae]; a CLT's stacked layers as :func:`_gradient_rows` numbers them) were picked by index [batch, k]
    with weights [batch, k] times source [batch, width]: grad_rows[index[b, j]] += weights[b, j] · source[b], one
    sparse (latent-sorted CSR) × dense product added in place — no [batch · k, width] temporary, no [d_sae, width]
    buffer. Creates the gradient as zeros in the parameter's own layout when absent (so the optimiser sees grad and
    param alike); the trainer stores W_enc latent-major (``SAE.latent_major_parameters``) so that its gradient rows
    are contiguous (another layout goes through one [n_latents, width] temporary)."""
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    n_latents = param.shape[0] if latent_dim == 0 else param.shape[-1] * math.prod(param.shape[:-2])
    product = _latent_rows(index, weights.to(source.dtype), n_latents)
    rows = _gradient_rows(param.grad, latent_dim)
    if rows is not None:
        rows.addmm_(product, source)
    elif latent_dim == 0:
        param.grad.add_((product @ source).view(param.shape))
    else:
        shape = (*param.shape[:-2], param.shape[-1], param.shape[-2])
        param.grad.add_((product @ source).view(shape).transpose(-2, -1))


def _chosen_dots(index: torch.Tensor, matrix: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """[batch, k]: matrix[index[b, j]] · vectors[b], for index [batch, k], matrix [d_sae, width], vectors [batch,
    width] — only the k chosen entries of vectors @ matrixᵀ (a sampled product: k · width per row instead of
    d_sae · width)."""
    batch, k = index.shape
    crow = torch.arange(0, batch * k + 1, k, device=index.device)
    pattern = _csr(crow, index.reshape(-1), vectors.new_zeros(batch * k), (batch, matrix.shape[0]))
    return torch.sparse.sampled_addmm(pattern, vectors, matrix.T, beta=0.0).values().view(batch, k)


class _ChosenPreActivations(torch.autograd.Function):
    """Pre-activations at chosen latents, ``values`` [batch, k] = (x @ W_enc + b_enc)[row, index], passed in already
    computed; the backward adds into W_enc [d_in, d_sae] (stored latent-major) and b_enc [d_sae] only at the chosen
    latents. A CLT's layers go in one call: W_enc [n_layers, d_in, d_sae], b_enc [n_layers, d_sae], x the layers'
    rows stacked [n_layers · batch, d_in] and index the latents numbered layer · d_sae + f.

    The weight gradient is accumulated straight into ``W_enc.grad`` (as ``loss.backward()`` accumulates; the
    Function returns None for it), like Megatron's fused weight-gradient accumulation: a [d_sae, d_in] gradient
    for at most batch · k rows is never materialised, zeroed and copied each step."""

    @staticmethod
    def forward(ctx, x, w_enc, b_enc, index, values):
        ctx.save_for_backward(x, w_enc, index)
        return values

    @staticmethod
    def backward(ctx, grad):
        x, w_enc, index = ctx.saved_tensors
        if ctx.needs_input_grad[1]:
            _add_to_gradient(w_enc, index, grad, x, latent_dim=1)
        grad_b = None
        if ctx.needs_input_grad[2]:
            shape = (*w_enc.shape[:-2], w_enc.shape[-1])  # b_enc's
            grad_b = grad.new_zeros(math.prod(shape))
            grad_b = grad_b.index_add_(0, index.reshape(-1), grad.reshape(-1)).view(shape)
        return None, None, grad_b, None, None


class _SparseDecode(torch.autograd.Function):
    """Σ_j values[:, j] · W_dec[index[:, j]]: index, values [batch, k], W_dec [d_sae, d_out] -> [batch, d_out] (a
    CLT's W_dec[i] [d_sae, n_targets, d_model] -> [batch, n_targets · d_model]).

    The backward touches only the chosen rows: the values' gradient is k dot products per row, and W_dec's is
    accumulated straight into ``W_dec.grad`` (see ``_ChosenPreActivations``)."""

    @staticmethod
    def forward(ctx, index, values, w_dec):
        ctx.save_for_backward(index, values, w_dec)
        return F.embedding_bag(index, w_dec.flatten(1), per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad):
        index, values, w_dec = ctx.saved_tensors
        grad_values = _chosen_dots(index, w_dec.flatten(1), grad) if ctx.needs_input_grad[1] else None
        if ctx.needs_input_grad[2]:
            _add_to_gradient(w_dec, index, values, grad, latent_dim=0)
        return None, grad_values, None


def pre_activation_in_buffer(sae, x: torch.Tensor) -> torch.Tensor:
    """x [batch, d_in] @ W_enc + b_enc written into ``sae.pre_buffer`` (regrown when too small, a sparse training
    step's reused pre-activation memory): [batch, d_sae]."""
    buffer = sae.pre_buffer
    if buffer is None or buffer.shape[0] < x.shape[0] or (buffer.dtype, buffer.device) != (x.dtype, x.device):
        buffer = sae.pre_buffer = x.new_empty(x.shape[0], sae.d_sae)
    return torch.addmm(sae.b_enc, x, sae.W_enc, out=buffer[: x.shape[0]])


@register("topk")
class TopKSAE(SAE):
    """f = relu(topk_k(x W_enc + b_enc)).

    ``batch_gather`` (set by the data-parallel trainer, else None) gathers a tensor [n] of every rank into
    [world · n], so that batch-level statistics (the AuxK normaliser; BatchTopK's cut) are the global batch's."""

    batch_gather: Callable[[torch.Tensor], torch.Tensor] | None = None
    latent_major_parameters: tuple[str, ...] = ("W_enc",)  # its sparse backward adds whole latent rows
    pre_buffer: torch.Tensor | None = None  # reused pre-activation memory [rows, d_sae] while training

    def _pre_activation_in_buffer(self, x: torch.Tensor) -> torch.Tensor:
        return pre_activation_in_buffer(self, x)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return topk_activation(pre, self.cfg.k)

    def _sparse_decode(self, x: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Σ_j values[:, j] · W_dec[index[:, j]] + b_dec (+ x W_skip): [batch, d_out]."""
        out = _SparseDecode.apply(index, values, self.W_dec) + self.b_dec
        return out + x @ self.W_skip if self.W_skip is not None else out

    def latent_reconstruction(self, x: torch.Tensor) -> torch.Tensor:
        """encode(x) @ W_dec through the k chosen rows only: [batch, d_in] -> [batch, d_out]."""
        chosen, index = largest_k(self.pre_activation(x), self.cfg.k)
        return F.embedding_bag(index, self.W_dec, per_sample_weights=chosen.relu(), mode="sum")

    def training_forward(self, x, dead_mask=None):
        """Latents come back as a sparse COO tensor [batch, d_sae] (k entries per row): no dense latent matrix.

        With ``pre_buffer`` set (the trainer does), the pre-activations [batch, d_sae] are written into it — valid
        until the next call — instead of into fresh memory, whose first touch costs as much as a tenth of the
        product at d_sae 24576."""
        with torch.no_grad():
            pre = self._pre_activation_in_buffer(x) if self.pre_buffer is not None else self.pre_activation(x)
            chosen, index = largest_k(pre, self.cfg.k)
        values = _ChosenPreActivations.apply(x, self.W_enc, self.b_enc, index, chosen).relu()
        rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(index.shape[1])
        f = torch.sparse_coo_tensor(
            torch.stack([rows, index.reshape(-1)]),
            values.detach().reshape(-1),
            pre.shape,
            check_invariants=False,
        )
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
            chosen, index = largest_k(pre.masked_fill(~dead, -torch.inf), aux_k)
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
