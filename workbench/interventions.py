"""Hook-function factories for the common interventions: ablation, activation patching, steering.

Each returns ``fn(activation, hook) -> Tensor`` for ``HookedModel.run_with_hooks`` / ``model.hooks``:

    model.run_with_hooks(tokens, fwd_hooks=[("blocks.2.attn.hook_z", zero_ablation(heads=[3]))])
    _, clean = model.run_with_cache(clean_tokens, "blocks.*.hook_resid_pre")
    model.run_with_hooks(corrupt_tokens, fwd_hooks=[("blocks.1.hook_resid_pre", patch_from(clean, positions=[4]))])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from workbench.hooks import HookPoint


def _index(activation: torch.Tensor, positions: Sequence[int] | None, heads: Sequence[int] | None) -> tuple:
    """Index into [batch, pos, ...] (heads on dim 2 for [batch, pos, head, d_head] tensors)."""
    index: list = [slice(None), slice(None) if positions is None else list(positions)]
    if heads is not None:
        if activation.ndim != 4:
            raise ValueError(
                f"heads= needs a per-head activation [batch, pos, head, d_head] (hook_q/k/v/z); got shape "
                f"{tuple(activation.shape)}"
            )
        index.append(list(heads))
    return tuple(index) if heads is None or positions is None else _broadcast(positions, heads)


def _broadcast(positions: Sequence[int], heads: Sequence[int]) -> tuple:
    pos = torch.tensor(list(positions)).view(-1, 1)
    head = torch.tensor(list(heads)).view(1, -1)
    return (slice(None), pos, head)


def zero_ablation(positions: Sequence[int] | None = None, heads: Sequence[int] | None = None):
    """Set the activation (optionally only ``positions`` and/or ``heads``) to zero."""

    def hook(activation: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        out = activation.clone()
        out[_index(activation, positions, heads)] = 0
        return out

    return hook


def mean_ablation(
    means: Mapping[str, torch.Tensor] | torch.Tensor,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
):
    """Replace the activation by a mean (a tensor broadcastable to it, e.g. [d_model] or [pos, d_model]),
    or by ``means[hook.name]`` when a mapping from hook name to mean is given."""

    def hook(activation: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        mean = means[hook.name] if isinstance(means, Mapping) else means
        out = activation.clone()
        idx = _index(activation, positions, heads)
        out[idx] = mean.to(out.dtype).to(out.device).expand_as(activation)[idx]
        return out

    return hook


def patch_from(
    source: Mapping[str, torch.Tensor],
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
):
    """Activation patching: copy the activation recorded in ``source`` (a cache from another run, same shapes)
    into this run, optionally only at ``positions`` and/or ``heads``."""

    def hook(activation: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        donor = source[hook.name]
        if donor.shape != activation.shape:
            raise ValueError(
                f"cannot patch {hook.name}: source shape {tuple(donor.shape)} != this run's "
                f"{tuple(activation.shape)}; capture the source with the same batch and length, without positions="
            )
        out = activation.clone()
        idx = _index(activation, positions, heads)
        out[idx] = donor.to(out.device, out.dtype)[idx]
        return out

    return hook


def steering(vector: torch.Tensor, scale: float = 1.0, positions: Sequence[int] | None = None):
    """Add ``scale · vector`` ([d_model]) to a residual-stream activation [batch, pos, d_model]."""

    def hook(activation: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        if vector.shape[-1] != activation.shape[-1]:
            raise ValueError(
                f"steering vector has size {vector.shape[-1]} but {hook.name} has {activation.shape[-1]} features"
            )
        out = activation.clone()
        idx = _index(activation, positions, None)
        out[idx] = out[idx] + scale * vector.to(out.device, out.dtype)
        return out

    return hook


def project_out(direction: torch.Tensor, positions: Sequence[int] | None = None):
    """Remove the component along ``direction`` ([d_model], any norm) from the activation."""
    unit = direction / direction.norm()

    def hook(activation: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        u = unit.to(activation.device, activation.dtype)
        out = activation.clone()
        idx = _index(activation, positions, None)
        part = out[idx]
        out[idx] = part - (part @ u).unsqueeze(-1) * u
        return out

    return hook
