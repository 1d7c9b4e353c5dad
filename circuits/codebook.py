"""Codebook features (Tamkin et al., "Codebook Features: Sparse and Discrete Interpretability").

A codebook is a vector-quantisation bottleneck on one hook site: the activation u (LayerNorm-ed, per head for
``attn.hook_z``) picks its top-k codes by inner-product or cosine similarity, and the sum of those code vectors
replaces the activation. Gradients pass straight through to u; the codes learn from the downstream loss plus a
reconstruction term. ``CodebookSet`` attaches codebooks to a HookedModel through hooks, records the chosen codes
(and their similarity scores), and steers them: a forced code replaces the whole bottleneck output (the activation
becomes exactly that code vector, once, whatever k is), disabled codes are never chosen.

Purity (``codebook_purity``): for each label value (e.g. an FSM state) its best code is the code most often chosen
on that label's tokens, and purity = P(label | best code), the share of the best code's tokens that carry that
label; recall = P(best code | label). Analysis tables: ``codebook_codes`` and ``codebook_purity``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from workbench.faults import crash_point
from workbench.fileio import atomic_save_tensors, atomic_torch_save, atomic_write_json

CODES_TABLE = "codebook_codes"
PURITY_TABLE = "codebook_purity"
FORMAT = "workbench-codebooks-1"
TRAIN_STATE = "train_state.pt"
TRAIN_STATE_VERSION = 1


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
        codes = self.codes
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
        self.books = nn.ModuleList([Codebook(c) for c in configs])
        self.state = {c.site: _SiteState(book) for c, book in zip(configs, self.books, strict=True)}
        self.record_inputs = False

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

    def check_sites(self, model: Any) -> None:
        """Raise HookNameError (with close matches) when a site does not exist on ``model``."""
        for site in self.state:
            model.resolve(site)

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
        return self._site(site).last_scores

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
        meta = {"format": FORMAT, "configs": [asdict(book.config) for book in self.books], **(extra or {})}
        tensors = {f"codes.{i}": book.codes.detach() for i, book in enumerate(self.books)}
        atomic_save_tensors(directory / "codebooks.safetensors", tensors, {"codebooks": json.dumps(meta)})
        crash_point("codebook.codes_saved")
        atomic_write_json(directory / "config.json", meta)
        return directory

    @staticmethod
    def metadata(directory: str | Path) -> dict[str, Any]:
        """The metadata saved with the codebooks in ``directory`` (configs, step, losses)."""
        from safetensors import safe_open

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
        from safetensors.torch import load_file

        directory = Path(directory)
        meta = cls.metadata(directory)
        books = cls([CodebookConfig(**c) for c in meta["configs"]])
        tensors = load_file(directory / "codebooks.safetensors")
        with torch.no_grad():
            for i, book in enumerate(books.books):
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
    if site.endswith(
        ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "hook_attn_out")
    ):
        return CodebookConfig(site, cfg.d_model, n_codes, k, 1, similarity)
    raise CodebookError(
        f"site {site!r} is not a codebook site; use blocks.L.attn.hook_z, blocks.L.hook_mlp_out or "
        "blocks.L.hook_resid_post"
    )


def kmeans(x: torch.Tensor, n_clusters: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding: points [n, d] -> centres [n_clusters, d] (on x's device; the
    seeding draws come from a CPU generator, so the result does not depend on the device's RNG). With fewer
    distinct points than clusters the surplus centres are duplicates (dead codes, replaced during training)."""
    if x.shape[0] < n_clusters:
        raise CodebookError(
            f"k-means needs at least {n_clusters} rows, got {x.shape[0]}; capture more tokens"
        )
    gen = torch.Generator().manual_seed(seed)
    x = x.double()
    first = torch.randint(x.shape[0], (1,), generator=gen).to(x.device)
    centres = x[first]
    dist = torch.cdist(x, centres).squeeze(1) ** 2
    for _ in range(1, n_clusters):
        weights = (
            dist.cpu() if dist.sum() > 0 else torch.ones(x.shape[0], dtype=x.dtype)
        )  # fewer distinct rows
        pick = torch.multinomial(weights / weights.sum(), 1, generator=gen).to(x.device)
        centres = torch.cat([centres, x[pick]])
        dist = torch.minimum(dist, ((x - x[pick]) ** 2).sum(-1))
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=n_clusters)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
    return centres.float()


