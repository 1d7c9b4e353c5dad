"""BatchTopK SAE: keep the k*batch largest activations across a batch; saved as JumpReLU with a global threshold."""

from __future__ import annotations

import torch

from workbench.circuits.sae.base import SAE, SAEInputError
from workbench.circuits.sae.registry import register
from workbench.circuits.sae.topk import TopKSAE


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    """Training: batch-level top-k; inference: f = pre * 1[pre > threshold] with the learned global threshold.

    Data-parallel (``batch_gather`` set): the batch is the global batch, and the kept entries are those at or
    above the (k · global batch)-th largest value of all ranks."""

    latent_major_parameters: tuple[str, ...] = ()  # dense latents: autograd's own backward
    latent_reconstruction = SAE.latent_reconstruction  # its own encode (a learned threshold once trained)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32))

    def batch_activation(self, pre: torch.Tensor) -> torch.Tensor:
        """pre [batch, d_sae] -> latents keeping the k*batch largest positive entries of the whole batch."""
        flat = pre.relu().flatten()
        n_keep = min(self.cfg.k * pre.shape[0], flat.numel())
        if self.batch_gather is not None:
            with torch.no_grad():  # every rank offers its largest k·(global batch) values; the cut is the
                rows = int(self.batch_gather(pre.new_tensor([pre.shape[0]])).sum())  # global k·batch-th
                n_global = min(self.cfg.k, self.d_sae) * rows
                offered = flat.detach().topk(min(n_global, flat.numel()), sorted=False).values
                offered = torch.cat([offered, offered.new_full((n_global - len(offered),), -torch.inf)])
                candidates = self.batch_gather(offered)  # as long on every rank, even when masking drops rows
                cut = candidates.topk(n_global, sorted=True).values[-1]
            return (pre * (flat.view_as(pre) >= cut.clamp_min(torch.finfo(pre.dtype).tiny))).relu()
        values, indices = flat.topk(n_keep, sorted=False)
        return torch.zeros_like(flat).scatter(0, indices, values).view_as(pre)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        if float(self.threshold) < 0:
            return super().activation(pre)
        return pre * (pre > self.threshold).to(pre.dtype)

    def training_forward(self, x, dead_mask=None):
        pre = self.pre_activation(x)
        f = self.batch_activation(pre)
        with torch.no_grad():
            kept = f[f > 0]
            if self.batch_gather is not None:  # the smallest kept activation of the global batch
                local = kept.min().float() if kept.numel() else torch.tensor(torch.inf, device=f.device)
                kept = self.batch_gather(local.reshape(1))
                kept = kept[torch.isfinite(kept)]
            if kept.numel():
                smallest = kept.min().float()
                current = self.threshold if float(self.threshold) >= 0 else smallest
                self.threshold.copy_(0.99 * current + 0.01 * smallest)
        return f, self.decode(f, x), pre, {}

    def inference_state(self):
        """Saved as JumpReLU with the learned global threshold; an untrained one (threshold still at its initial
        -1, no training batch seen) has no JumpReLU equivalent and raises SAEInputError."""
        if float(self.threshold) < 0:
            raise SAEInputError(
                "this BatchTopK SAE has not been trained (its threshold is still the initial -1), so it cannot be "
                "saved as JumpReLU: train it first (train_sae / train_saes), or save a topk SAE instead"
            )
        _, tensors = SAE.inference_state(self)
        tensors["threshold"] = tensors["threshold"].expand(self.d_sae).contiguous()
        return "jumprelu", tensors
