"""Hook-function factories for the common interventions: ablation, activation patching, steering.

Each returns ``fn(activation, hook) -> Tensor`` for ``HookedModel.run_with_hooks`` / ``model.hooks``:

    model.run_with_hooks(tokens, fwd_hooks=[("blocks.2.attn.hook_z", zero_ablation(heads=[3]))])
    _, clean = model.run_with_cache(clean_tokens, "blocks.*.hook_resid_pre")
    model.run_with_hooks(corrupt_tokens, fwd_hooks=[("blocks.1.hook_resid_pre", patch_from(clean, positions=[4]))])

:class:`Intervention` is the same set as data (a frozen, JSON-able record), so a stack of them can be edited,
saved and replayed: ``with apply_interventions(model, stack, tokens): model(tokens)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

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


def steering(
    vector: torch.Tensor,
    scale: float = 1.0,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
):
    """Add ``scale · vector`` ([d], the activation's last size) to an activation [batch, pos, d] (residual stream,
    MLP output, ...) or, with ``heads``, to those heads of a per-head activation [batch, pos, head, d_head]. On a
    per-head activation a vector of n_heads·d_head (an ``attn.hook_z`` SAE's decoder row) is one d_head slice per
    head."""

    def hook(activation: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        added = vector
        if activation.ndim == 4 and vector.numel() == activation.shape[-2] * activation.shape[-1]:
            added = vector.reshape(activation.shape[-2:])
        if added.shape[-1] != activation.shape[-1]:
            raise ValueError(
                f"steering vector has size {vector.shape[-1]} but {hook.name} has {activation.shape[-1]} features"
                + (f" per head ({activation.shape[-2]} heads)" if activation.ndim == 4 else "")
            )
        mask = unit_mask(activation, positions, heads)
        return activation + mask * (scale * added.to(activation.device, activation.dtype))

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


def unit_mask(
    activation: torch.Tensor,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
) -> torch.Tensor:
    """Boolean mask broadcastable to ``activation`` [batch, pos, ...] selecting ``positions`` (dim 1), ``heads``
    (dim 2 of [batch, pos, head, d_head]) and ``neurons`` (the last dim, e.g. MLP units of ``mlp.hook_post``);
    None selects all. Out-of-range indices raise IndexError naming the valid range."""
    shape = [1] * activation.ndim
    mask = torch.ones(shape, dtype=torch.bool, device=activation.device)
    dims = [(1, positions, "position")]
    if heads is not None:
        if activation.ndim != 4:
            raise ValueError(
                f"heads= needs a per-head activation [batch, pos, head, d_head] (hook_q/k/v/z); got shape "
                f"{tuple(activation.shape)}"
            )
        dims.append((2, heads, "head"))
    dims.append((activation.ndim - 1, neurons, "unit"))
    for dim, chosen, what in dims:
        if chosen is None:
            continue
        size = activation.shape[dim]
        bad = [i for i in chosen if not -size <= int(i) < size]
        if bad:
            raise IndexError(f"{what}(s) {bad} out of range for size {size} (valid: 0..{size - 1})")
        axis = torch.zeros(size, dtype=torch.bool, device=activation.device)
        axis[[int(i) % size for i in chosen]] = True
        view = [1] * activation.ndim
        view[dim] = size
        mask = mask & axis.view(view)
    return mask


# ---------------------------------------------------------------------------------------------- as data
KINDS = ("zero", "mean", "steer", "patch")


@dataclass(frozen=True)
class Intervention:
    """One editable, JSON-able intervention on one hook.

    ``kind``: "zero" (set to 0), "mean" (replace by the mean over the tokens of ``source``, a text, or of the
    prompt itself when ``source`` is None), "steer" (add ``scale · vector``) or "patch" (copy the activation of
    the prompt ``source``, which must have as many tokens as the prompt). ``positions`` / ``heads`` (per-head
    hooks) / ``neurons`` (last dim, e.g. ``mlp.hook_post`` units) restrict it; None means all. ``label`` says
    where a steering vector came from (e.g. "SAE x latent 12").
    """

    kind: str
    hook: str
    positions: Sequence[int] | None = None  # stored as tuples (hashable, JSON-able)
    heads: Sequence[int] | None = None
    neurons: Sequence[int] | None = None
    vector: Sequence[float] | None = None
    scale: float = 1.0
    source: str | None = None
    label: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"intervention kind {self.kind!r} is not one of {KINDS}")
        if self.kind == "steer" and not self.vector:
            raise ValueError(
                f"a steering intervention on {self.hook} needs a vector (an SAE latent, probe or code)"
            )
        if self.kind == "patch" and not self.source:
            raise ValueError(f"a patch on {self.hook} needs a source prompt to copy the activation from")
        for name in ("positions", "heads", "neurons"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(i) for i in value))
        if self.vector is not None:
            object.__setattr__(self, "vector", tuple(float(v) for v in self.vector))

    @classmethod
    def steer(cls, hook: str, vector: torch.Tensor, scale: float = 1.0, **kwargs: Any) -> Intervention:
        """A steering intervention adding ``scale · vector`` ([d]) at ``hook``."""
        return cls(
            "steer", hook, vector=tuple(vector.detach().double().flatten().tolist()), scale=scale, **kwargs
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Intervention:
        return cls(**dict(data))

    def describe(self) -> str:
        """One line for a list of interventions, e.g. "steer blocks.1.hook_resid_post ×4 (SAE x latent 3)"."""
        where = [
            f"{name} {list(v)}" for name in ("positions", "heads", "neurons") if (v := getattr(self, name))
        ]
        what = {
            "zero": "zero-ablate",
            "mean": "mean-ablate",
            "steer": f"steer ×{self.scale:g}",
            "patch": f"patch from {self.source!r}",
        }[self.kind]
        return " ".join([what, self.hook, *where, f"({self.label})" if self.label else ""]).strip()


def intervention_hooks(
    model: Any, interventions: Sequence[Intervention], tokens: torch.Tensor
) -> list[tuple]:
    """``fwd_hooks`` for a stack of interventions on a HookedModel run on ``tokens`` [1, pos].

    Every hook must be an exact hook name of the model. Means and patch donors are captured in clean runs (without
    the stack) before any hook is attached; patches copy the donor's first ``pos`` positions, so the hooks also
    apply while a continuation is generated. Several interventions on one hook apply in stack order.
    """
    for iv in interventions:
        if model.resolve(iv.hook) != [iv.hook]:
            raise ValueError(
                f"intervention hook {iv.hook!r} is not one hook of {model.cfg.name}; give its exact name"
            )
    donors: dict[int, torch.Tensor] = {}
    for i, iv in enumerate(interventions):
        if iv.kind in ("mean", "patch"):
            text = iv.source
            ids = tokens if text is None else model.to_tokens(text)
            if iv.kind == "patch" and ids.shape[1] != tokens.shape[1]:
                raise ValueError(
                    f"patch source {text!r} has {ids.shape[1]} tokens but the prompt has {tokens.shape[1]}; patching "
                    "copies position by position: use a source prompt of the same length"
                )
            with torch.no_grad(), model.capture([iv.hook], device=None) as cache:
                model(ids.to(model.device))
            donor = cache[iv.hook]
            donors[i] = donor.mean(dim=(0, 1), keepdim=True) if iv.kind == "mean" else donor
    return [(iv.hook, _intervention_fn(iv, donors.get(i))) for i, iv in enumerate(interventions)]


def _intervention_fn(iv: Intervention, donor: torch.Tensor | None):
    if iv.kind == "steer":
        assert iv.vector is not None
        return steering(torch.tensor(iv.vector), iv.scale, iv.positions, iv.heads)

    def hook(activation: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        mask = unit_mask(activation, iv.positions, iv.heads, iv.neurons)
        if iv.kind == "zero":
            return activation.masked_fill(mask, 0)
        assert donor is not None
        value = donor.to(activation.device, activation.dtype)
        if iv.kind == "patch":
            length = min(value.shape[1], activation.shape[1])
            value = torch.cat([value[:, :length], activation[:, length:]], dim=1)
            mask = mask & (torch.arange(activation.shape[1], device=mask.device) < length).view(
                [1, -1] + [1] * (activation.ndim - 2)
            )
        return torch.where(mask, value.expand_as(activation), activation)

    return hook


@contextlib.contextmanager
def apply_interventions(
    model: Any, interventions: Sequence[Intervention], tokens: torch.Tensor
) -> Iterator[Any]:
    """Attach a stack of interventions (:func:`intervention_hooks`) for the duration of the block."""
    with model.hooks(intervention_hooks(model, interventions, tokens)):
        yield model