def _device(model: Any) -> torch.device:
    parameter = next(iter(model.model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def init_kmeans(codebooks: CodebookSet, model: Any, tokens: torch.Tensor, seed: int = 0) -> None:
    """Initialise every codebook from k-means on the LayerNorm-ed activations of ``tokens`` [batch, pos]."""
    with torch.no_grad(), model.capture(codebooks.sites, device=None) as cache:
        model(tokens.to(_device(model)))
    with torch.no_grad():
        for site in codebooks.sites:
            book = codebooks[site]
            flat = book._grouped(cache[site].to(book.codes.device))
            u = F.layer_norm(flat, (flat.shape[-1],))
            for g in range(book.config.n_groups):
                book.codes[g] = kmeans(u[:, g], book.config.n_codes, seed=seed + g).to(book.codes)


def _next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@dataclass
class TrainReport:
    """Losses of a codebook fine-tune: the loss gap is codebook loss − un-bottlenecked loss (held-out tokens).
    ``steps`` is the step the codebooks are at; ``history`` holds the losses of the steps run by this call."""

    base_loss: float
    codebook_loss: float
    steps: int
    dead_replaced: int
    history: list[float]
    directory: Path | None = None

    @property
    def loss_gap(self) -> float:
        return self.codebook_loss - self.base_loss


def evaluate_loss(model: Any, tokens: torch.Tensor, codebooks: CodebookSet | None = None) -> float:
    """Mean next-token loss on ``tokens`` [batch, pos], with ``codebooks`` in place when given."""
    tokens = tokens.to(_device(model))
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, codebooks.hooks() if codebooks else [])
        return float(_next_token_loss(logits, tokens))


def _train_state(directory: Path) -> dict[str, Any] | None:
    path = directory / TRAIN_STATE
    if not path.exists():
        return None
    state = torch.load(path, weights_only=True, map_location="cpu")
    if state.get("version") != TRAIN_STATE_VERSION:
        raise CodebookError(
            f"{path} was written by another version of the codebook trainer (version {state.get('version')}, "
            f"this one reads {TRAIN_STATE_VERSION}); pick another run name"
        )
    return state


def train_codebooks(
    model: Any,
    tokens: torch.Tensor,
    sites: Sequence[str],
    *,
    n_codes: int = 200,
    k: int = 1,
    similarity: str = "dot",
    steps: int = 200,
    batch_size: int = 32,
    lr: float = 3e-3,
    reconstruction_weight: float = 1.0,
    train_model: bool = False,
    dead_every: int = 50,
    eval_tokens: torch.Tensor | None = None,
    directory: str | Path | None = None,
    checkpoint_every: int = 100,
    seed: int = 0,
    progress: bool = True,
) -> tuple[CodebookSet, TrainReport]:
    """Fine-tune codebooks on ``sites`` of ``model`` with next-token loss + reconstruction on ``tokens``
    [n, pos]. k-means init; codes unused for ``dead_every`` steps are re-seeded from current inputs.

    With ``directory`` every ``checkpoint_every`` steps one file, ``train_state.pt``, records everything a resume
    needs (step, codes, Adam state, the batch generator, code usage, and with ``train_model`` the model weights),
    then ``codebooks.safetensors`` (codes with configs and step in its metadata) is rewritten for analysis; each
    write is atomic and each file complete on its own, so a crash never leaves a mixed state. A rerun with the
    same settings resumes from ``train_state.pt`` and ends equal to an uninterrupted run; a rerun with ``steps``
    at or below the saved step trains nothing and keeps the saved step (so does a finished run saved before
    ``train_state.pt`` existed; one that would need more steps is refused). ``train_model`` also updates the model's
    own weights (in place; a resume loads the checkpointed weights into ``model``). The parameters'
    ``requires_grad`` flags are restored on exit. ``seed`` drives every random draw (k-means init, batches,
    dead-code re-seeding) through local generators; the global RNG is left untouched. Fault-injection points
    (``workbench.faults``): ``codebook.state_saved`` (after ``train_state.pt``), ``codebook.codes_saved`` (after
    ``codebooks.safetensors``, before ``config.json``)."""
    from tqdm.auto import tqdm

    if tokens.ndim != 2:
        raise CodebookError(f"tokens must be [batch, pos] token ids, got shape {tuple(tokens.shape)}")
    device = _device(model)
    tokens = tokens.to(device)
    configs = [site_config(model, s, n_codes, k, similarity) for s in sites]
    settings = {"configs": [asdict(c) for c in configs], "batch_size": batch_size, "lr": lr,
                "reconstruction_weight": reconstruction_weight, "dead_every": dead_every, "seed": seed,
                "train_model": train_model}  # fmt: skip
    directory = Path(directory) if directory else None
    if directory is not None:
        for leftover in directory.glob(".*.tmp"):  # temporary files of a write a kill interrupted
            leftover.unlink(missing_ok=True)
    with torch.random.fork_rng(devices=[]):  # placeholder codes (replaced below): seeded, global RNG kept
        torch.manual_seed(seed)
        books = CodebookSet(configs).to(device)
    eval_tokens = tokens[-batch_size:] if eval_tokens is None else eval_tokens.to(device)
    saved = _train_state(directory) if directory is not None else None
    if saved is None and directory is not None and (directory / "codebooks.safetensors").exists():
        meta = CodebookSet.metadata(
            directory
        )  # a run finished before train_state.pt existed: usable, not resumable
        if meta["configs"] != settings["configs"] or train_model or int(meta.get("step", 0)) < steps:
            raise CodebookError(
                f"{directory} holds codebooks without the training state ({TRAIN_STATE}) needed to train them "
                "further or with these settings; pick another run name"
            )
        books = CodebookSet.load(directory, device)
        report = TrainReport(evaluate_loss(model, eval_tokens), evaluate_loss(model, eval_tokens, books),
                             int(meta["step"]), 0, [], directory)  # fmt: skip
        return books, report
    if saved is not None and saved["settings"] != settings:
        changed = sorted(key for key in settings if saved["settings"].get(key) != settings[key])
        raise CodebookError(
            f"{directory} holds codebooks trained with other settings ({', '.join(changed)}); pick another run name"
        )
    params = list(books.parameters()) + (list(model.model.parameters()) if train_model else [])
    optimizer = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    usage = {s: torch.zeros(books[s].config.n_groups, n_codes, device=device) for s in books.sites}
    start, replaced = 0, 0
    if saved is not None:
        with torch.no_grad():
            for i, book in enumerate(books.books):
                book.codes.copy_(saved["codes"][i])
            if train_model:
                model.model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        usage = {s: saved["usage"][s].to(device) for s in books.sites}
        start, replaced = int(saved["step"]), int(saved["replaced"])
    else:
        init_kmeans(books, model, tokens[: max(batch_size, 64)], seed=seed)

    def checkpoint(step: int) -> None:
        state = {"version": TRAIN_STATE_VERSION, "step": step, "settings": settings, "replaced": replaced,
                 "codes": [b.codes.detach().cpu() for b in books.books], "optimizer": optimizer.state_dict(),
                 "generator": gen.get_state(), "usage": {s: u.cpu() for s, u in usage.items()}}  # fmt: skip
        if train_model:
            state["model"] = {n: t.detach().cpu() for n, t in model.model.state_dict().items()}
        atomic_torch_save(directory / TRAIN_STATE, state)
        crash_point("codebook.state_saved")
        books.save(directory, {"step": step, "n_codes": n_codes, "train_model": train_model})

    grad_flags = [p.requires_grad for p in model.model.parameters()]
    for p in model.model.parameters():
        p.requires_grad_(train_model)
    history: list[float] = []
    books.record_inputs = True
    try:
        for step in tqdm(
            range(start, steps),
            disable=not progress,
            desc="codebooks",
            initial=start,
            total=max(steps, start),
        ):
            rows = torch.randint(tokens.shape[0], (batch_size,), generator=gen).to(device)
            batch = tokens[rows]
            with model.hooks(books.hooks()):
                logits = model(batch)
            loss = _next_token_loss(logits, batch)
            recon = sum(
                F.mse_loss(books[s].decode(books.codes(s).reshape(-1, *books.codes(s).shape[2:])),
                           F.layer_norm(books[s]._grouped(books.state[s].last_input),
                                        (books[s].config.d,)))
                for s in books.sites
            )  # fmt: skip
            optimizer.zero_grad()
            (loss + reconstruction_weight * recon).backward()
            optimizer.step()
            history.append(float(loss.detach()))
            for s in books.sites:
                codes = books.codes(s)
                for g in range(codes.shape[2]):
                    chosen = codes[:, :, g].reshape(-1)
                    usage[s][g] += torch.bincount(chosen[chosen >= 0], minlength=n_codes).to(usage[s])
            if dead_every and (step + 1) % dead_every == 0:
                replaced += _replace_dead(books, usage, gen)
            if directory is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                checkpoint(step + 1)
    finally:
        books.record_inputs = False
        for p, flag in zip(model.model.parameters(), grad_flags, strict=True):
            p.requires_grad_(flag)
    at = max(start, steps)
    report = TrainReport(evaluate_loss(model, eval_tokens), evaluate_loss(model, eval_tokens, books), at,
                         replaced, history, directory)  # fmt: skip
    if directory is not None:
        books.save(directory, {"step": at, "n_codes": n_codes, "train_model": train_model,
                               "base_loss": report.base_loss, "codebook_loss": report.codebook_loss,
                               "loss_gap": report.loss_gap})  # fmt: skip
    return books, report


def _replace_dead(books: CodebookSet, usage: dict[str, torch.Tensor], gen: torch.Generator) -> int:
    """Re-seed codes unused since the last check with random recent LayerNorm-ed inputs (plus 1 % noise, drawn
    from the CPU generator ``gen``); resets usage. Returns the number of codes replaced."""
    replaced = 0
    with torch.no_grad():
        for site in books.sites:
            book, state = books[site], books.state[site]
            if state.last_input is None:
                continue
            flat = book._grouped(state.last_input.to(book.codes.device))
            u = F.layer_norm(flat, (flat.shape[-1],))
            for g in range(book.config.n_groups):
                dead = (usage[site][g] == 0).nonzero().squeeze(1)
                if len(dead):
                    rows = torch.randint(u.shape[0], (len(dead),), generator=gen).to(u.device)
                    noise = torch.randn(len(dead), book.config.d, generator=gen).to(u)
                    book.codes[g, dead] = u[rows, g] + 0.01 * noise
                    replaced += len(dead)
            usage[site].zero_()
    return replaced


def collect_codes(
    model: Any,
    codebooks: CodebookSet,
    tokens: torch.Tensor,
    batch_size: int = 64,
    return_scores: bool = False,
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Codes chosen at every site for ``tokens`` [n, pos]: {site: [n, pos, n_groups, k]} on the CPU; with
    ``return_scores`` also the chosen codes' similarity to their inputs, {site: [n, pos, n_groups, k]}."""
    out: dict[str, list[torch.Tensor]] = {s: [] for s in codebooks.sites}
    scores: dict[str, list[torch.Tensor]] = {s: [] for s in codebooks.sites}
    device = _device(model)
    with torch.no_grad(), model.hooks(codebooks.hooks()):
        for i in range(0, tokens.shape[0], batch_size):
            model(tokens[i : i + batch_size].to(device))
            for s in codebooks.sites:
                out[s].append(codebooks.codes(s).cpu())
                scores[s].append(codebooks.scores(s).float().cpu())
    codes = {s: torch.cat(v) for s, v in out.items()}
    return (codes, {s: torch.cat(v) for s, v in scores.items()}) if return_scores else codes


def association(codes: np.ndarray, labels: np.ndarray, n_codes: int) -> pd.DataFrame:
    """Code ↔ label association from aligned code ids and labels [rows] (label or code −1 ignored): per label
    value, the best code (highest count on that label), its purity P(label | code), recall P(code | label) and the
    mutual information (nats) between the indicators code==best and label==value."""
    keep = (labels >= 0) & (codes >= 0)
    codes, labels = codes[keep].astype(np.int64), labels[keep].astype(np.int64)
    n_labels = int(labels.max()) + 1 if len(labels) else 0
    joint = np.zeros((n_codes, n_labels))
    np.add.at(joint, (codes, labels), 1)
    n = joint.sum()
    per_code, per_label = joint.sum(1), joint.sum(0)
    rows = []
    for label in np.flatnonzero(per_label):
        best = int(joint[:, label].argmax())
        both = joint[best, label]
        p = np.array([[n - per_code[best] - per_label[label] + both, per_label[label] - both],
                      [per_code[best] - both, both]]) / n  # fmt: skip
        outer = p.sum(1, keepdims=True) * p.sum(0, keepdims=True)
        mi = float(
            np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1) / np.where(outer > 0, outer, 1)), 0))
        )
        rows.append({"label": int(label), "best_code": best, "purity": both / per_code[best],
                     "recall": both / per_label[label], "label_count": int(per_label[label]), "mi": mi})  # fmt: skip
    return pd.DataFrame(rows)


