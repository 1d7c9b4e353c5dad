"""Codebooks and their container: ``Codebook`` (one VQ bottleneck on one hook site), ``CodebookSet`` (codebooks keyed by
site, attached to a HookedModel through hooks, recording the chosen codes and steering them), their configs, and
save / load (``codebooks.safetensors`` carries the configs in its metadata).

A codebook LayerNorms its input u ([..., d], or [..., n_groups, d] per head on ``attn.hook_z``), picks its top-k
codes by dot or cosine similarity and outputs the sum of those code vectors; the gradient passes straight through
to u. A forced code replaces the whole output (exactly that code vector, once, whatever k is); disabled codes are
never chosen.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from workbench.faults import crash_point
from workbench.fileio import atomic_save_tensors, atomic_write_json

FORMAT = "workbench-codebooks-1"
SITE_SUFFIXES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "hook_attn_out")


class CodebookError(ValueError):
    """Bad codebook input: the message names the problem and the fix."""


@dataclass(frozen=True)
class CodebookConfig:
    """One codebook: ``n_groups`` independent codebooks (heads) of ``n_codes`` codes of size ``d``."""

    site: str
    d: int
    n_codes: int = 200
    k: int = 1
    n_groups: int = 1
    similarity: str = "dot"

    def __post_init__(self) -> None:
        if self.similarity not in ("dot", "cosine"):
            raise CodebookError(f"similarity must be 'dot' or 'cosine', got {self.similarity!r}")
        if not 1 <= self.k <= self.n_codes:
            raise CodebookError(f"k={self.k} must be between 1 and n_codes={self.n_codes}; lower k")


class Codebook(nn.Module):
    """VQ bottleneck: input [..., d] (or [..., n_groups, d] per head) -> sum of its top-k codes, same shape."""

    def __init__(self, config: CodebookConfig) -> None:
        super().__init__()
        self.config = config
        self.codes = nn.Parameter(
            torch.randn(config.n_groups, config.n_codes, config.d) / math.sqrt(config.d)
        )

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.n_groups > 1:
            if x.shape[-2:] != (c.n_groups, c.d):
                raise CodebookError(f"{c.site}: expected [..., {c.n_groups}, {c.d}], got {tuple(x.shape)}")
            return x.reshape(-1, c.n_groups, c.d)
        if x.shape[-1] != c.d:
            raise CodebookError(f"{c.site}: expected last dimension {c.d}, got {tuple(x.shape)}")
        return x.reshape(-1, 1, c.d)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Similarity of LayerNorm-ed inputs to the codes: [rows, n_groups, d] -> [rows, n_groups, n_codes]."""
        u = F.layer_norm(x, (x.shape[-1],))
        codes: torch.Tensor = self.codes
        if self.config.similarity == "cosine":
            u, codes = F.normalize(u, dim=-1), F.normalize(codes, dim=-1)
        return torch.einsum("rgd,gcd->rgc", u, codes)

    def check_disabled(self, disabled: Sequence[int]) -> None:
        """Raise when disabling ``disabled`` leaves fewer than k codes to choose from."""
        left = self.config.n_codes - len(set(disabled))
        if left < self.config.k:
            raise CodebookError(
                f"{self.config.site}: disabling {len(set(disabled))} of {self.config.n_codes} codes leaves {left} "
                f"enabled, fewer than k={self.config.k}; disable at most {self.config.n_codes - self.config.k}"
            )

    def select_scored(
        self, x: torch.Tensor, disabled: Sequence[int] = (), forced: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices [rows, n_groups, k], their similarity scores) for [rows, n_groups, d].

        ``forced`` [rows, n_groups] holds a code per row and group (−1 = not forced); a forced row's indices
        become [code, −1, …, −1]: the output is exactly that code, once (−1 slots decode to zero, score −inf)."""
        raw = self.scores(x)
        scores = raw
        if disabled:
            self.check_disabled(disabled)
            scores = raw.clone()
            scores[..., list(disabled)] = -torch.inf
        top = scores.topk(self.config.k, dim=-1)
        idx, chosen = top.indices, top.values
        if forced is not None:
            forced = forced.to(idx.device)
            slots = torch.full_like(idx, -1)
            slots[..., 0] = forced
            mask = (forced >= 0)[..., None]
            idx = torch.where(mask, slots, idx)
            own = raw.gather(-1, idx.clamp(min=0))  # a forced code's similarity, even if it is disabled
            forced_score = torch.where(idx >= 0, own, torch.full_like(own, -torch.inf))
            chosen = torch.where(mask, forced_score, chosen)
        return idx, chosen

    def select(
        self, x: torch.Tensor, disabled: Sequence[int] = (), forced: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Top-k code indices [rows, n_groups, k] for [rows, n_groups, d] (``forced`` as in ``select_scored``)."""
        return self.select_scored(x, disabled, forced)[0]

    def decode(self, idx: torch.Tensor) -> torch.Tensor:
        """Sum of the chosen codes: indices [rows, n_groups, k] -> [rows, n_groups, d] (index −1 adds nothing)."""
        groups = torch.arange(self.config.n_groups, device=idx.device)[None, :, None]
        vectors = self.codes[groups, idx.clamp(min=0)]
        return (vectors * (idx >= 0)[..., None].to(vectors.dtype)).sum(-2)

    def encode(
        self, x: torch.Tensor, disabled: Sequence[int] = (), forced: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(output shaped like x, indices [rows, n_groups, k], scores [rows, n_groups, k])."""
        flat = self._grouped(x)
        idx, scores = self.select_scored(flat.detach(), disabled, forced)
        out = self.decode(idx) + (flat - flat.detach())
        return out.reshape(x.shape), idx, scores

    def forward(
        self, x: torch.Tensor, disabled: Sequence[int] = (), forced: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(output shaped like x with a straight-through gradient to x, indices [rows, n_groups, k])."""
        out, idx, _ = self.encode(x, disabled, forced)
        return out, idx


@dataclass
class _SiteState:
    codebook: Codebook
    last_codes: torch.Tensor | None = None
    last_scores: torch.Tensor | None = None
    last_input: torch.Tensor | None = None
    disabled: list[int] = field(default_factory=list)
    forced: dict[int, tuple[int, int | None]] = field(default_factory=dict)


class CodebookSet(nn.Module):
    """Codebooks keyed by hook site, attached to a HookedModel through ``hooks()``."""

    def __init__(self, configs: Sequence[CodebookConfig]) -> None:
        super().__init__()
        codebooks = [Codebook(c) for c in configs]
        self.books = nn.ModuleList(codebooks)
        self.state = {c.site: _SiteState(book) for c, book in zip(configs, codebooks, strict=True)}
        self.record_inputs = False

    @property
    def codebooks(self) -> list[Codebook]:
        """The codebooks in config order (``books`` is their ModuleList, for parameters and ``.to``)."""
        return [cast(Codebook, book) for book in self.books]

    @property
    def sites(self) -> list[str]:
        return list(self.state)

    def __getitem__(self, site: str) -> Codebook:
        return self._site(site).codebook

    def _site(self, site: str) -> _SiteState:
        if site not in self.state:
            raise CodebookError(f"no codebook on site {site!r}; codebook sites: {', '.join(self.state)}")
        return self.state[site]

    def _check_code(self, site: str, code: int) -> int:
        n = self._site(site).codebook.config.n_codes
        if not 0 <= int(code) < n:
            raise CodebookError(f"code {code} is out of range for {site} (valid codes: 0..{n - 1})")
        return int(code)

    def _hook(self, act: torch.Tensor, hook: Any) -> torch.Tensor:
        state = self.state[hook.name]
        book = state.codebook
        if book.codes.device != act.device:
            raise CodebookError(
                f"the codebook on {hook.name} is on {book.codes.device} but the activations are on {act.device}; "
                f"move the codebooks with codebooks.to({str(act.device)!r})"
            )
        lead = act.shape[:2]
        forced = None
        if state.forced:
            forced = torch.full((*lead, book.config.n_groups), -1, dtype=torch.long)
            for position, (code, group) in state.forced.items():
                if position >= lead[1] or position < -lead[1]:
                    raise CodebookError(
                        f"forced position {position} is outside the sequence length {lead[1]}"
                    )
                if group is None:
                    forced[:, position] = code
                else:
                    forced[:, position, group] = code
            forced = forced.reshape(-1, book.config.n_groups).to(act.device)
        out, idx, scores = book.encode(act, state.disabled, forced)
        state.last_codes = idx.reshape(*lead, book.config.n_groups, book.config.k).detach()
        state.last_scores = scores.reshape(*lead, book.config.n_groups, book.config.k).detach()
        if self.record_inputs:
            state.last_input = act.detach()
        return out

    def hooks(self) -> list[tuple[str, Any]]:
        """``fwd_hooks`` putting every codebook in its site: ``model.hooks(codebooks.hooks())``."""
        return [(site, self._hook) for site in self.state]

    def codes(self, site: str) -> torch.Tensor:
        """Codes chosen in the last forward pass at ``site``: [batch, pos, n_groups, k] (−1: empty slot of a
        forced position)."""
        codes = self._site(site).last_codes
        if codes is None:
            raise CodebookError(
                f"no forward pass has run with the codebook on {site}; run the model in hooks()"
            )
        return codes

    def scores(self, site: str) -> torch.Tensor:
        """Similarity of the codes chosen in the last forward pass to their inputs: [batch, pos, n_groups, k]."""
        self.codes(site)
        scores = self._site(site).last_scores
        if scores is None:
            raise CodebookError(
                f"no forward pass has run with the codebook on {site}; run the model in hooks()"
            )
        return scores

    @contextmanager
    def steer(
        self,
        site: str,
        force: dict[int, int] | None = None,
        disable: Sequence[int] = (),
        group: int | None = None,
    ) -> Iterator[CodebookSet]:
        """Within the block, force ``{position: code}`` at ``site`` (one head if ``group``, else every head) and
        never choose the ``disable``d codes. A forced position's output is exactly the forced code vector, once,
        whatever k is (its other k−1 slots are empty, −1 in ``codes()``). Negative positions count from the end,
        so ``{-1: code}`` forces the newest token at every step of ``generate``. Disabling must leave at least k
        codes enabled."""
        state = self._site(site)
        force = {int(p): self._check_code(site, c) for p, c in (force or {}).items()}
        disable = [self._check_code(site, c) for c in disable]
        if group is not None and not 0 <= group < state.codebook.config.n_groups:
            raise CodebookError(
                f"group {group} out of range for {site} ({state.codebook.config.n_groups} heads)"
            )
        disabled = sorted(set(state.disabled) | set(disable))
        state.codebook.check_disabled(disabled)
        saved = (dict(state.forced), list(state.disabled))
        state.forced.update({p: (c, group) for p, c in force.items()})
        state.disabled = disabled
        try:
            yield self
        finally:
            state.forced, state.disabled = saved

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``codebooks.safetensors`` (codes, with the configs and ``extra`` in its metadata, so the file is
        complete on its own) and a readable copy of that metadata in ``config.json``, each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "configs": [asdict(book.config) for book in self.codebooks],
            **(extra or {}),
        }
        tensors = {f"codes.{i}": book.codes.detach() for i, book in enumerate(self.codebooks)}
        atomic_save_tensors(directory / "codebooks.safetensors", tensors, {"codebooks": json.dumps(meta)})
        crash_point("codebook.codes_saved")
        atomic_write_json(directory / "config.json", meta)
        return directory

    @staticmethod
    def metadata(directory: str | Path) -> dict[str, Any]:
        """The metadata saved with the codebooks in ``directory`` (configs, step, losses)."""
        path = Path(directory) / "codebooks.safetensors"
        if not path.exists():
            raise CodebookError(
                f"{directory} holds no codebooks (codebooks.safetensors); train them with train_codebooks"
            )
        with safe_open(str(path), "pt") as handle:
            meta = (handle.metadata() or {}).get("codebooks")
        if meta is None:  # written before the metadata was embedded
            return json.loads((Path(directory) / "config.json").read_text())
        return json.loads(meta)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device | None = None) -> CodebookSet:
        """Codebooks saved by ``save`` (on ``device``, default CPU)."""
        directory = Path(directory)
        meta = cls.metadata(directory)
        books = cls([CodebookConfig(**c) for c in meta["configs"]])
        tensors = load_file(directory / "codebooks.safetensors")
        with torch.no_grad():
            for i, book in enumerate(books.codebooks):
                book.codes.copy_(tensors[f"codes.{i}"])
        return books.to(device) if device is not None else books


def site_config(model: Any, site: str, n_codes: int, k: int = 1, similarity: str = "dot") -> CodebookConfig:
    """Config for ``site`` on ``model``: per-head codebooks on ``attn.hook_z``, one codebook elsewhere."""
    names = model.resolve(site)
    if len(names) != 1:
        raise CodebookError(
            f"site {site!r} matches {len(names)} hooks; give one exact hook name per codebook"
        )
    cfg = model.cfg
    if site.endswith("attn.hook_z"):
        return CodebookConfig(site, cfg.d_head, n_codes, k, cfg.n_heads, similarity)
    if site.endswith(SITE_SUFFIXES):
        return CodebookConfig(site, cfg.d_model, n_codes, k, 1, similarity)
    raise CodebookError(
        f"site {site!r} is not a codebook site; use blocks.L.attn.hook_z, blocks.L.hook_mlp_out or "
        "blocks.L.hook_resid_post"
    )
