"""The Hugging Face adapter registry: transformers ``model_type`` -> adapter class, a leaf module.

Family files add themselves with ``@register`` (each class lists the ``model_types`` it reads; the package imports
every family file); :meth:`workbench.model.HookedModel.from_hf` looks a model's ``config.model_type`` up here. A
new family is one file in ``workbench/adapters/`` with a decorated :class:`~workbench.adapters.base.HFAdapter`
subclass, imported by the package's ``__init__``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workbench.adapters.base import HFAdapter

__all__ = ["REGISTRY", "adapter_for", "register"]

REGISTRY: dict[str, type[HFAdapter]] = {}


def register(cls: type[HFAdapter]) -> type[HFAdapter]:
    """Class decorator adding a Hugging Face family adapter to REGISTRY under each of its ``model_types``."""
    for model_type in cls.model_types:
        REGISTRY[model_type] = cls
    return cls


def adapter_for(model_type: str | None) -> HFAdapter | None:
    """A fresh adapter for a transformers ``model_type``, or None when no family file reads it."""
    cls = REGISTRY.get(model_type or "")
    return None if cls is None else cls()