def mutual_information(codes: np.ndarray, labels: np.ndarray) -> float:
    """I(code; label) in nats from aligned arrays [rows] (label −1 and code −1 ignored)."""
    keep = (labels >= 0) & (codes >= 0)
    codes, labels = codes[keep], labels[keep]
    _, ci = np.unique(codes, return_inverse=True)
    _, li = np.unique(labels, return_inverse=True)
    joint = np.zeros((ci.max() + 1, li.max() + 1))
    np.add.at(joint, (ci, li), 1)
    p = joint / joint.sum()
    outer = p.sum(1, keepdims=True) * p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / outer[nz])).sum())


def analyse_codes(
    model: Any,
    codebooks: CodebookSet,
    tokens: torch.Tensor,
    label_sets: dict[str, torch.Tensor] | None = None,
    *,
    model_name: str | None = None,
    top_contexts: int = 5,
    context: int = 4,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-code counts, top tokens and top contexts, and code ↔ label purity / MI for ``tokens`` [n, pos] and
    ``label_sets`` {name: labels [n, pos]}. Returns (codes table, purity table); the first chosen code (k slot 0)
    is the one associated with labels. A code's top contexts are the ``top_contexts`` token windows (``context``
    tokens before the token, then the token) where the code is chosen with the highest similarity to its input,
    best first (``top_context_scores``). Purity per label value is P(label | best code), as in ``association``.
    Per-head sites get one row per (head, code)."""
    name = model_name or model.cfg.name
    step = model.cfg.checkpoint
    tokens = tokens.cpu()
    codes, scores = collect_codes(model, codebooks, tokens, return_scores=True)
    label_sets = {k: v.cpu().numpy().reshape(-1) for k, v in (label_sets or {}).items()}
    to_str = model.to_str_tokens if model.tokenizer is not None else (lambda t: [str(int(x)) for x in t])
    flat_tok = tokens.reshape(-1).numpy()
    code_rows, purity_rows = [], []
    for site, chosen in codes.items():
        config = codebooks[site].config
        for group in range(config.n_groups):
            first = chosen[:, :, group, 0].numpy().reshape(-1)
            flat = chosen[:, :, group].reshape(-1, config.k).numpy()
            flat_scores = scores[site][:, :, group].reshape(-1, config.k).numpy()
            counts = np.bincount(flat[flat >= 0].reshape(-1), minlength=config.n_codes)
            best = {}
            for set_name, labels in label_sets.items():
                table = association(first, labels, config.n_codes)
                mi_total = mutual_information(first, labels)
                for row in table.to_dict("records"):
                    purity_rows.append({"model": name, "checkpoint": step, "site": site, "hook": site,
                                        "head": group if config.n_groups > 1 else None, "label_set": set_name,
                                        **row, "label_set_mi": mi_total})  # fmt: skip
                best[set_name] = _best_label_per_code(first, labels, config.n_codes)
            for code in np.flatnonzero(counts):
                hit = flat == code
                where = np.flatnonzero(hit.any(1))
                tok_ids, tok_counts = np.unique(flat_tok[where], return_counts=True)
                order = np.argsort(-tok_counts)[:5]
                top_tokens = [to_str(torch.tensor([int(tok_ids[i])]))[0] for i in order]
                similarity = np.where(hit[where], flat_scores[where], -np.inf).max(1)
                ranked = np.argsort(-similarity, kind="stable")[:top_contexts]
                contexts = []
                for row_index in where[ranked]:
                    seq, pos = divmod(int(row_index), tokens.shape[1])
                    window = tokens[seq, max(0, pos - context) : pos + 1]
                    contexts.append(" ".join(to_str(window)))
                row = {"model": name, "checkpoint": step, "site": site, "hook": site,
                       "head": group if config.n_groups > 1 else None, "code": int(code), "count": int(counts[code]),
                       "frequency": float(counts[code] / max(1, flat.shape[0])), "top_tokens": top_tokens,
                       "top_contexts": contexts,
                       "top_context_scores": [float(v) for v in similarity[ranked]]}  # fmt: skip
                if best:
                    set_name, (labels_of, purities) = next(iter(best.items()))
                    row.update({"label_set": set_name, "best_label": int(labels_of[code]),
                                "purity": float(purities[code])})  # fmt: skip
                code_rows.append(row)
    return pd.DataFrame(code_rows), pd.DataFrame(purity_rows)


def _best_label_per_code(
    codes: np.ndarray, labels: np.ndarray, n_codes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(most frequent label, its share P(label | code)) for each code [n_codes]; −1 / 0 where a code never fires."""
    keep = (labels >= 0) & (codes >= 0)
    n_labels = int(labels[keep].max()) + 1 if keep.any() else 1
    joint = np.zeros((n_codes, n_labels))
    np.add.at(joint, (codes[keep], labels[keep]), 1)
    total = joint.sum(1)
    return np.where(total > 0, joint.argmax(1), -1), np.where(
        total > 0, joint.max(1) / np.maximum(total, 1), 0.0
    )


