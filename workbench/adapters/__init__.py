"""Model families: the adapter protocol (``base``), the registry (``registry``), one file per family."""

from workbench.adapters import bert, gpt2, gpt_neox, llama, vit  # noqa: F401  (register them)
from workbench.adapters.registry import REGISTRY, adapter_for

__all__ = ["REGISTRY", "adapter_for"]
