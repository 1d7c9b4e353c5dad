"""Neuron paths: joint integrated-gradient attribution of MLP hidden units, one per layer, at one position.

After "Discovering Influential Neuron Path in Vision Transformers". A path is a set of neurons
``{(layer, neuron)}`` at a single token position (CLS = 0 for the ViT, a chosen position for an LM). Its joint
score is the integral over α ∈ [0, 1] of dP/dα when the path neurons are scaled by α together (every other unit of
those layers held at its clean value), P = probability of the target class / next token, by a Riemann sum of m
steps evaluated as one batch.

:func:`run` takes any model (``resolve_model``) and any dataset (``load_dataset``): a causal LM traces paths for
the most frequent next tokens at a position of the dataset's token rows; an image classifier (ViT) one path per
class of the dataset's label array, at CLS. :func:`check` refuses what cannot work (no MLP units, an encoder with
no logits, data of the wrong modality, a position beyond the context) before any work; ``write_tables(workspace, ANALYSIS, frames)``
stores the ``ANALYSIS`` tables.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from workbench.analysis import Analysis, AnalysisNotApplicable, Table
from workbench.datasets import Dataset
from workbench.heap import release_free_heap

HOOK = "blocks.{layer}.mlp.hook_post"


class NeuronPathError(ValueError):
    """Bad input to a neuron-path function (target, steps, position or path out of range)."""


@dataclass
class Task:
    """Inputs [batch, ...] (pixels or tokens), integer targets [batch] and the token position analysed."""

    inputs: torch.Tensor
    targets: torch.Tensor
    position: int


def make_task(model, inputs: torch.Tensor, targets: torch.Tensor | None = None, position: int = 0) -> Task:
    """Check inputs and build a Task; for an LM, ``targets`` default to the next token after ``position``."""
    inputs = torch.as_tensor(inputs, device=model.device)
    n_out = model.cfg.d_vocab
    if inputs.is_floating_point():
        n_pos = model.cfg.n_ctx
    else:
        n_pos = inputs.shape[1]
    if not -n_pos <= position < n_pos:
        raise NeuronPathError(
            f"position {position} is out of range for {n_pos} positions; pick 0..{n_pos - 1} (0 = CLS for a ViT)"
        )
    position = position % n_pos
    if targets is None:
        if inputs.is_floating_point() or position + 1 >= n_pos:
            raise NeuronPathError(
                "targets are required unless the input is tokens with a token after `position`"
            )
        targets = inputs[:, position + 1]
    targets = torch.as_tensor(targets, dtype=torch.long, device=inputs.device).reshape(-1)
    if targets.shape[0] != inputs.shape[0]:
        raise NeuronPathError(
            f"got {targets.shape[0]} targets for {inputs.shape[0]} inputs; give one per input"
        )
    if targets.numel() and (targets.min() < 0 or targets.max() >= n_out):
        raise NeuronPathError(
            f"target {int(targets.max() if targets.max() >= n_out else targets.min())} is outside the model's "
            f"{n_out} outputs; use a class/token id in 0..{n_out - 1}"
        )
    return Task(inputs, targets, position)


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise NeuronPathError(
            f"steps m={steps!r} must be an integer >= 1 (the Riemann sum needs at least one step)"
        )


def _check_path(model, path: dict[int, list[int]]) -> None:
    if not any(len(neurons) for neurons in path.values()):
        raise NeuronPathError(
            f"the path {path!r} holds no neurons; give {{layer: [neuron, ...]}} with at least one"
        )
    for layer, neurons in path.items():
        if not 0 <= layer < model.cfg.n_layers:
            raise NeuronPathError(
                f"layer {layer} out of range; the model has layers 0..{model.cfg.n_layers - 1}"
            )
        for n in neurons:
            if not 0 <= n < model.cfg.d_mlp:
                raise NeuronPathError(f"neuron {n} out of range; d_mlp is {model.cfg.d_mlp}")


def target_probs(logits: torch.Tensor, targets: torch.Tensor, position: int) -> torch.Tensor:
    """Probability of each row's target: logits [rows, classes] or [rows, pos, vocab] → [rows]. A target
    outside the model's outputs raises NeuronPathError (also for a Task built without ``make_task``)."""
    if logits.ndim == 3:
        logits = logits[:, position]
    n_out = logits.shape[-1]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= n_out):
        bad = int(targets.max()) if int(targets.max()) >= n_out else int(targets.min())
        raise NeuronPathError(
            f"target {bad} is outside the model's {n_out} outputs; use a class/token id in 0..{n_out - 1}"
        )
    return logits.float().softmax(-1).gather(1, targets[:, None]).squeeze(1)


