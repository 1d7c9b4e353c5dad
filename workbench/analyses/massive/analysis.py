"""Massive activations (Sun et al., 2024): detection per layer, tracking over checkpoints, emergence fits.

A massive activation is a scalar in the residual stream orders of magnitude above the rest, at a fixed feature
dimension and on a few tokens (the first token, delimiters), nearly constant across inputs. For each hook
(default: every ``blocks.*.hook_resid_post``) :func:`detect_massive` reports

- the top-k magnitudes with their (sequence, position, token, dimension),
- the median magnitude and the ratio top-1 / median,
- the input-invariance of each top value: over every occurrence of the same token in the corpus, the spread
  (std / |mean|) of that dimension — near 0 for a massive activation,
- whether the top-1 passes the absolute threshold (default |a| > 100) and the ratio threshold (> 1000×).

Post-LayerNorm models (BERT, MiniLM) keep magnitudes small, so ratio and invariance are always reported even
when nothing passes the absolute threshold. The median is exact up to ``median_sample`` magnitudes per hook and
estimated from a uniform random sample of that size beyond (random keys, the smallest kept: bounded memory).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from workbench.analyses.dynamics.emergence import FAMILIES, CurveFit, FitError, derived_quantities, fit_curve
from workbench.analysis import Analysis, Table, settings_with
from workbench.checkpoints import CheckpointSeries
from workbench.datasets import Dataset, iter_model_batches
from workbench.deprecation import renamed_keywords

if TYPE_CHECKING:
    from workbench.model import HookedModel


class MassiveError(ValueError):
    """Bad input to the massive-activation analysis (NaN activations, unusable hooks)."""


@dataclass(frozen=True)
class MassiveCriteria:
    """Thresholds: |a| > ``abs_threshold`` and |a| > ``ratio_threshold`` × median (``require`` "both"/"either")."""

    abs_threshold: float = 100.0
    ratio_threshold: float = 1000.0
    require: str = "both"
    top_k: int = 10

    def passes(self, value: float, median: float) -> tuple[bool, bool, bool]:
        by_abs = value > self.abs_threshold
        by_ratio = value > self.ratio_threshold * max(median, 1e-12)
        return by_abs, by_ratio, (by_abs and by_ratio) if self.require == "both" else (by_abs or by_ratio)


@dataclass
class MassiveReport:
    """Per-hook summary (``layers``: one row per hook) and the top-k entries (``top``: one row per entry)."""

    layers: pd.DataFrame
    top: pd.DataFrame
    notes: list[str]

    def frames(self, fits: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
        """The report (and emergence ``fits``) as ``ANALYSIS``'s tables: massive_layers, massive_top and, when there
        are fits, massive_fits (for ``write_tables``; a rerun replaces the same model/checkpoint/hook/dataset rows)."""
        frames = {"massive_layers": self.layers, "massive_top": self.top}
        if fits is not None and not fits.empty:
            frames["massive_fits"] = fits.assign(dataset=self.layers["dataset"].iloc[0])
        return frames


def _keep_smallest_keys(
    kept: tuple[np.ndarray, np.ndarray], values: np.ndarray, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(values, keys) [≤ size] of ``kept`` and ``values`` [n] together, where each new value draws a uniform key and
    the ``size`` smallest keys stay: a uniform random sample of every value offered so far."""
    keys = rng.random(values.size)
    if values.size > size:
        chosen = np.argpartition(keys, size)[:size]
        values, keys = values[chosen], keys[chosen]
    values, keys = np.concatenate([kept[0], values]), np.concatenate([kept[1], keys])
    if values.size > size:
        chosen = np.argpartition(keys, size)[:size]
        values, keys = values[chosen], keys[chosen]
    return values, keys


def _input_count(inputs: Any) -> int | None:
    """How many sequences ``inputs`` gives (a dataset's documents or rows, a list's or tensor's length), or None
    when only reading it would tell."""
    if isinstance(inputs, Dataset):
        if inputs.token_ids is not None:
            return len(inputs.token_ids)
        return inputs.meta.get("documents")
    return len(inputs) if hasattr(inputs, "__len__") else None


