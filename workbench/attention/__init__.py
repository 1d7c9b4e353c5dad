"""Attention for the hooked models: torch SDPA, a materialised eager path, and the fused Triton kernel.

``attend`` (:mod:`workbench.attention.dispatch`) is the single entry point the adapters call; statistics are defined
in :mod:`workbench.attention.reference` and averaged over a corpus in :mod:`workbench.attention.statistics`;
``install_attention`` lives in :mod:`workbench.attention.install`. The package itself imports nothing heavy (the
``workbench attention`` command, ``workbench.analyses.attention.cli``, starts without importing torch); the names
below load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workbench.attention.dispatch import PATHS, AttentionOutput, attend
    from workbench.attention.install import install_attention, kernel_statistics, uninstall_attention

__all__ = [
    "AttentionOutput",
    "attend",
    "install_attention",
    "uninstall_attention",
    "kernel_statistics",
    "PATHS",
]
_HOME = {
    "AttentionOutput": "dispatch",
    "attend": "dispatch",
    "PATHS": "dispatch",
    "install_attention": "install",
    "uninstall_attention": "install",
    "kernel_statistics": "install",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f"workbench.attention.{_HOME[name]}"), name)
    raise AttributeError(f"module 'workbench.attention' has no attribute {name!r}")
