"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders").

Two paths share the encoder directions W_enc [d_in, d_sae]: the gate π_gate = x W_enc + b_enc decides which latents
fire, the magnitude π_mag = x (W_enc ⊙ exp(r_mag)) + b_mag says how strongly (r_mag [d_sae] rescales each
direction), and f = 1[π_gate > 0] ⊙ relu(π_mag). The Heaviside gate has no gradient, so training adds
λ ‖relu(π_gate) ⊙ ‖W_dec‖‖₁ (sparsity of the gate) and ‖y − (relu(π_gate) W_dec + b_dec)‖² through a frozen copy of
the decoder (so the gate learns to reconstruct without pulling the decoder). ``b_enc`` is SAELens's ``b_gate``.
"""

from __future__ import annotations

import torch
from torch import nn

from workbench.circuits.sae.base import SAE, SAEInputError
from workbench.circuits.sae.registry import register


@register("gated")
class GatedSAE(SAE):
    """f = 1[x W_enc + b_enc > 0] · relu(x (W_enc ⊙ exp(r_mag)) + b_mag); loss adds the gate's L1 (l1_coefficient)
    and its frozen-decoder reconstruction."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))

    def magnitude_pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """[.., d_in] -> [.., d_sae]."""
        return x @ (self.W_enc * self.r_mag.exp()) + self.b_mag

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        raise SAEInputError("a gated SAE's latents need its input (gate and magnitude paths): call encode(x)")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        gate = self.pre_activation(x) > 0
        return self.magnitude_pre_activation(x).relu() * gate.to(x.dtype)

    def training_forward(self, x, dead_mask=None):
        """Pre-activations returned are the gate's π_gate [batch, d_sae]."""
        pre = self.pre_activation(x)
        f = self.magnitude_pre_activation(x).relu() * (pre > 0).to(x.dtype)
        return f, self.decode(f, x), pre, {}

    def sparsity_loss(self, f: torch.Tensor, pre: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"l1": l1_coefficient · mean_batch Σ_i relu(π_gate)_i ‖W_dec[i]‖} (scalar [])."""
        return {"l1": self.cfg.l1_coefficient * (pre.relu() * self.W_dec.norm(dim=1)).sum(-1).mean()}

    def auxiliary_losses(self, x, y, f, pre):
        """{"gate_reconstruction": ‖y − relu(π_gate) W_decᵀ_frozen − b_dec_frozen (− x W_skip_frozen)‖² (batch mean)}."""
        recon = pre.relu() @ self.W_dec.detach() + self.b_dec.detach()
        if self.W_skip is not None:
            recon = recon + x @ self.W_skip.detach()
        return {"gate_reconstruction": (y - recon).pow(2).sum(-1).mean()}

    @torch.no_grad()
    def center_encoder(self, mean_x: torch.Tensor) -> None:
        super().center_encoder(mean_x)
        self.b_mag.copy_(-(mean_x @ (self.W_enc * self.r_mag.exp())))

    @torch.no_grad()
    def scale_encoder(self, c: float) -> None:
        super().scale_encoder(c)
        self.b_mag.mul_(c)