def _batches(model: HookedModel, inputs: Any, batch_size: int, context_length: int):
    return iter_model_batches(inputs, model.tokenizer, batch_size=batch_size, context_length=context_length)


@renamed_keywords(max_length="context_length")
def detect_massive(
    model: HookedModel,
    inputs: Sequence[str] | torch.Tensor,
    hooks: str | Sequence[str] = "blocks.*.hook_resid_post",
    *,
    criteria: MassiveCriteria | None = None,
    batch_size: int = 8,
    context_length: int = 128,
    median_sample: int = 200_000,
    dataset: str = "texts",
    seed: int = 0,
    progress: bool = False,
) -> MassiveReport:
    """Find massive activations of ``model`` on ``inputs`` (a Dataset, texts, token-id lists or ids [n, pos]).

    Two streaming passes over the inputs (one batch in memory at a time): the first finds the top-k entries and
    the median, the second measures the spread of each top entry's (dimension, token) across inputs.
    """
    criteria = criteria or MassiveCriteria()
    names = model.resolve(hooks)
    notes = [
        f"{n} is not a residual-stream hook; magnitudes there are not comparable to Sun et al.'s thresholds"
        for n in names
        if "resid" not in n and n != "hook_embed"
    ]
    rng = np.random.default_rng(seed)
    tops: dict[str, dict[tuple[int, int], tuple[float, int, int, int, int, float]]] = {n: {} for n in names}
    # the median's sample: each magnitude gets a uniform random key and the median_sample smallest keys are kept,
    # an exactly uniform sample of the values seen, in bounded memory (every value while there are fewer)
    samples: dict[str, tuple[np.ndarray, np.ndarray]] = {
        n: (np.empty(0, np.float32), np.empty(0, np.float64)) for n in names
    }
    bar = tqdm(total=_input_count(inputs), desc="massive: scan", unit="seq", disable=not progress)
    for start, batch in _batches(model, inputs, batch_size, context_length):
        bar.update(len(batch["input_ids"]))
        mask = batch["attention_mask"].bool()
        ids = batch["input_ids"]
        with torch.no_grad(), model.capture(names, dtype=torch.float32) as cache:
            model(batch)
        for name in names:
            act = cache[name]
            if act.ndim != 3:
                raise MassiveError(
                    f"{name} has shape {tuple(act.shape)}; massive activations need [batch, pos, d]"
                )
            real = act[mask]
            if not torch.isfinite(real).all():
                seq, pos = mask.nonzero()[(~torch.isfinite(real)).any(-1).nonzero()[0, 0]].tolist()
                raise MassiveError(f"{name} holds NaN/inf at sequence {start + seq}, position {pos}")
            magnitude = act.abs().masked_fill(~mask[..., None], -1.0)
            values, flat = magnitude.flatten().topk(min(criteria.top_k * 4, magnitude.numel()))
            d = act.shape[-1]
            best = tops[name]
            for value, index in zip(values.tolist(), flat.tolist(), strict=True):
                if value < 0:
                    continue
                b, rest = divmod(index, act.shape[1] * d)
                pos, dim = divmod(rest, d)
                key = (dim, int(ids[b, pos]))  # one entry per (dimension, token): its largest occurrence
                if key not in best or value > best[key][0]:
                    best[key] = (value, start + b, pos, key[1], dim, float(act[b, pos, dim]))
            if len(best) > 4 * criteria.top_k:
                tops[name] = best = dict(
                    heapq.nlargest(4 * criteria.top_k, best.items(), key=lambda kv: kv[1][0])
                )
            samples[name] = _keep_smallest_keys(
                samples[name], real.abs().flatten().numpy(), rng, median_sample
            )
    bar.close()
    spreads = _token_spreads(model, inputs, names, tops, batch_size, context_length)
    layer_rows: list[dict[str, Any]] = []
    top_rows: list[dict[str, Any]] = []
    for name in names:
        pool = samples[name][0] if samples[name][0].size else np.zeros(1)
        median = float(np.median(pool))
        ranked = sorted(tops[name].values(), reverse=True)[: criteria.top_k]
        for rank, (value, seq, pos, token, dim, signed) in enumerate(ranked):
            by_abs, by_ratio, massive = criteria.passes(value, median)
            spread, count = spreads[name].get((dim, token), (np.nan, 0))
            top_rows.append(
                {
                    "hook": name,
                    "rank": rank,
                    "magnitude": value,
                    "value": signed,
                    "dim": dim,
                    "token_id": token,
                    "token": _token_text(model, token),
                    "sequence": seq,
                    "position": pos,
                    "ratio": value / max(median, 1e-12),
                    "spread": spread,
                    "occurrences": count,
                    "passes_abs": by_abs,
                    "passes_ratio": by_ratio,
                    "massive": massive,
                }
            )
        top1 = ranked[0] if ranked else (np.nan, -1, -1, -1, -1, np.nan)
        by_abs, by_ratio, massive = criteria.passes(top1[0], median)
        layer_rows.append(
            {
                "hook": name,
                "layer": _layer_of(name),
                "top1": top1[0],
                "top1_dim": top1[4],
                "top1_token_id": top1[3],
                "top1_token": _token_text(model, top1[3]),
                "top1_position": top1[2],
                "median": median,
                "ratio": top1[0] / max(median, 1e-12),
                "top1_spread": spreads[name].get((top1[4], top1[3]), (np.nan, 0))[0],
                "passes_abs": by_abs,
                "passes_ratio": by_ratio,
                "massive": massive,
                "n_massive": sum(r["massive"] for r in top_rows if r["hook"] == name),
            }
        )
    meta = {"model": model.cfg.name, "checkpoint": model.cfg.checkpoint, "dataset": dataset}
    layers = pd.DataFrame(layer_rows).assign(**meta)
    top = pd.DataFrame(top_rows).assign(**meta)
    layers["checkpoint"] = layers["checkpoint"].astype("Int64")
    top["checkpoint"] = top["checkpoint"].astype("Int64")
    return MassiveReport(layers, top, notes)