def write_results(codes: pd.DataFrame, purity: pd.DataFrame, workspace: Any) -> None:
    """Write the analysis tables. A rewrite replaces every earlier row of the same (model, checkpoint, site), so
    codes that no longer fire and labels no longer seen leave no stale rows."""
    db = workspace.results()
    if not codes.empty:
        db.write(CODES_TABLE, codes, replace_keys=["model", "checkpoint", "site"])
    if not purity.empty:
        db.write(PURITY_TABLE, purity, replace_keys=["model", "checkpoint", "site"])


def generate(
    model: Any, codebooks: CodebookSet, tokens: torch.Tensor, n_new: int, steer: dict[str, Any] | None = None
) -> torch.Tensor:
    """Greedy continuation of ``tokens`` [batch, pos] by ``n_new`` tokens with the codebooks in place and
    ``steer`` (keyword arguments of ``CodebookSet.steer``, including ``site``) active on every step. Each step
    reruns the whole sequence, so a negative forced position (``force={-1: code}``) follows the newest token and
    a non-negative one stays on that token."""
    out = tokens.to(_device(model))
    with torch.no_grad(), model.hooks(codebooks.hooks()):
        for _ in range(n_new):
            if steer:
                with codebooks.steer(**steer):
                    logits = model(out)
            else:
                logits = model(out)
            out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


