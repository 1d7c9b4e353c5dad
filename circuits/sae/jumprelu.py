"""JumpReLU SAE: f = pre * 1[pre > threshold]; rectangle-kernel straight-through gradients for the threshold."""

from __future__ import annotations

import torch
from torch import nn

from workbench.circuits.sae.base import SAE
from workbench.circuits.sae.registry import register


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


@register("jumprelu")
class JumpReLUSAE(SAE):
    """Threshold is an fp32 parameter [d_sae] stored directly; loss adds l0_coefficient * L0 (STE)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.threshold = nn.Parameter(
            torch.full((cfg.d_sae,), float(cfg.init_threshold), dtype=torch.float32)
        )

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.threshold.requires_grad:
            return _JumpReLU.apply(pre, self.threshold, self.cfg.bandwidth).relu()
        return pre.relu() * (pre > self.threshold).to(pre.dtype)

    def sparsity_loss(self, f: torch.Tensor, pre: torch.Tensor) -> dict[str, torch.Tensor]:
        """f, pre [batch, d_sae] -> {"l0": scalar []}: l0_coefficient · mean_batch Σ_i 1[pre_i > θ_i], whose
        gradient reaches the thresholds θ [d_sae] through the rectangle-kernel straight-through estimator."""
        l0 = _Step.apply(pre, self.threshold, self.cfg.bandwidth).sum(-1).mean()
        return {"l0": self.cfg.l0_coefficient * l0}

    @torch.no_grad()
    def clamp_threshold(self) -> None:
        self.threshold.clamp_(min=1e-6)
