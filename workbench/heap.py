"""The process heap: hand freed memory back to the operating system between large, short-lived allocations.

glibc keeps freed blocks of a few MB in its heap once its dynamic mmap threshold has grown past them, so a loop that
allocates and frees such tensors (activation batches, shard buffers, attribution chunks) holds its highest point's
memory for the rest of the process. Measured in benchmarks/RESULTS.md: a neuron-path run peaked at 4.2 GB that way
against 1.1 GB with a trim after each chunk.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["release_free_heap"]


def release_free_heap() -> None:
    """glibc's ``malloc_trim(0)``: return the heap's free pages to the OS (no effect elsewhere than Linux/glibc)."""
    if sys.platform.startswith("linux"):
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
        if trim is not None:
            trim(0)