def fsm_steering_check(
    model: Any,
    codebooks: CodebookSet,
    site: str,
    fsm: Any,
    purity: pd.DataFrame,
    tokens: torch.Tensor,
    states: torch.Tensor,
    seed: int = 0,
) -> dict[str, float]:
    """Force, at the last position of each sequence, the best code of a random other FSM state; report the
    rate of greedy next tokens legal from the forced state and from the true state (and both without forcing).

    Target states are those whose best code is not shared with a state of another legal-next-token set (such a
    code names no single state), whose legal set differs from the true state's and whose code differs from the
    true state's best code. Sequences with no such target are skipped (``skipped``); ``n`` counts the rest, and
    the rates are NaN when ``n`` is 0."""
    if codebooks[site].config.n_groups != 1:
        raise CodebookError(
            f"the FSM steering check needs a single codebook per token; {site} has one per head"
        )
    rows = purity[(purity["site"] == site) & (purity["label_set"] == "fsm_state")]
    code_of = dict(zip(rows["label"].astype(int), rows["best_code"].astype(int), strict=True))
    legal = {s: frozenset(fsm.legal_next_tokens(s)) for s in range(fsm.n_states)}
    sets_of_code: dict[int, set[frozenset[int]]] = {}
    for state, code in code_of.items():
        sets_of_code.setdefault(code, set()).add(legal[state])
    targets = sorted(s for s, c in code_of.items() if len(sets_of_code[c]) == 1)
    rng = np.random.default_rng(seed)
    last = tokens.shape[1] - 1
    true_states = states[:, last].cpu().numpy()
    forced_legal = forced_true = plain_true = plain_forced = 0
    n = skipped = 0
    device = _device(model)
    tokens = tokens.to(device)
    with torch.no_grad(), model.hooks(codebooks.hooks()):
        plain = model(tokens)[:, -1].argmax(-1).cpu().numpy()
        for i, true in enumerate(true_states):
            true = int(true)
            choices = [s for s in targets if legal[s] != legal[true] and code_of[s] != code_of.get(true, -1)]
            if not choices:
                skipped += 1
                continue
            target = int(rng.choice(choices))
            with codebooks.steer(site, force={last: code_of[target]}):
                token = int(model(tokens[i : i + 1])[0, -1].argmax())
            forced_legal += fsm.is_legal(target, token)
            forced_true += fsm.is_legal(true, token)
            plain_true += fsm.is_legal(true, int(plain[i]))
            plain_forced += fsm.is_legal(target, int(plain[i]))
            n += 1
    rate = (lambda x: x / n) if n else (lambda x: float("nan"))
    return {"forced_legal_from_forced": rate(forced_legal), "forced_legal_from_true": rate(forced_true),
            "plain_legal_from_true": rate(plain_true), "plain_legal_from_forced": rate(plain_forced),
            "n": n, "skipped": skipped}  # fmt: skip


