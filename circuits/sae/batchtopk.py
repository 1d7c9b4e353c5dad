"""BatchTopK SAE: keep the k*batch largest activations across a batch; saved as JumpReLU with a global threshold.

Training runs sparse like TopK's (``circuits.sae.topk``): the pre-activations are computed once without autograd,
the k · batch kept entries are laid out per row ([batch, width], width = the most any row keeps, padded with zero
values that carry no gradient), and only they carry gradient into W_enc / b_enc (``_ChosenPreActivations``) and
through the ``embedding_bag`` decoder (``_SparseDecode``). A batch whose rows keep very unequal numbers of latents
(width over a quarter of d_sae), and the data-parallel cut, take the dense path; both give the dense formulation's
latents and gradients (tested).
"""

from __future__ import annotations

import torch

from workbench.circuits.sae.base import SAE, SAEInputError
from workbench.circuits.sae.registry import register
from workbench.circuits.sae.topk import TopKSAE, _ChosenPreActivations


def batch_largest(pre: torch.Tensor, n_keep: int, max_width: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``n_keep`` largest entries of pre [batch, d_sae] (no gradient) as (values, index) [batch, width], row b
    holding its kept latents first and zero values (at latent 0) after; None when some row keeps more than
    ``max_width`` (the dense path is then cheaper)."""
    batch, d_sae = pre.shape
    values, flat = pre.flatten().topk(n_keep, sorted=False)
    rows = torch.div(flat, d_sae, rounding_mode="floor")
    counts = torch.bincount(rows, minlength=batch)
    width = int(counts.max()) if n_keep else 0
    if width > max_width:
        return None
    order = torch.argsort(rows, stable=True)
    rows = rows[order]
    position = torch.arange(n_keep, device=pre.device) - (counts.cumsum(0) - counts)[rows]
    index = torch.zeros(batch, max(width, 1), dtype=torch.long, device=pre.device)
    index[rows, position] = flat[order] - rows * d_sae
    chosen = pre.new_zeros(batch, max(width, 1))
    chosen[rows, position] = values[order]
    return chosen, index


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    """Training: batch-level top-k; inference: f = pre * 1[pre > threshold] with the learned global threshold.

    Data-parallel (``batch_gather`` set): the batch is the global batch, and the kept entries are those at or
    above the (k · global batch)-th largest value of all ranks."""

    latent_major_parameters: tuple[str, ...] = ("W_enc",)  # its sparse backward adds whole latent rows
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
        """Latents come back as a sparse COO tensor [batch, d_sae] (k · batch entries, some of them zero) on the
        sparse path, dense on the dense one; the sparse prediction is ``_kept_decode``'s (Matryoshka decodes level
        by level there)."""
        if self.batch_gather is None:
            with torch.no_grad():
                pre = (
                    self._pre_activation_in_buffer(x)
                    if self.pre_buffer is not None
                    else self.pre_activation(x)
                )
                picked = batch_largest(
                    pre, min(self.cfg.k * pre.shape[0], pre.numel()), max(self.d_sae // 4, 1)
                )
            if picked is not None:
                chosen, index = picked
                values = _ChosenPreActivations.apply(x, self.W_enc, self.b_enc, index, chosen).relu()
                with torch.no_grad():
                    kept = chosen[chosen > 0]
                    self._update_threshold(kept)
                rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(index.shape[1])
                f = torch.sparse_coo_tensor(
                    torch.stack([rows, index.reshape(-1)]),
                    values.detach().reshape(-1),
                    pre.shape,
                    check_invariants=False,
                )
                return f, self._kept_decode(x, index, values), pre, {}
        pre = self.pre_activation(x)
        f = self.batch_activation(pre)
        with torch.no_grad():
            kept = f[f > 0]
            if self.batch_gather is not None:  # the smallest kept activation of the global batch
                local = kept.min().float() if kept.numel() else torch.tensor(torch.inf, device=f.device)
                kept = self.batch_gather(local.reshape(1))
                kept = kept[torch.isfinite(kept)]
            self._update_threshold(kept)
        return f, self.decode(f, x), pre, {}

    def _kept_decode(self, x: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The sparse step's prediction from the kept entries index, values [batch, width]: [batch, d_out]."""
        return self._sparse_decode(x, index, values)

    @torch.no_grad()
    def _update_threshold(self, kept: torch.Tensor) -> None:
        """threshold ← 0.99 · threshold + 0.01 · the smallest kept activation (that value at first)."""
        if kept.numel():
            smallest = kept.min().float()
            current = self.threshold if float(self.threshold) >= 0 else smallest
            self.threshold.copy_(0.99 * current + 0.01 * smallest)

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
