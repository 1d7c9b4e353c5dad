"""The SAE architecture registry: architecture name -> SAE subclass, a leaf module.

Architectures add themselves with ``@register(name)`` (``relu``, ``topk``, ...; the package imports them all);
:mod:`workbench.circuits.sae.base` checks a config's architecture against it and the format readers
(:mod:`workbench.circuits.sae.formats`) look classes up in it. It imports neither.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workbench.circuits.sae.base import SAE, SAEConfig

__all__ = ["K_ARCHITECTURES", "REGISTRY", "create_sae", "register"]

REGISTRY: dict[str, type[SAE]] = {}
K_ARCHITECTURES = ("topk", "batchtopk", "matryoshka_batchtopk")  # those that take k


def register(name: str) -> Callable[[type[SAE]], type[SAE]]:
    """Class decorator adding an SAE architecture to REGISTRY under `name`."""

    def add(cls: type[SAE]) -> type[SAE]:
        cls.architecture = name
        REGISTRY[name] = cls
        return cls

    return add


def create_sae(cfg: SAEConfig) -> SAE:
    """Build a freshly initialised SAE of `cfg.architecture`."""
    return REGISTRY[cfg.architecture](cfg)