def _token_spreads(
    model, inputs, names, tops, batch_size, context_length
) -> dict[str, dict[tuple[int, int], tuple[float, int]]]:
    """For each top (dim, token) of each hook: std / |mean| of that dimension over every occurrence of the token."""
    wanted = {name: sorted(tops[name]) for name in names}
    sums = {name: {key: [0.0, 0.0, 0] for key in keys} for name, keys in wanted.items()}
    for _, batch in _batches(model, inputs, batch_size, context_length):
        mask = batch["attention_mask"].bool()
        ids = batch["input_ids"]
        with torch.no_grad(), model.capture(names, dtype=torch.float64) as cache:
            model(batch)
        for name in names:
            act = cache[name]
            for dim, token in wanted[name]:
                where = mask & (ids == token)
                values = act[..., dim][where]
                acc = sums[name][(dim, token)]
                acc[0] += float(values.sum())
                acc[1] += float((values**2).sum())
                acc[2] += int(values.numel())
    out: dict[str, dict[tuple[int, int], tuple[float, int]]] = {}
    for name, per_key in sums.items():
        out[name] = {}
        for key, (total, squares, count) in per_key.items():
            mean = total / max(count, 1)
            std = np.sqrt(max(squares / max(count, 1) - mean**2, 0.0))
            out[name][key] = (std / max(abs(mean), 1e-12), int(count))
    return out


def _layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" else -1


def _token_text(model: HookedModel, token: int) -> str:
    if model.tokenizer is None or token < 0:
        return str(token)
    return model.tokenizer.decode([token])