def clean_activations(model, task: Task) -> dict[int, torch.Tensor]:
    """MLP hidden units at the task position for every layer: {layer: [batch, d_mlp]}."""
    return _clean_forward(model, task)[0]


def _clean_forward(model, task: Task) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """({layer: MLP hidden units [batch, d_mlp] at the task position}, target probabilities [batch])."""
    names = [HOOK.format(layer=ly) for ly in range(model.cfg.n_layers)]
    with torch.no_grad(), model.capture(names) as cache:
        probs = target_probs(model(task.inputs), task.targets, task.position)
    return {
        ly: cache[HOOK.format(layer=ly)][:, task.position].float() for ly in range(model.cfg.n_layers)
    }, probs


def _scaled_hooks(
    clean: dict[int, torch.Tensor], masks: dict[int, torch.Tensor], alpha: torch.Tensor, position: int
):
    """Hooks setting layer l's units at ``position`` to clean, with masked units scaled by α per row.

    clean[ly]: [rows, d_mlp]; masks[ly]: [rows, d_mlp] bool; alpha: [rows] (requires grad).
    """

    def make(layer: int):
        def hook(act: torch.Tensor, hook) -> torch.Tensor:
            scale = torch.where(masks[layer], alpha[:, None], torch.ones_like(alpha)[:, None])
            act = act.clone()
            act[:, position] = (clean[layer] * scale).to(act.dtype)
            return act

        return hook

    return [(HOOK.format(layer=ly), make(ly)) for ly in masks]


CHUNK_BYTES = 512 * 2**20  # working memory one forward/backward chunk may take when --chunk-size is not given
_CACHE_TOLERANCE = 1e-4  # |P(full forward) − P(prefix-cached forward)| above which the full forward is used


@dataclass
class Candidates:
    """Sets of MLP units scored together: every set holds ``base`` ({layer: [neurons]}); with ``layer`` given, set
    c adds (or, on ``layer``, replaces ``base``'s units with) the single neuron ``neurons[c]`` → ``len(self)`` sets."""

    base: dict[int, list[int]]
    layer: int | None = None
    neurons: torch.Tensor | None = None  # [c] long

    def __len__(self) -> int:
        return 1 if self.neurons is None else len(self.neurons)

    def row_masks(self, d_mlp: int, candidate: torch.Tensor) -> dict[int, torch.Tensor]:
        """Masks {layer: [rows, d_mlp] bool} of the sets ``candidate`` [rows] (candidate index per row)."""
        rows = len(candidate)
        out = {}
        for layer, neurons in self.base.items():
            if layer != self.layer:
                mask = torch.zeros(d_mlp, dtype=torch.bool)
                mask[list(neurons)] = True
                out[layer] = mask.expand(rows, d_mlp)
        if self.layer is not None and self.neurons is not None:
            mask = torch.zeros(rows, d_mlp, dtype=torch.bool)
            mask[torch.arange(rows), self.neurons[candidate]] = True
            out[self.layer] = mask
        return out


