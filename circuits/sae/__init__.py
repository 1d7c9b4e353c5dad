"""Sparse autoencoders and transcoders: architectures, trainer, evaluations, SAELens interop, feature pages, the
analysis that trains and evaluates them on any model and dataset (``circuits.sae.analysis``) and its commands
(``circuits.sae.cli``).

The package names below are loaded on first access (PEP 562): importing the package, as mounting its commands
does, loads no torch, so ``workbench --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workbench.circuits.sae.base import SAE, SAEConfig, SAEInputError
    from workbench.circuits.sae.formats import load_sae
    from workbench.circuits.sae.registry import REGISTRY, create_sae

__all__ = ["REGISTRY", "SAE", "SAEConfig", "SAEInputError", "create_sae", "load_sae"]
_HOMES = {
    "SAE": "base",
    "SAEConfig": "base",
    "SAEInputError": "base",
    "load_sae": "formats",
    "create_sae": "registry",
}


def __getattr__(name: str) -> Any:
    """The public names, imported from their modules when first asked for (REGISTRY with every built-in
    architecture registered)."""
    if name == "REGISTRY":
        return importlib.import_module(f"{__name__}.registry").architectures()
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