# ---------------------------------------------------------------------------------------------- tracking
def track_massive(
    series: CheckpointSeries | Iterable[HookedModel],
    inputs: Sequence[str] | torch.Tensor,
    hooks: str | Sequence[str] = "blocks.*.hook_resid_post",
    *,
    criteria: MassiveCriteria | None = None,
    steps: Sequence[int] | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> MassiveReport:
    """:func:`detect_massive` at every checkpoint (loaded one at a time); rows carry the checkpoint step.

    Checkpoints byte-identical to an earlier one are analysed once (``CheckpointSeries.iter``) and named in a note.
    """
    models = series.iter(steps=steps, progress=progress) if hasattr(series, "iter") else series
    reports = [detect_massive(model, inputs, hooks, criteria=criteria, **kwargs) for model in models]
    if not reports:
        raise MassiveError("the series yielded no checkpoints")
    notes = list(reports[0].notes)
    duplicates = getattr(series, "duplicates", {})
    if duplicates:
        notes.append(
            "byte-identical checkpoints analysed once: "
            + ", ".join(f"step {s} = step {o}" for s, o in sorted(duplicates.items()))
        )
    return MassiveReport(
        pd.concat([r.layers for r in reports], ignore_index=True),
        pd.concat([r.top for r in reports], ignore_index=True),
        notes,
    )


def fit_emergence(
    layers: pd.DataFrame, metric: str = "top1", family: str = "exp_log", **fit_kwargs: Any
) -> pd.DataFrame:
    """Fit ``family`` to ``metric`` over checkpoints, per (model, hook); one row per hook with parameters,
    uncertainties, R², AIC, status and the derived quantities (peak, emergence step, steady state)."""
    rows = []
    for (model_name, hook), group in layers.groupby(["model", "hook"], sort=False):
        group = group.dropna(subset=["checkpoint"]).sort_values("checkpoint")
        steps = group["checkpoint"].to_numpy(dtype=float)
        if len(steps) < 2:
            raise FitError(
                f"{model_name} {hook}: an emergence fit needs a checkpoint series; got {len(steps)} checkpoint(s)"
            )
        fit: CurveFit = fit_curve(steps, group[metric].to_numpy(dtype=float), family, **fit_kwargs)
        row = {
            "model": model_name,
            "hook": hook,
            "layer": int(group["layer"].iloc[0]),
            "metric": metric,
            **fit.as_row(),
        }
        row.update(derived_quantities(fit, float(steps.max())))
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class MassiveSettings:
    """One massive-activation run's settings, shared by :func:`run` and ``workbench massive run`` (its options).

    hooks: hook names or globs; family: the emergence curve family fitted over checkpoints
    (``emergence.FAMILIES``); criteria: the thresholds; batch_size / context_length: how the data is read."""

    hooks: tuple[str, ...] = ("blocks.*.hook_resid_post",)
    family: str = "exp_log"
    criteria: MassiveCriteria = MassiveCriteria()
    batch_size: int = 8
    context_length: int = 128

    def __post_init__(self) -> None:
        object.__setattr__(self, "hooks", (self.hooks,) if isinstance(self.hooks, str) else tuple(self.hooks))
        if self.family not in FAMILIES:
            raise FitError(f"unknown curve family {self.family!r}; registered: {', '.join(FAMILIES)}")


def run(
    model: CheckpointSeries | HookedModel,
    data: Any,
    settings: MassiveSettings | None = None,
    *,
    dataset: str | None = None,
    count_all_checkpoints: Callable[[], int] | None = None,
    report: Callable[[str], None] | None = None,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, pd.DataFrame]:
    """Massive activations of a model, or of every checkpoint of a series with their emergence fits, on ``data``
    → ``{table: frame}`` of :data:`ANALYSIS` (massive_layers, massive_top and, over enough checkpoints,
    massive_fits) for ``write_tables``.

    Args:
        model: a CheckpointSeries (``workbench.references.resolve_series``; one checkpoint: detection only) or a
            HookedModel.
        data: a Dataset, texts, token-id lists or token ids [n, pos].
        settings: :class:`MassiveSettings`; ``overrides`` replace its fields by keyword (``hooks=``, ``family=``,
            ``criteria=``, ``batch_size=``, ``context_length=``).
        dataset: the dataset name the rows carry (default: ``data.name``, else "texts").
        count_all_checkpoints: how many checkpoints the series has without a step restriction (called only when
            too few checkpoints leave no fit, to suggest more steps); None when the steps were not restricted.
        report: receives each note of the run (non-residual hooks, duplicate checkpoints, why no fit was made).
    """
    chosen = settings_with(settings, MassiveSettings, {k: v for k, v in overrides.items() if v is not None})
    hooks, family = chosen.hooks, chosen.family
    settings_: dict[str, Any] = {
        "criteria": chosen.criteria,
        "batch_size": chosen.batch_size,
        "context_length": chosen.context_length,
        "dataset": dataset or (data.name if isinstance(data, Dataset) else "texts"),
    }
    fits = None
    if isinstance(model, CheckpointSeries) and len(model) > 1:
        result = track_massive(model, data, list(hooks), progress=progress, **settings_)
        distinct = result.layers["checkpoint"].nunique()
        needed = len(FAMILIES[family].params) + 1
        if distinct >= needed:
            fits = fit_emergence(result.layers, metric="top1", family=family)
        else:
            available = count_all_checkpoints() if count_all_checkpoints is not None else 0
            result.notes.append(no_fit_note(family, needed, distinct, available))
    else:
        single = model.load(model.steps[0]) if isinstance(model, CheckpointSeries) else model
        result = detect_massive(single, data, list(hooks), progress=progress, **settings_)
    if report is not None:
        for note in result.notes:
            report(note)
    return result.frames(fits)


def no_fit_note(family: str, needed: int, distinct: int, available: int) -> str:
    """Why no emergence fit was made, suggesting only what the user has not done: more --step values when they
    restricted the steps and the series has enough (``available``: its checkpoint count, 0 when not restricted),
    a family with fewer parameters other than the one they chose, else more checkpoints."""
    fixes = []
    if available >= needed:
        fixes.append(f"pass more --step values or drop --step (the series has {available} checkpoints)")
    fewer = [name for name, f in FAMILIES.items() if name != family and len(f.params) + 1 <= distinct]
    if fewer:
        fixes.append(" or ".join(f"--family {name}" for name in fewer) + f" (fits {distinct} checkpoints)")
    if not fixes:
        fixes.append(
            "save more checkpoints of the run (every family needs at least "
            f"{min(len(f.params) + 1 for f in FAMILIES.values())})"
        )
    return (
        f"no {family} emergence fit: it needs {needed} distinct checkpoints, this run has {distinct}; "
        + "; or ".join(fixes)
    )


_ROW_KEYS = ("model", "checkpoint", "hook", "dataset")
ANALYSIS = Analysis(
    name="massive",
    command="workbench massive run MODEL --data DATA",
    tables=(
        Table(
            "massive_layers",
            keys=_ROW_KEYS,
            columns=(
                "layer",
                "top1",
                "top1_dim",
                "top1_token_id",
                "top1_token",
                "top1_position",
                "median",
                "ratio",
                "top1_spread",
                "passes_abs",
                "passes_ratio",
                "massive",
                "n_massive",
            ),
            description="per hook (× checkpoint): top-1 magnitude, median, ratio, "
            "which criteria it passes, how many of the top entries are massive",
        ),
        Table(
            "massive_top",
            keys=_ROW_KEYS,
            columns=(
                "rank",
                "magnitude",
                "value",
                "dim",
                "token_id",
                "token",
                "sequence",
                "position",
                "ratio",
                "spread",
                "occurrences",
                "passes_abs",
                "passes_ratio",
                "massive",
            ),
            description="the largest (dimension, token) entries per hook: |value|, signed value, ratio to the "
            "median, spread over the token's occurrences",
        ),
        Table(
            "massive_fits",
            keys=("model", "hook", "metric", "family"),
            columns=("status", "r2", "peak_step", "emergence_step"),
            description="emergence curve fits",
        ),
    ),
    requires=("text",),
    description="massive activations: detection, tracking over checkpoints, emergence fits",
)