@dataclass
class Cost:
    """What a neuron-path run will compute: ``rows`` forward/backward rows (one (neuron set, input, α-step) each) of
    ``tokens_per_row`` tokens (1 when the prefix before the position is cached), in chunks of ``chunk_rows``
    taking about ``chunk_bytes`` of working memory, an estimated ``seconds`` (timed on a calibration chunk)."""

    targets: int
    inputs: int
    steps: int
    layers: int
    width: int
    rows: int
    tokens_per_row: int
    chunk_rows: int
    chunk_bytes: int
    seconds: float

    def line(self) -> str:
        """The cost in one line, printed before the run."""
        token = (
            "1 token (the prefix cached per input)"
            if self.tokens_per_row == 1
            else f"{self.tokens_per_row} tokens"
        )
        return (
            f"neuron paths: {self.targets} targets, {self.inputs} inputs × {self.steps} steps × {self.layers} layers "
            f"× {self.width} neurons → {self.rows:,} forward/backward rows of {token}, in chunks of "
            f"{self.chunk_rows:,} rows (≈ {_size(self.chunk_bytes)} working memory); estimated "
            f"{_duration(self.seconds)}"
        )


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.0f} MiB" if n_bytes >= 10 * 2**20 else f"{n_bytes / 2**20:.2f} MiB"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class _Scorer:
    """Joint IG scores of sets of MLP units for one task, in chunks of ``chunk_rows`` forward/backward rows.

    A row is one (set, input, α-step); all steps of all sets are stacked along the batch. For a causal LM whose
    adapter declares ``capabilities.prefix_cache`` (the transformers families: GPT-2, GPT-NeoX, Llama) the
    keys/values of the positions before ``task.position`` do not depend on α (only that position's units are
    scaled, and earlier positions never attend to it), so they are computed once per input and each row runs one
    token; the full forward is used where that is not so (ViT,
    position 0, TransformerLens models, an attention path other than SDPA) or where the cached forward does not
    reproduce the full forward's target probability within ``_CACHE_TOLERANCE``.
    """

    def __init__(self, model, task: Task, steps: int, chunk_rows: int | None = None, bar=None) -> None:
        _check_steps(steps)
        self.model, self.task, self.steps, self.bar = model, task, steps, bar
        self.clean, probs = _clean_forward(model, task)
        self.prefix = _prefix_cache(model, task, probs)
        full = model.cfg.n_ctx if task.inputs.is_floating_point() else task.inputs.shape[1]
        self.tokens_per_row = 1 if self.prefix is not None else int(full)
        self.row_bytes = _row_bytes(
            model, self.tokens_per_row, task.position if self.prefix is not None else 0
        )
        self.chunk_rows = chunk_rows or max(1, CHUNK_BYTES // self.row_bytes)

    def scores(self, sets: Candidates) -> torch.Tensor:
        """Joint score of each set, averaged over the task's inputs → [len(sets)]."""
        n, steps, c = self.task.inputs.shape[0], self.steps, len(sets)
        total = torch.zeros(c, dtype=torch.float64)
        for start in range(0, c * n * steps, self.chunk_rows):
            rows = torch.arange(start, min(start + self.chunk_rows, c * n * steps))
            grad = self._rows(sets, rows)
            total.index_add_(0, rows // (n * steps), grad.double().cpu())
            del grad
            release_free_heap()
            if self.bar is not None:
                self.bar.update(len(rows))
        return (total / (n * steps)).float()

    def _rows(self, sets: Candidates, rows: torch.Tensor) -> torch.Tensor:
        """dP/dα of ``rows`` [r] (row = (set · n + input) · steps + step) → [r]."""
        model, task, n, steps = self.model, self.task, self.task.inputs.shape[0], self.steps
        candidate, inp = rows // (n * steps), (rows // steps) % n
        alpha = ((rows % steps + 1).float() / steps).to(task.inputs.device).requires_grad_(True)
        masks = {ly: m.to(task.inputs.device) for ly, m in sets.row_masks(model.cfg.d_mlp, candidate).items()}
        clean = {ly: self.clean[ly][inp] for ly in masks}
        if self.prefix is None:
            with model.hooks(_scaled_hooks(clean, masks, alpha, task.position)):
                logits = model(task.inputs[inp])
            probs = target_probs(logits, task.targets[inp], task.position)
        else:
            with model.hooks(_scaled_hooks(clean, masks, alpha, 0)):
                logits = model(
                    task.inputs[inp, task.position : task.position + 1],
                    cache=self.prefix.rows(inp),
                    use_cache=False,
                )
            probs = target_probs(logits, task.targets[inp], 0)
        (grad,) = torch.autograd.grad(probs.sum(), alpha)
        return grad.detach()

    def seconds_per_row(self, sets: Candidates, rows: int = 256) -> float:
        """Seconds per row of one forward/backward of a chunk (at most ``rows`` rows) of ``sets``, after a one-row
        warm-up: the calibration of :class:`Cost`, per-chunk overhead included."""
        n = min(rows, len(sets) * self.task.inputs.shape[0] * self.steps, self.chunk_rows)
        self._rows(sets, torch.arange(1))
        t0 = time.perf_counter()
        self._rows(sets, torch.arange(n))
        return (time.perf_counter() - t0) / n


@dataclass
class _Prefix:
    """Keys/values [inputs, kv_heads, position, d_head] per layer of the tokens before the task position."""

    model: Any
    kv: list[tuple[torch.Tensor, torch.Tensor]]

    def rows(self, inp: torch.Tensor):
        """A key/value cache (:meth:`~workbench.model.HookedModel.kv_cache`) holding input ``inp[r]``'s prefix for
        row r."""
        return self.model.kv_cache([(k[inp], v[inp]) for k, v in self.kv])


def _prefix_cache(model, task: Task, probs: torch.Tensor) -> _Prefix | None:
    """The task's prefix keys/values when the model runs one token on them exactly (see :class:`_Scorer`)."""
    if (
        task.inputs.is_floating_point()
        or task.position < 1
        or not model.capabilities.prefix_cache
        or getattr(model, "attention_path", "sdpa") != "sdpa"
    ):
        return None
    try:
        cache = model.kv_cache()
        with torch.no_grad():
            model(task.inputs[:, : task.position], cache=cache, use_cache=True)
            prefix = _Prefix(model, model.cached_keys_values(cache))
            last = model(
                task.inputs[:, task.position : task.position + 1],
                cache=prefix.rows(torch.arange(len(probs))),
                use_cache=False,
            )
    except (TypeError, ValueError, AttributeError, RuntimeError):
        return None
    if last.ndim != 3 or (target_probs(last, task.targets, 0) - probs).abs().max() > _CACHE_TOLERANCE:
        return None
    return prefix


def _row_bytes(model, tokens: int, prefix: int) -> int:
    """Working memory of one forward/backward row: activations kept for the backward (≈ 12 d_model + 8 d_mlp
    floats per token and layer), the cached prefix keys/values and the logits with their softmax."""
    cfg = model.cfg
    per_token = cfg.n_layers * (12 * cfg.d_model + 8 * cfg.d_mlp) + 3 * (cfg.d_vocab or 0)
    return 4 * (tokens * per_token + 4 * cfg.n_layers * prefix * cfg.d_model)


def joint_score(
    model, task: Task, path: dict[int, list[int]], steps: int = 20, chunk_rows: int | None = None
) -> float:
    """Joint IG attribution of ``path`` ({layer: [neurons]}) to the target probability, averaged over inputs;
    ``chunk_rows`` bounds the rows (input × α-step) of one forward/backward (default: by ``CHUNK_BYTES``)."""
    _check_steps(steps)
    _check_path(model, path)
    return float(_Scorer(model, task, steps, chunk_rows).scores(Candidates(path))[0])


def locate_path(
    model,
    task: Task,
    steps: int = 20,
    top_k: int = 1,
    chunk_rows: int | None = None,
    progress: bool = True,
    scorer: _Scorer | None = None,
) -> tuple[dict[int, list[int]], list[float]]:
    """Layer-progressive search: per layer pick the ``top_k`` neurons maximising the joint score with earlier picks.

    ``chunk_rows`` bounds the rows (neuron × input × α-step) of one forward/backward (default: as many as fit in
    ``CHUNK_BYTES`` by :func:`_row_bytes`). Returns ({layer: [neurons]}, joint score after each layer).
    """
    _check_steps(steps)
    if top_k < 1 or top_k > model.cfg.d_mlp:
        raise NeuronPathError(f"top_k={top_k} must be in 1..{model.cfg.d_mlp}")
    scorer = scorer or _Scorer(model, task, steps, chunk_rows)
    path: dict[int, list[int]] = {}
    scores: list[float] = []
    neurons = torch.arange(model.cfg.d_mlp)
    for layer in tqdm(range(model.cfg.n_layers), desc="neuron path", disable=not progress):
        values = scorer.scores(Candidates(dict(path), layer, neurons))
        path[layer] = values.topk(top_k).indices.tolist()
        scores.append(float(scorer.scores(Candidates(path))[0]) if top_k > 1 else float(values.max()))
    return path, scores


def top_activation_path(
    model, task: Task, top_k: int = 1, clean: dict[int, torch.Tensor] | None = None
) -> dict[int, list[int]]:
    """Baseline: per layer, the ``top_k`` neurons with the largest mean clean activation at the task position
    (``clean``: the task's :func:`clean_activations` when already computed)."""
    clean = clean if clean is not None else clean_activations(model, task)
    return {ly: clean[ly].mean(0).topk(top_k).indices.tolist() for ly in range(model.cfg.n_layers)}


def influence_pattern_path(
    model, task: Task, steps: int = 20, top_k: int = 1, chunk_rows: int | None = None
) -> dict[int, list[int]]:
    """Baseline: scale the input embedding by α, pick per layer the ``top_k`` neurons with the largest mean
    gradient; rows (input × α-step) run in chunks of ``chunk_rows`` (default: by ``CHUNK_BYTES``)."""
    _check_steps(steps)
    n = task.inputs.shape[0]
    names = [HOOK.format(layer=ly) for ly in range(model.cfg.n_layers)]
    tokens = model.cfg.n_ctx if task.inputs.is_floating_point() else int(task.inputs.shape[1])
    chunk = chunk_rows or max(1, CHUNK_BYTES // _row_bytes(model, tokens, 0))
    total = [torch.zeros(model.cfg.d_mlp, dtype=torch.float64) for _ in names]
    for start in range(0, n * steps, chunk):
        rows = torch.arange(start, min(start + chunk, n * steps), device=task.inputs.device)
        alpha = (rows % steps + 1).float() / steps

        def scale(act: torch.Tensor, hook, alpha=alpha) -> torch.Tensor:
            return act * alpha.reshape(-1, *([1] * (act.ndim - 1))).to(act.dtype)

        with model.hooks([("hook_embed", scale)]), model.capture(names, grad=True) as cache:
            probs = target_probs(
                model(task.inputs[rows // steps]), task.targets[rows // steps], task.position
            )
        grads = torch.autograd.grad(probs.sum(), [cache[name] for name in names])
        for t, g in zip(total, grads, strict=True):
            t += g[:, task.position].double().sum(0).cpu()
    return {ly: (t / (n * steps)).float().topk(top_k).indices.tolist() for ly, t in enumerate(total)}


def manipulate(model, task: Task, path: dict[int, list[int]], factor: float) -> dict[str, float]:
    """Scale the path neurons by ``factor`` (0 = remove, 2 = enhance): probability ratio and accuracy change."""
    _check_path(model, path)

    def make(neurons: list[int]):
        def hook(act: torch.Tensor, hook) -> torch.Tensor:
            act = act.clone()
            act[:, task.position, neurons] = act[:, task.position, neurons] * factor
            return act

        return hook

    with torch.no_grad():
        clean_logits = model(task.inputs)
        with model.hooks([(HOOK.format(layer=ly), make(list(ns))) for ly, ns in path.items()]):
            logits = model(task.inputs)
    p0 = target_probs(clean_logits, task.targets, task.position)
    p1 = target_probs(logits, task.targets, task.position)

    def accuracy(x: torch.Tensor) -> float:
        x = x[:, task.position] if x.ndim == 3 else x
        return float((x.argmax(-1) == task.targets).float().mean())

    return {
        "prob_ratio": float((p1 / p0.clamp_min(1e-12)).mean()),
        "accuracy_change": accuracy(logits) - accuracy(clean_logits),
    }


METHODS = ("joint_ig", "top_activation", "influence_pattern")
LM_POSITION = 8  # default position analysed in a causal LM (the target is the token after it)
LM_TARGETS = 3  # default number of next tokens analysed in a causal LM


def estimate(
    model,
    tasks: dict[int, Task],
    steps: int = 20,
    top_k: int = 1,
    chunk_rows: int | None = None,
    scorer: _Scorer | None = None,
) -> Cost:
    """The cost of :func:`analyse` on ``tasks`` before it runs: rows = Σ over targets of inputs × steps × (layers ×
    d_mlp candidates + the joint scores of the three paths, + one per layer when ``top_k`` > 1); time from one timed
    calibration chunk of the first task (``scorer``: that task's, reused by the run)."""
    first = next(iter(tasks.values()))
    scorer = scorer or _Scorer(model, first, steps, chunk_rows)
    layers, width = model.cfg.n_layers, model.cfg.d_mlp
    per_input = steps * (layers * width + 3 + (layers if top_k > 1 else 0))
    inputs = sum(int(t.inputs.shape[0]) for t in tasks.values())
    full = model.cfg.n_ctx if first.inputs.is_floating_point() else int(first.inputs.shape[1])
    per_row = scorer.seconds_per_row(Candidates({}, 0, torch.arange(width)))
    seconds = (
        per_row * inputs * (per_input + steps * full / scorer.tokens_per_row)
    )  # + the influence baseline
    return Cost(
        targets=len(tasks),
        inputs=inputs,
        steps=steps,
        layers=layers,
        width=width,
        rows=inputs * per_input,
        tokens_per_row=scorer.tokens_per_row,
        chunk_rows=scorer.chunk_rows,
        chunk_bytes=scorer.chunk_rows * scorer.row_bytes,
        seconds=seconds,
    )


def analyse(
    model,
    tasks: dict[int, Task],
    *,
    dataset: str,
    steps: int = 20,
    top_k: int = 1,
    chunk_rows: int | None = None,
    progress: bool = True,
    report: Callable[[str], None] | None = None,
) -> dict[str, pd.DataFrame]:
    """Paths of all three methods for each target ({target: Task}) → {"neuron_paths": one row per (target, method,
    layer, rank), "neuron_path_metrics": one row per method, averaged over the targets}; ``dataset`` is the name
    recorded in every row (``Dataset.name``). ``chunk_rows`` bounds one forward/backward (default: by
    ``CHUNK_BYTES``); ``report`` receives the :class:`Cost` line before the work; ``progress`` shows a bar over
    the rows."""
    _check_steps(steps)
    if not tasks:
        raise NeuronPathError("no targets to trace; give at least one task")
    name, checkpoint = model.cfg.name, model.cfg.checkpoint
    run_keys = {"model": name, "checkpoint": checkpoint, "dataset": dataset, "hook": HOOK.format(layer="*")}
    path_rows, metric_rows = [], []
    first = _Scorer(model, next(iter(tasks.values())), steps, chunk_rows)
    cost = estimate(model, tasks, steps, top_k, chunk_rows, scorer=first)
    if report is not None:
        report(cost.line())
    bar = tqdm(total=cost.rows, desc=f"{name} rows", unit="row", disable=not progress, smoothing=0.1)
    for i, (target, task) in enumerate(tasks.items()):
        scorer = first if i == 0 else _Scorer(model, task, steps, chunk_rows)
        scorer.bar = bar
        ours, _ = locate_path(model, task, steps, top_k, progress=False, scorer=scorer)
        paths = {
            "joint_ig": ours,
            "top_activation": top_activation_path(model, task, top_k, scorer.clean),
            "influence_pattern": influence_pattern_path(model, task, steps, top_k, chunk_rows),
        }
        label = _target_text(model, target)
        for method, path in paths.items():
            score = float(scorer.scores(Candidates(path))[0])
            removed, enhanced = manipulate(model, task, path, 0.0), manipulate(model, task, path, 2.0)
            for layer, neurons in path.items():
                for rank, neuron in enumerate(neurons):
                    path_rows.append(
                        {
                            **run_keys,
                            "position": task.position,
                            "target": int(target),
                            "target_text": label,
                            "method": method,
                            "layer": layer,
                            "rank": rank,
                            "neuron": int(neuron),
                            "joint_score": score,
                            "n_inputs": int(task.inputs.shape[0]),
                        }
                    )
            metric_rows.append(
                {
                    **run_keys,
                    "position": task.position,
                    "target": int(target),
                    "method": method,
                    "joint_score": score,
                    "remove_prob_ratio": removed["prob_ratio"],
                    "remove_accuracy_change": removed["accuracy_change"],
                    "enhance_prob_ratio": enhanced["prob_ratio"],
                    "enhance_accuracy_change": enhanced["accuracy_change"],
                }
            )
    bar.close()
    group = ["model", "checkpoint", "dataset", "hook", "position", "method"]
    metrics = (
        pd.DataFrame(metric_rows)
        .drop(columns="target")
        .groupby(group, as_index=False, dropna=False, sort=False)
        .mean()
    )
    metrics["n_targets"] = len(tasks)
    metrics["steps"] = steps
    return {"neuron_paths": pd.DataFrame(path_rows), "neuron_path_metrics": metrics}


def _target_text(model, target: int) -> str:
    if model.capabilities.modality == "text" and model.tokenizer is not None:
        return str(model.to_string([target]))
    return str(target)


_RUN_KEYS = ("model", "checkpoint", "dataset", "position")
ANALYSIS = Analysis(
    name="neuron_path",
    command="workbench neuron-path run MODEL --data DATA",
    tables=(
        Table(
            "neuron_paths",
            keys=_RUN_KEYS,
            columns=("target", "target_text", "method", "layer", "rank", "neuron", "joint_score", "n_inputs"),
            description="per target and method, the neuron picked at each layer (rank < top_k); a rerun of the "
            "same model, checkpoint, dataset and position replaces its rows",
        ),
        Table(
            "neuron_path_metrics",
            keys=_RUN_KEYS,
            columns=(
                "method",
                "joint_score",
                "remove_prob_ratio",
                "remove_accuracy_change",
                "enhance_prob_ratio",
                "enhance_accuracy_change",
                "n_targets",
                "steps",
            ),
            description="per method, joint score and remove (×0) / enhance (×2) effects averaged over targets",
        ),
    ),
    requires=("mlp",),
    description="neuron paths: joint integrated gradients over MLP hidden units (causal LMs and ViT classifiers)",
)


def model_kind(model) -> str:
    """Kind of ``model``: "lm" for a causal LM (next-token logits [batch, pos, d_vocab]), "classifier" for an image
    model (a ViT: class logits [batch, n_classes]); anything else raises AnalysisNotApplicable (an encoder's forward
    returns hidden states, so there is no target probability to attribute)."""
    if model.capabilities.modality == "image":
        return "classifier"
    if model.cfg.causal:
        return "lm"
    raise AnalysisNotApplicable(
        f"neuron paths attribute the probability of a next token or a class, but {model.cfg.name} "
        f"({model.cfg.family}) is an encoder whose forward returns hidden states [batch, pos, {model.cfg.d_model}], "
        "not logits; use a causal LM (GPT-2, GPT-NeoX/Pythia, Llama, a code-* or fsm-* zoo model) or a ViT classifier"
    )


def check(model, data: Dataset, position: int | None = None, label: str | None = None) -> str:
    """Refuse, before any work, a model or dataset neuron paths cannot use; returns the model kind (model_kind).

    Needs MLP hidden units (``blocks.{l}.mlp.hook_post``), next-token or class logits, data of the model's modality
    (text / token ids for an LM, images with a class label array for a classifier) and, for an LM, a position with
    a next token inside the context (``position`` None: the default position); ``label`` picks a classifier's
    label array.
    """
    ANALYSIS.check(model)
    missing = [ly for ly in range(model.cfg.n_layers) if HOOK.format(layer=ly) not in model.hook_names()]
    if missing:
        raise AnalysisNotApplicable(
            f"neuron paths attribute MLP hidden units, but {model.cfg.name} has no {HOOK.format(layer=missing[0])} "
            "(an attention-only model); use a model with MLP blocks"
        )
    kind = model_kind(model)
    if kind == "lm":
        if data.modality == "inputs":
            shape = tuple(data.inputs.shape) if data.inputs is not None else "?"
            raise AnalysisNotApplicable(
                f"{model.cfg.name} is a causal LM and reads token rows, but dataset {data.name!r} holds inputs of "
                f"shape {shape} (images); pass a text or token dataset with --data (a text file, FILE.jsonl:FIELD, "
                "ids.npy, zoo:tokfsm, zoo:python-stdlib)"
            )
        if data.modality == "text" and model.tokenizer is None:
            raise AnalysisNotApplicable(
                f"{model.cfg.name} has no tokenizer to read the text dataset {data.name!r}; save the tokenizer files "
                "(tokenizer.json, tokenizer_config.json) next to the model, or pass token ids (ids.npy)"
            )
        position = LM_POSITION if position is None else position
        last = model.cfg.n_ctx - 2
        if not 0 <= position <= last:
            raise NeuronPathError(
                f"--position {position} is beyond the context of {model.cfg.name} ({model.cfg.n_ctx} tokens); the "
                f"target is the token after it, so pick a position in 0..{last}"
            )
        return kind
    if data.modality != "inputs":
        raise AnalysisNotApplicable(
            f"{model.cfg.name} is an image classifier, but dataset {data.name!r} holds {data.modality}; pass images "
            "with a class label array with --data (e.g. zoo:digits)"
        )
    _class_labels(data, label)
    position = 0 if position is None else position
    if not 0 <= position < model.cfg.n_ctx:
        raise NeuronPathError(
            f"--position {position} is beyond the {model.cfg.n_ctx} positions of {model.cfg.name}; pick 0..."
            f"{model.cfg.n_ctx - 1} (0 = CLS, whose state the classifier reads)"
        )
    return kind


def _inputs(data: Dataset) -> torch.Tensor:
    """``data``'s input array [n, ...]; a token or text dataset is refused (class tasks read inputs)."""
    if data.inputs is None:
        raise NeuronPathError(
            f"dataset {data.name!r} holds no input array (it is {data.modality}); class tasks "
            "need an inputs dataset such as zoo:digits"
        )
    return data.inputs


def _class_labels(data: Dataset, label: str | None = None) -> tuple[str, torch.Tensor]:
    """(name, class ids [n]) of ``data``'s per-input label array ``label`` (default: its only one)."""
    n = len(_inputs(data))
    per_input = {k: v for k, v in data.labels.items() if tuple(getattr(v, "shape", ())) == (n,)}
    if not per_input:
        raise AnalysisNotApplicable(
            f"dataset {data.name!r} has inputs but no class label array [{n}]; an image classifier's paths are "
            "traced per class: pass inputs with labels (e.g. --data zoo:digits, labels['digit'])"
        )
    if label is None and len(per_input) > 1:
        raise NeuronPathError(
            f"dataset {data.name!r} has several label arrays {sorted(per_input)}; name one with --label"
        )
    if label is not None and label not in per_input:
        raise NeuronPathError(
            f"dataset {data.name!r} has no per-input label array {label!r}; its label arrays: {sorted(per_input)}"
        )
    chosen = label if label is not None else next(iter(per_input))
    return chosen, torch.as_tensor(per_input[chosen]).long()


def next_token_rows(
    model, data: Dataset, position: int, max_rows: int = 64, seed: int | None = 0
) -> torch.Tensor:
    """The first ``max_rows`` token rows of ``data`` (seeded shuffle) that have a token after ``position``, cut to
    ids [n, position + 2], through the dataset's one iterator (``Dataset.batches``)."""
    if max_rows < 1:
        raise NeuronPathError(f"max_rows={max_rows} must be >= 1")
    kept: list[torch.Tensor] = []
    n = 0
    for batch in data.batches(model.tokenizer, context_length=position + 2, batch_size=64, shuffle_seed=seed):
        if batch["input_ids"].shape[1] < position + 2:
            continue
        full = batch["attention_mask"][:, position + 1].bool()
        kept.append(batch["input_ids"][full][:, : position + 2])
        n += int(full.sum())
        if n >= max_rows:
            break
    rows = torch.cat(kept)[:max_rows] if kept else torch.zeros(0, position + 2, dtype=torch.long)
    if not len(rows):
        raise NeuronPathError(
            f"no row of dataset {data.name!r} has a token after position {position}; pick a smaller --position or "
            "longer documents"
        )
    data.check_vocabulary(rows, model)
    return rows


def lm_tasks(model, tokens: torch.Tensor, position: int, n_targets: int = LM_TARGETS) -> dict[int, Task]:
    """Tasks for the ``n_targets`` most frequent next tokens after ``position`` in ``tokens`` [batch, pos]."""
    task = make_task(model, tokens, None, position)
    values, counts = task.targets.unique(return_counts=True)
    chosen = values[counts.argsort(descending=True, stable=True)[:n_targets]]
    return {
        int(t): Task(task.inputs[task.targets == t], task.targets[task.targets == t], task.position)
        for t in chosen
    }


def class_tasks(
    model,
    data: Dataset,
    *,
    per_class: int = 8,
    n_targets: int | None = None,
    label: str | None = None,
    position: int = 0,
    seed: int = 0,
) -> dict[int, Task]:
    """One task per class of ``data``'s label array (its ``n_targets`` most frequent classes, default all): up to
    ``per_class`` inputs [k, ...] each, drawn with a seeded permutation."""
    _, labels = _class_labels(data, label)
    values, counts = labels.unique(return_counts=True)
    classes = values[counts.argsort(descending=True, stable=True)[:n_targets]] if n_targets else values
    _check_inputs(model, data)
    generator = torch.Generator().manual_seed(seed)
    tasks = {}
    for c in sorted(int(v) for v in classes):
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=generator)[:per_class]]
        tasks[c] = make_task(model, _inputs(data)[idx], labels[idx], position)
    return tasks


def _check_inputs(model, data: Dataset) -> None:
    inputs = _inputs(data)
    try:
        with torch.no_grad():
            model(inputs[:1].to(model.device))
    except (RuntimeError, ValueError) as err:
        raise NeuronPathError(
            f"{model.cfg.name} cannot read the inputs of dataset {data.name!r} (shape "
            f"{tuple(inputs.shape)}): {str(err).splitlines()[0]}; pass images of the size it was trained on"
        ) from err


def run(
    model,
    data: Dataset,
    *,
    position: int | None = None,
    n_targets: int | None = None,
    steps: int = 20,
    top_k: int = 1,
    max_sequences: int = 64,
    label: str | None = None,
    seed: int = 0,
    chunk_rows: int | None = None,
    progress: bool = True,
    report: Callable[[str], None] | None = None,
) -> dict[str, pd.DataFrame]:
    """Neuron paths of any causal LM or ViT classifier on any dataset → {table: DataFrame} (for ``write_tables``).

    Args:
        model: a HookedModel (``workbench.references.resolve_model``).
        data: a Dataset (``workbench.datasets.load_dataset``): text or token ids for an LM, images with a class
            label array for a classifier.
        position: LM: the position analysed, whose next token is the target (default 8); classifier: default 0 (CLS).
        n_targets: LM: the most frequent next tokens analysed (default 3); classifier: classes (default all).
        max_sequences: LM: token rows read from ``data`` (split among the targets by their next token);
            classifier: inputs split evenly among the classes.
        label: classifier: which of ``data.labels`` holds the classes (default: its only per-input array).
        seed: the shuffle of rows / the draw of inputs per class.
        chunk_rows: forward/backward rows (neuron × input × α-step) per chunk, which bounds the working memory
            (default: as many as fit in ``CHUNK_BYTES``).
        report: receives the cost line (:meth:`Cost.line`) before the work starts.
    """
    kind = check(model, data, position, label)
    _check_steps(steps)
    if chunk_rows is not None and chunk_rows < 1:
        raise NeuronPathError(f"--chunk-size {chunk_rows} must be >= 1 (rows per forward/backward)")
    if not 1 <= top_k <= model.cfg.d_mlp:
        raise NeuronPathError(f"--top-k {top_k} must be in 1..{model.cfg.d_mlp} (d_mlp of {model.cfg.name})")
    if kind == "lm":
        position = LM_POSITION if position is None else position
        tokens = next_token_rows(model, data, position, max_sequences, seed)
        tasks = lm_tasks(model, tokens, position, n_targets or LM_TARGETS)
    else:
        _, labels = _class_labels(data, label)
        n_classes = min(n_targets or len(labels.unique()), len(labels.unique()))
        tasks = class_tasks(
            model,
            data,
            per_class=max(1, max_sequences // n_classes),
            n_targets=n_targets,
            label=label,
            position=position or 0,
            seed=seed,
        )
    return analyse(
        model,
        tasks,
        dataset=data.name,
        steps=steps,
        top_k=top_k,
        chunk_rows=chunk_rows,
        progress=progress,
        report=report,
    )
