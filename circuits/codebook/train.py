"""Training codebooks: ``train_codebooks`` fine-tunes codebooks on hook sites of a causal LM with next-token loss plus
a reconstruction term, from k-means init, re-seeding dead codes, checkpointed under a run directory so that a
killed run resumes to the bytes of an uninterrupted one; ``train`` does the same on any dataset reference.

Run directory: ``train_state.pt`` (loaded with ``weights_only``) holds everything a resume needs; then
``codebooks.safetensors`` (codes, with the configs and step in its metadata) and ``config.json`` are rewritten for
analysis. Fault-injection points: ``codebook.state_saved``, ``codebook.codes_saved``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from workbench.circuits.codebook.analysis import check
from workbench.circuits.codebook.data import EVAL_FRACTION, read_rows
from workbench.circuits.codebook.kmeans import init_kmeans
from workbench.circuits.codebook.module import CodebookError, CodebookSet, site_config
from workbench.datasets import Dataset
from workbench.faults import crash_point
from workbench.fileio import atomic_torch_save

TRAIN_STATE = "train_state.pt"
TRAIN_STATE_VERSION = 1


def _next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@dataclass
class TrainReport:
    """Losses of a codebook fine-tune: the loss gap is codebook loss − un-bottlenecked loss (held-out tokens).
    ``steps`` is the step the codebooks are at; ``history`` holds the losses of the steps run by this call;
    ``source`` says how the training rows were read (``data.read_rows``), so an analysis finds the held-out rows."""

    base_loss: float
    codebook_loss: float
    steps: int
    dead_replaced: int
    history: list[float]
    directory: Path | None = None
    source: dict[str, Any] | None = None

    @property
    def loss_gap(self) -> float:
        return self.codebook_loss - self.base_loss


def evaluate_loss(model: Any, tokens: torch.Tensor, codebooks: CodebookSet | None = None) -> float:
    """Mean next-token loss on ``tokens`` [batch, pos], with ``codebooks`` in place when given."""
    tokens = tokens.to(model.device)
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
    source: dict[str, Any] | None = None,
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
    dead-code re-seeding) through local generators; the global RNG is left untouched. ``source`` (how ``tokens``
    were read: dataset, context length, ...) is saved with the codebooks and is part of the settings a resume must
    match. Fault-injection points
    (``workbench.faults``): ``codebook.state_saved`` (after ``train_state.pt``), ``codebook.codes_saved`` (after
    ``codebooks.safetensors``, before ``config.json``)."""
    if tokens.ndim != 2:
        raise CodebookError(f"tokens must be [batch, pos] token ids, got shape {tuple(tokens.shape)}")
    device = model.device
    tokens = tokens.to(device)
    configs = [site_config(model, s, n_codes, k, similarity) for s in sites]
    settings = {
        "configs": [asdict(c) for c in configs],
        "batch_size": batch_size,
        "lr": lr,
        "reconstruction_weight": reconstruction_weight,
        "dead_every": dead_every,
        "seed": seed,
        "train_model": train_model,
        "model": model.cfg.name,
    }
    if source is not None:
        settings["source"] = source
    extra = {"source": source} if source is not None else {}
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
        report = TrainReport(
            evaluate_loss(model, eval_tokens),
            evaluate_loss(model, eval_tokens, books),
            int(meta["step"]),
            0,
            [],
            directory,
            source,
        )
        return books, report
    if saved is not None:
        # a run saved before model identities records none: it is taken as this model's
        owner = saved["settings"].setdefault("model", model.cfg.name)
        if owner != model.cfg.name:
            raise CodebookError(
                f"{directory} holds codebooks of {owner!r}, not {model.cfg.name!r}; pick another "
                "run name (the default is built from the model's identity)"
            )
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
            for i, book in enumerate(books.codebooks):
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
        if directory is None:
            return
        state = {
            "version": TRAIN_STATE_VERSION,
            "step": step,
            "settings": settings,
            "replaced": replaced,
            "codes": [b.codes.detach().cpu() for b in books.codebooks],
            "optimizer": optimizer.state_dict(),
            "generator": gen.get_state(),
            "usage": {s: u.cpu() for s, u in usage.items()},
        }
        if train_model:
            state["model"] = {n: t.detach().cpu() for n, t in model.model.state_dict().items()}
        atomic_torch_save(directory / TRAIN_STATE, state)
        crash_point("codebook.state_saved")
        books.save(directory, {"step": step, "n_codes": n_codes, "train_model": train_model, **extra})

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
                F.mse_loss(
                    books[s].decode(books.codes(s).reshape(-1, *books.codes(s).shape[2:])),
                    F.layer_norm(books[s]._grouped(books.state[s].last_input), (books[s].config.d,)),
                )
                for s in books.sites
            )
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
    report = TrainReport(
        evaluate_loss(model, eval_tokens),
        evaluate_loss(model, eval_tokens, books),
        at,
        replaced,
        history,
        directory,
        source,
    )
    if directory is not None:
        books.save(
            directory,
            {
                "step": at,
                "n_codes": n_codes,
                "train_model": train_model,
                "base_loss": report.base_loss,
                "codebook_loss": report.codebook_loss,
                "loss_gap": report.loss_gap,
                **extra,
            },
        )
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


def train(
    model: Any,
    data: Dataset,
    sites: Sequence[str] | None = None,
    *,
    n_codes: int = 200,
    k: int = 1,
    similarity: str = "dot",
    steps: int = 200,
    batch_size: int = 32,
    context_length: int = 128,
    max_tokens: int | None = None,
    eval_fraction: float = EVAL_FRACTION,
    directory: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    **options: Any,
) -> tuple[CodebookSet, TrainReport]:
    """Codebooks on ``sites`` (default: the last block's ``hook_resid_post``) of any causal LM, trained on any
    dataset: ``check`` refuses what cannot work before any work; token rows come from the dataset's iterator
    (``read_rows``), a seeded ``eval_fraction`` of them held out for the loss gap; then ``train_codebooks`` (its
    other keyword ``options``: lr, reconstruction_weight, train_model, dead_every, checkpoint_every)."""
    sites = list(sites) if sites else [default_site(model)]
    check(model, data, sites, context_length)
    rows = read_rows(
        model,
        data,
        context_length=context_length,
        max_tokens=max_tokens,
        seed=seed,
        eval_fraction=eval_fraction,
    )
    return train_codebooks(
        model,
        rows.train,
        sites,
        n_codes=n_codes,
        k=k,
        similarity=similarity,
        steps=steps,
        batch_size=batch_size,
        eval_tokens=rows.eval,
        directory=directory,
        seed=seed,
        source=rows.source,
        progress=progress,
        **options,
    )


def default_site(model: Any) -> str:
    """The last block's residual stream, ``blocks.{n_layers − 1}.hook_resid_post``."""
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
