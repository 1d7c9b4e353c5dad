"""JumpReLU SAE: f = pre * 1[pre > threshold]; rectangle-kernel straight-through gradients for the threshold.

Training runs sparse once few latents fire (every row at most a quarter of d_sae): the pre-activations are
computed once without autograd, the active entries (pre > threshold) are laid out per row ([batch, width], padded
with entries that carry nothing), and only they carry gradient — into W_enc / b_enc (``_ChosenPreActivations``),
through the ``embedding_bag`` decoder (``_SparseDecode``) and, within the rectangle window, into the threshold —
since an inactive latent's output is 0 and passes no gradient through the final relu. The L0 term's threshold
gradient counts each latent's pre-activations inside the window (``_L0``). Latents, losses and gradients equal the
dense formulation's (tested).
"""

from __future__ import annotations

import torch
from torch import nn

from workbench.circuits.sae.base import SAE
from workbench.circuits.sae.registry import register
from workbench.circuits.sae.topk import _ChosenPreActivations, _SparseDecode, pre_activation_in_buffer


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_pre = (pre > threshold).to(pre.dtype) * grad
        grad_threshold = -(threshold / bw) * _rectangle((pre - threshold) / bw) * grad
        if threshold.shape == pre.shape:  # one threshold per entry (the sparse path's gathered thresholds)
            return grad_pre, grad_threshold, None
        return grad_pre, grad_threshold.reshape(-1, threshold.shape[-1]).sum(0), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_threshold = -(1.0 / bw) * _rectangle((pre - threshold) / bw) * grad
        return None, grad_threshold.reshape(-1, threshold.shape[-1]).sum(0), None


class _PreActivations(torch.autograd.Function):
    """x W_enc + b_enc [batch, d_sae], passed in already computed (``pre``); the backward adds W_enc's gradient
    gradᵀ x straight into its latent-major gradient rows (one GEMM, contiguous writes) and returns b_enc's."""

    @staticmethod
    def forward(ctx, x, w_enc, b_enc, pre):
        ctx.save_for_backward(x, w_enc)
        return pre

    @staticmethod
    def backward(ctx, grad):
        x, w_enc = ctx.saved_tensors
        if ctx.needs_input_grad[1]:
            if w_enc.grad is None:
                w_enc.grad = torch.zeros_like(w_enc)
            w_enc.grad.T.addmm_(grad.T, x)
        return None, None, grad.sum(0) if ctx.needs_input_grad[2] else None, None


class _L0(torch.autograd.Function):
    """Σ_i 1[pre_i > θ_i] averaged over the rows of pre [batch, d_sae] (no gradient), with _Step's straight-through
    threshold gradient −(1/bandwidth) · (entries of latent i inside the rectangle window) / batch, computed from
    per-latent window counts instead of a dense [batch, d_sae] gradient."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).sum(-1).to(pre.dtype).mean()

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        window = ((pre - threshold) / bw).abs_() < 0.5  # = _rectangle((pre - threshold) / bw) > 0
        counts = window.sum(0).to(threshold.dtype)
        return None, -(1.0 / bw) * counts * (grad / pre.shape[0]), None


@register("jumprelu")
class JumpReLUSAE(SAE):
    """Threshold is an fp32 parameter [d_sae] stored directly; loss adds l0_coefficient * L0 (STE)."""

    latent_major_parameters: tuple[str, ...] = ("W_enc",)  # the sparse backward adds whole latent rows
    pre_buffer: torch.Tensor | None = None  # reused pre-activation memory [rows, d_sae] while training

    def __init__(self, cfg):
        super().__init__(cfg)
        self.threshold = nn.Parameter(
            torch.full((cfg.d_sae,), float(cfg.init_threshold), dtype=torch.float32)
        )

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.threshold.requires_grad:
            return _JumpReLU.apply(pre, self.threshold, self.cfg.bandwidth).relu()
        return pre.relu() * (pre > self.threshold).to(pre.dtype)

    def training_forward(self, x, dead_mask=None):
        """Sparse (latents as a COO tensor [batch, d_sae]) when every row has at most d_sae / 4 active latents,
        else the dense formulation; same latents, prediction and gradients."""
        if not (torch.is_grad_enabled() and self.threshold.requires_grad) or x.dim() != 2:
            return super().training_forward(x, dead_mask)
        with torch.no_grad():
            pre = pre_activation_in_buffer(self, x)
            active = pre > self.threshold
            counts = active.sum(1)
            width = int(counts.max()) if len(counts) else 0
        if width > self.d_sae // 4:  # dense: the pre-activations already computed carry the gradient
            pre = _PreActivations.apply(x, self.W_enc, self.b_enc, pre)
            f = self.activation(pre)
            return f, self.decode(f, x), pre, {}
        with torch.no_grad():
            rows, latents = active.nonzero(as_tuple=True)  # row-major: sorted by row
            position = torch.arange(len(rows), device=x.device) - (counts.cumsum(0) - counts)[rows]
            index = torch.zeros(x.shape[0], max(width, 1), dtype=torch.long, device=x.device)
            index[rows, position] = latents
            chosen = pre.new_zeros(index.shape)
            chosen[rows, position] = pre[rows, latents]
            valid = torch.zeros(index.shape, dtype=pre.dtype, device=x.device)
            valid[rows, position] = 1.0
        values = _ChosenPreActivations.apply(x, self.W_enc, self.b_enc, index, chosen)
        values = _JumpReLU.apply(values, self.threshold[index], self.cfg.bandwidth).relu() * valid
        out = _SparseDecode.apply(index, values, self.W_dec) + self.b_dec
        if self.W_skip is not None:
            out = out + x @ self.W_skip
        batch_rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(index.shape[1])
        f = torch.sparse_coo_tensor(
            torch.stack([batch_rows, index.reshape(-1)]),
            values.detach().reshape(-1),
            pre.shape,
            check_invariants=False,
        )
        return f, out, pre, {}

    def sparsity_loss(self, f: torch.Tensor, pre: torch.Tensor) -> dict[str, torch.Tensor]:
        """f, pre [batch, d_sae] -> {"l0": scalar []}: l0_coefficient · mean_batch Σ_i 1[pre_i > θ_i], whose
        gradient reaches the thresholds θ [d_sae] through the rectangle-kernel straight-through estimator."""
        if f.is_sparse:  # the sparse step: pre carries no gradient, the window counts give θ's
            l0 = _L0.apply(pre, self.threshold, self.cfg.bandwidth)
        else:
            l0 = _Step.apply(pre, self.threshold, self.cfg.bandwidth).sum(-1).mean()
        return {"l0": self.cfg.l0_coefficient * l0}

    @torch.no_grad()
    def clamp_threshold(self) -> None:
        self.threshold.clamp_(min=1e-6)
