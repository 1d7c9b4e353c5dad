"""The SAE architecture registry: architecture name -> SAE subclass, a leaf module.

Architectures add themselves with ``@register(name)`` (``relu``, ``topk``, ...); :func:`architectures` imports the
built-in modules (``BUILTIN_MODULES``) on first use, so importing the package (the command line mounts
``circuits.sae.cli``) loads no torch. :mod:`workbench.circuits.sae.base` checks a config's architecture against it
and the format readers (:mod:`workbench.circuits.sae.formats`) look classes up in it. It imports neither.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workbench.circuits.sae.base import SAE, SAEConfig

__all__ = ["BUILTIN_MODULES", "K_ARCHITECTURES", "REGISTRY", "architectures", "create_sae", "register"]

REGISTRY: dict[str, type[SAE]] = {}
K_ARCHITECTURES = ("topk", "batchtopk", "matryoshka_batchtopk")  # those that take k
# The modules of this package that register the built-in architectures (imported by name: this module stays a leaf).
BUILTIN_MODULES = ("relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka")


def register(name: str) -> Callable[[type[SAE]], type[SAE]]:
    """Class decorator adding an SAE architecture to REGISTRY under `name`."""

    def add(cls: type[SAE]) -> type[SAE]:
        cls.architecture = name
        REGISTRY[name] = cls
        return cls

    return add


def architectures() -> dict[str, type[SAE]]:
    """REGISTRY with every built-in architecture registered (their modules imported on the first call)."""
    for module in BUILTIN_MODULES:
        importlib.import_module(f"{__package__}.{module}")
    return REGISTRY


def create_sae(cfg: SAEConfig) -> SAE:
    """Build a freshly initialised SAE of `cfg.architecture`."""
    return architectures()[cfg.architecture](cfg)
