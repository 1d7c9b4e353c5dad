"""Token rows for codebooks from any dataset: rows of one length through the dataset's one iterator
(``Dataset.batches``; text is packed into full rows), a seeded held-out split of them, and the per-token label
arrays a token dataset carries (``zoo:tokfsm``: ``labels["fsm_state"]`` [n, pos]) cut to the same rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from workbench.circuits.codebook.module import CodebookError
from workbench.datasets import Dataset

EVAL_FRACTION = 0.25


@dataclass
class TokenRows:
    """Training rows, held-out rows and the held-out rows' labels, all [n, pos] of one length; ``source`` records
    how they were read (dataset name, context length, token budget, seed, held-out fraction) so an analysis
    reads the same held-out rows again."""

    train: torch.Tensor
    eval: torch.Tensor
    eval_labels: dict[str, torch.Tensor] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)


def per_token_labels(data: Dataset) -> dict[str, np.ndarray]:
    """The label arrays of a token dataset that hold one label per token ([n, pos], like ``data.token_ids``)."""
    if data.token_ids is None:
        return {}
    shape = tuple(data.token_ids.shape)
    return {name: np.asarray(v) for name, v in data.labels.items() if tuple(np.shape(v)) == shape}


def equal_length_rows(
    model: Any, data: Dataset, *, context_length: int = 128, max_tokens: int | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """All rows of ``data`` in source order, cut to one length L: (ids [n, L], {label: [n, L]}).

    Text is packed (documents joined into rows of ``context_length`` tokens); token rows are read as stored. L is
    the length that keeps the most tokens (rows shorter than L are dropped); labels are per-token arrays of a
    token dataset (``per_token_labels``), cut like their rows.
    """
    rows = data.token_rows(
        model.tokenizer,
        context_length=context_length,
        batch_size=64,
        packing=data.modality == "text",
        max_tokens=max_tokens,
    )
    lengths = np.array([len(r) for r in rows])
    ordered = np.sort(lengths)[::-1]
    width = int(ordered[np.argmax(ordered * np.arange(1, len(ordered) + 1))]) if len(rows) else 0
    keep = np.flatnonzero(lengths >= width) if width > 1 else np.array([], dtype=np.int64)
    if len(keep) < 2:
        raise CodebookError(
            f"dataset {data.name!r} gives {len(keep)} row(s) of at least 2 tokens at --context-length "
            f"{context_length}; codebooks need several rows to train and evaluate on: pass more data, a smaller "
            "--context-length or a larger --max-tokens"
        )
    tokens = torch.tensor([rows[i][:width] for i in keep], dtype=torch.long)
    data.check_vocabulary(tokens, model)
    labels = {}
    for name, array in per_token_labels(data).items():
        cut = []
        for i in keep:
            row = array[i]
            if data.token_mask is not None:
                row = row[data.token_mask[i].bool().numpy()]
            cut.append(row[:width])
        labels[name] = torch.as_tensor(np.stack(cut), dtype=torch.long)
    return tokens, labels


def split_rows(
    n: int, eval_fraction: float = EVAL_FRACTION, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded split of row indices 0..n−1: (train [n − m], held out [m]), m = round(n · eval_fraction) ≥ 1."""
    if not 0 < eval_fraction < 1:
        raise CodebookError(f"eval_fraction={eval_fraction} must lie strictly between 0 and 1")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = min(n - 1, max(1, round(n * eval_fraction)))
    return order[held:].sort().values, order[:held].sort().values


def read_rows(
    model: Any,
    data: Dataset,
    *,
    context_length: int = 128,
    max_tokens: int | None = None,
    seed: int = 0,
    eval_fraction: float = EVAL_FRACTION,
) -> TokenRows:
    """``equal_length_rows`` of ``data`` split by ``split_rows``: training rows, held-out rows and their labels."""
    tokens, labels = equal_length_rows(model, data, context_length=context_length, max_tokens=max_tokens)
    train, held = split_rows(len(tokens), eval_fraction, seed)
    source = {
        "dataset": data.name,
        "context_length": context_length,
        "max_tokens": max_tokens,
        "seed": seed,
        "eval_fraction": eval_fraction,
    }
    return TokenRows(tokens[train], tokens[held], {k: v[held] for k, v in labels.items()}, source)