def fsm_purity_ceiling(fsm: Any, tokens: torch.Tensor, states: torch.Tensor) -> dict[str, float]:
    """What the state-purity metric can reach on these sequences at best. A model only sees the tokens, so any
    code is a function of the prefix; the most informative one is the exact posterior over FSM states (forward
    filtering from a uniform first state). Returns ``purity``: the mean state purity of the code "posterior id"
    (one code per distinct posterior), and ``map_accuracy``: how often the posterior's most likely state is the
    true one. With every state's token shared by m states and uniform transitions both are 1/m."""
    tokens, states = tokens.cpu().numpy(), states.cpu().numpy()
    n_states = len(fsm.emission)
    transition = np.zeros((n_states, n_states))
    for state in range(n_states):
        np.add.at(transition[state], fsm.successors[state], 1 / len(fsm.successors[state]))
    emits = fsm.emission[:, None] == np.arange(int(fsm.emission.max()) + 1)[None]  # [state, token]
    belief = np.full((tokens.shape[0], n_states), 1 / n_states)
    posterior = np.empty((*tokens.shape, n_states))
    for t in range(tokens.shape[1]):
        if t:
            belief = belief @ transition
        belief = belief * emits[:, tokens[:, t]].T
        belief /= belief.sum(1, keepdims=True)
        posterior[:, t] = belief
    flat = posterior.reshape(-1, n_states)
    _, ids = np.unique(np.round(flat, 9), axis=0, return_inverse=True)
    table = association(ids.reshape(-1), states.reshape(-1), int(ids.max()) + 1)
    return {"purity": float(table["purity"].mean()),
            "map_accuracy": float((flat.argmax(1) == states.reshape(-1)).mean())}  # fmt: skip


