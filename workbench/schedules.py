"""The learning-rate schedule every trainer uses (zoo models, SAEs / transcoders): linear warm-up, then decay."""

from __future__ import annotations

import math

DECAYS = ("linear", "cosine")


def lr_factor(
    step: int,
    *,
    steps: int,
    warmup: int,
    decay_start: int | None,
    decay: str = "linear",
    floor: float = 0.0,
) -> float:
    """Learning-rate multiplier (a float, no tensors) at 0-based ``step`` of a ``steps``-step run.

    Linear warm-up ``(step + 1) / warmup`` over the first ``warmup`` steps, then 1; from ``decay_start`` on (never
    when it is None) that factor is scaled down to ``floor`` at ``steps``, along a straight line (``"linear"``) or
    half a cosine (``"cosine"``). A decay that starts inside the warm-up scales the warm-up factor.
    """
    if decay not in DECAYS:
        raise ValueError(f"decay={decay!r} is not a schedule; use one of {', '.join(DECAYS)}")
    warm = (step + 1) / warmup if step < warmup else 1.0
    if decay_start is None or step < decay_start:
        return warm
    span = max(steps - decay_start, 1)
    if decay == "cosine":
        progress = (step - decay_start) / span
        return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    return warm * (floor + (1 - floor) * max(0.0, (steps - step) / span))
