"""ModelSpec: the shape facts of a wrapped model, in a module of its own so adapters and the model can both import
it at module top (no import loop)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class ModelSpec:
    """Shape facts of a wrapped model, shared by every family."""

    family: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    causal: bool
    parallel_residual: bool = False
    name: str = ""
    checkpoint: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