def fsm_codebook_study(
    model: Any,
    fsm: Any,
    *,
    site: str = "blocks.1.hook_resid_post",
    n_codes: int = 200,
    steps: int = 100,
    similarity: str = "dot",
    n_sequences: int = 256,
    seq_len: int = 32,
    directory: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """The TokFSM science check: fine-tune a k=1 codebook on ``site`` of an FSM model, measure the purity
    P(state | best code) of the best code of each FSM state on held-out sequences (``mean_state_purity``
    averages it over states) and the effect of forcing a state's code. Returns tables, numbers and the
    codebooks."""
    from workbench.zoo.labels import fsm_label_dataset

    tokens, labels = fsm_label_dataset(fsm, n_sequences, seq_len, seed=seed)
    test_tokens, test_labels = fsm_label_dataset(fsm, 128, seq_len, seed=seed + 1)
    books, report = train_codebooks(model, tokens, [site], n_codes=n_codes, k=1, similarity=similarity, steps=steps,
                                    eval_tokens=test_tokens, directory=directory, seed=seed,
                                    progress=progress)  # fmt: skip
    codes, purity = analyse_codes(model, books, test_tokens, {"fsm_state": test_labels["fsm_state"]})
    steering = fsm_steering_check(
        model, books, site, fsm, purity, test_tokens[:64], test_labels["fsm_state"][:64]
    )
    state_purity = purity[purity["label_set"] == "fsm_state"]["purity"]
    ceiling = fsm_purity_ceiling(fsm, test_tokens, test_labels["fsm_state"])
    return {"codebooks": books, "report": report, "codes": codes, "purity": purity, "steering": steering,
            "mean_state_purity": float(state_purity.mean()), "purity_ceiling": ceiling["purity"],
            "map_accuracy": ceiling["map_accuracy"]}  # fmt: skip


def demo_step(
    workspace: Any, progress: bool = True, model_name: str = "fsm-small", n_codes: int = 300, steps: int = 300
) -> str:
    """Codebooks on the last checkpoint of a TokFSM zoo model in the workspace, on its last block's residual stream:
    train, analyse, steer; writes both tables."""
    from workbench.checkpoints import CheckpointSeries
    from workbench.zoo.corpora import TokFSM
    from workbench.zoo.train import get_spec

    series = CheckpointSeries.from_directory(workspace.model_dir(model_name))
    model = series.load(series.steps[-1])
    spec = get_spec(model_name)
    fsm = TokFSM(**spec.fsm, seed=spec.seed)
    study = fsm_codebook_study(
        model, fsm, site=f"blocks.{spec.n_layers - 1}.hook_resid_post", n_codes=n_codes, steps=steps,
        directory=codebook_dir(workspace, f"{model_name}-demo"), progress=progress,
    )  # fmt: skip
    codes = study["codes"].assign(model=model_name)
    purity = study["purity"].assign(model=model_name, purity_ceiling=study["purity_ceiling"])
    codes["loss_gap"] = study["report"].loss_gap
    write_results(codes, purity, workspace)
    steer = study["steering"]
    return (f"codebooks {model_name}: state purity {study['mean_state_purity']:.3f} (ceiling for a code that knows "
            f"the exact state posterior {study['purity_ceiling']:.3f}), loss gap "
            f"{study['report'].loss_gap:+.3f} nats, forced code → legal from forced state "
            f"{steer['forced_legal_from_forced']:.2f} vs unforced {steer['plain_legal_from_forced']:.2f}")  # fmt: skip


def codebook_dir(workspace: Any, run_name: str) -> Path:
    """``workspace.root / "codebooks" / run_name`` (names with separators or '..' are refused)."""
    from workbench.workspace import safe_name

    try:
        name = safe_name(run_name, "for a codebook run: use a plain name")
    except ValueError as err:
        raise CodebookError(str(err)) from None
    return Path(workspace.root) / "codebooks" / name
