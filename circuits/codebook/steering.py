"""Generation with codebooks in place: greedy continuation with a codebook forced to a code (or with codes disabled)
on every step, the way codebook features steer a model (``CodebookSet.steer`` holds the rules)."""

from __future__ import annotations

from typing import Any

import torch

from workbench.circuits.codebook.module import CodebookSet


def generate(
    model: Any, codebooks: CodebookSet, tokens: torch.Tensor, n_new: int, steer: dict[str, Any] | None = None
) -> torch.Tensor:
    """Greedy continuation of ``tokens`` [batch, pos] by ``n_new`` tokens with the codebooks in place and
    ``steer`` (keyword arguments of ``CodebookSet.steer``, including ``site``) active on every step. Each step
    reruns the whole sequence, so a negative forced position (``force={-1: code}``) follows the newest token and
    a non-negative one stays on that token."""
    out = tokens.to(model.device)
    with torch.no_grad(), model.hooks(codebooks.hooks()):
        for _ in range(n_new):
            if steer:
                with codebooks.steer(**steer):
                    logits = model(out)
            else:
                logits = model(out)
            out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out
