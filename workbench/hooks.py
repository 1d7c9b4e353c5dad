"""Named hook points, the activation cache, and hook-name resolution shared by every model family."""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

HookFn = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]


class HookNameError(KeyError):
    """A hook name or pattern matched no hook point; the message lists the closest valid names."""

    def __str__(self) -> str:  # KeyError quotes its argument; show the message as written
        return str(self.args[0])


@dataclass(eq=False)
class HookPoint:
    """One named place in a model's forward pass where activations can be read or replaced.

    Functions run in the order they were added as ``fn(activation, hook)``; a returned tensor replaces the
    activation for the rest of the forward pass, ``None`` leaves it as it is.
    """

    name: str
    fns: list[HookFn] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return bool(self.fns)

    def __call__(self, activation: torch.Tensor) -> torch.Tensor:
        for fn in tuple(self.fns):
            replaced = fn(activation, self)
            if replaced is not None:
                if replaced.shape != activation.shape:
                    raise ValueError(
                        f"hook on {self.name!r} returned shape {tuple(replaced.shape)}, expected "
                        f"{tuple(activation.shape)}; a replacement must keep the activation's shape"
                    )
                activation = replaced
        return activation


def resolve_hook_names(patterns: str | Iterable[str], valid: Sequence[str]) -> list[str]:
    """Expand exact names and globs (``blocks.*.hook_resid_post``) against ``valid``, keeping model order.

    Raises HookNameError naming the closest valid hook names for any pattern that matches nothing.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    valid_set = set(valid)
    wanted: set[str] = set()
    for pattern in patterns:
        if pattern in valid_set:
            wanted.add(pattern)
            continue
        matched = [n for n in valid if fnmatch.fnmatchcase(n, pattern)] if _is_glob(pattern) else []
        if not matched:
            raise HookNameError(_unknown_hook_message(pattern, valid))
        wanted.update(matched)
    return [n for n in valid if n in wanted]


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _unknown_hook_message(pattern: str, valid: Sequence[str]) -> str:
    generic = sorted({re.sub(r"\.\d+\.", ".{l}.", n) for n in valid})
    close = difflib.get_close_matches(pattern, valid, n=5, cutoff=0.5)
    close += [
        g for g in difflib.get_close_matches(re.sub(r"\.\d+\.", ".{l}.", pattern), generic, n=3, cutoff=0.5)
    ]
    hint = ", ".join(dict.fromkeys(close)) or ", ".join(generic[:12])
    return (
        f"unknown hook name {pattern!r}; closest valid names: {hint}. "
        f"See model.hook_names() for all {len(valid)} hook points; globs such as 'blocks.*.hook_resid_post' work."
    )


class ActivationCache(Mapping[str, torch.Tensor]):
    """Captured activations indexed by hook name, as TransformerLens's cache is.

    Shapes follow docs/ARCHITECTURE.md, e.g. ``cache["blocks.0.hook_resid_post"]`` is [batch, pos, d_model].
    """

    def __init__(self, n_layers: int) -> None:
        self._data: dict[str, torch.Tensor] = {}
        self.n_layers = n_layers

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._data[name]
        except KeyError:
            raise HookNameError(
                f"{name!r} was not captured; captured: {', '.join(self._data) or 'nothing'} "
                "(was the forward pass run inside the capture block?)"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self._data[name] = value

    def stack(self, kind: str) -> torch.Tensor:
        """Stack one activation kind over layers: ``stack("resid_post")`` -> [layer, batch, pos, d_model].

        ``kind`` is the hook name without ``blocks.{l}.`` and ``hook_`` (e.g. "resid_post", "attn.z",
        "mlp.post", "attn.entropy"); every layer must have been captured.
        """
        suffix = kind if kind.startswith(("hook_", "attn.", "mlp.")) else f"hook_{kind}"
        if "." in suffix and not suffix.split(".")[-1].startswith("hook_"):
            head, tail = suffix.rsplit(".", 1)
            suffix = f"{head}.hook_{tail}"
        names = [f"blocks.{layer}.{suffix}" for layer in range(self.n_layers)]
        missing = [n for n in names if n not in self._data]
        if missing:
            raise HookNameError(
                f"cannot stack {kind!r}: not captured for {len(missing)} layer(s), e.g. {missing[0]!r}; "
                f"capture 'blocks.*.{suffix}'"
            )
        return torch.stack([self._data[n] for n in names])

    def to(self, device: str | torch.device) -> ActivationCache:
        moved = ActivationCache(self.n_layers)
        for name, value in self._data.items():
            moved[name] = value.to(device)
        return moved
