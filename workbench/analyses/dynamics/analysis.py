"""Training dynamics: what emerges when, over a checkpoint series — one capture per checkpoint feeds every metric.

For each checkpoint, one forward pass per batch captures ``hook_embed``, ``blocks.*.hook_resid_post``,
``blocks.*.mlp.hook_post`` and the attention statistics ``blocks.*.attn.hook_sink|hook_entropy`` (computed inside
the fused kernel when the model runs on the kernel path, from the scores otherwise), and reduces them to
per-prompt values of the tracked metrics (:data:`METRICS`):

- ``massive_top1`` / ``massive_ratio``: top-1 |activation| of the residual stream per layer and its ratio to the
  median |activation| (Sun et al.); layer −1 is the embedding. Which (token, dimension, position) holds the top-1
  is recorded per layer and checkpoint;
- ``sink_mass`` / ``attention_entropy``: per layer × head, the mean attention on the first key and the mean
  entropy (nats) over the query positions after the first (Quantizable Transformers' no-op heads; entropy
  collapse);
- ``mlp_sparsity``: fraction of MLP post-activations with |a| ≤ ``sparsity_threshold`` × their RMS (the Lazy
  Neuron Phenomenon's near-zero activations; a relative threshold so that the growth of the activations' scale
  over training does not count as sparsity);
- ``resid_norm_growth``: the mean residual-stream norm after each layer over the mean norm of the embedding (first
  position left out: its outlier is ``massive_top1``'s).

Further metrics come from ``extra_metrics`` (name -> function of the checkpoint's HookedModel returning
[n_layers] or [n_samples, n_layers] values), e.g. probe accuracy from the probes package (an analysis imports no
other; analysis packages offer metric factories in the ``workbench.dynamics_metrics`` entry-point group,
:func:`metric_providers`, which ``labels=`` and the CLI's ``--labels`` use). Every metric × layer (× head) then gets
an emergence fit (:mod:`workbench.analyses.dynamics.emergence`) with bootstrap intervals over prompts, and
:func:`emergence_order` says which phenomena emerge in which order.

:func:`run` is the analysis contract's entry (frames for ``write_tables``, what ``workbench dynamics run`` stores);
:func:`track_dynamics` returns the whole :class:`DynamicsResult` (per-prompt samples included) for notebooks and the
architecture sweep (:mod:`workbench.analyses.dynamics.sweep`); figures are in
:mod:`workbench.analyses.dynamics.figures`.

Resumable and crash-safe: each checkpoint's per-prompt values are written atomically to
``<workspace>/dynamics/<run>/step<N>.safetensors`` (with the settings and the checkpoint's fingerprint) before its
rows go to the results database; a rerun (also after kill -9) analyses only the checkpoints without a file.
Byte-identical checkpoints are analysed once and left out of the fits (their step label carries no new state).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from workbench.analyses.dynamics.emergence import (
    DERIVED,
    FAMILIES,
    FitError,
    bootstrap_fit,
    derived_quantities,
)
from workbench.analysis import Analysis, Table, write_tables
from workbench.faults import crash_point
from workbench.fileio import atomic_save_tensors, remove_temp_files
from workbench.references import short_name
from workbench.workspace import Workspace, safe_name

if TYPE_CHECKING:
    from workbench.checkpoints import CheckpointSeries
    from workbench.datasets import Dataset
    from workbench.model import HookedModel


class DynamicsError(ValueError):
    """Bad input to the training-dynamics analysis; the message names the problem and the fix."""


@dataclass(frozen=True)
class Metric:
    """A tracked metric: what it measures, whether it is per head, and its natural name in a sentence."""

    description: str
    per_head: bool = False
    phenomenon: str = ""


METRICS: dict[str, Metric] = {
    "massive_top1": Metric(
        "top-1 |activation| of the residual stream", phenomenon="massive activation magnitude"
    ),
    "massive_ratio": Metric(
        "top-1 / median |activation| of the residual stream", phenomenon="massive activation"
    ),
    "sink_mass": Metric("mean attention on the first key", per_head=True, phenomenon="attention sink"),
    "attention_entropy": Metric(
        "mean attention entropy (nats)", per_head=True, phenomenon="entropy collapse"
    ),
    "mlp_sparsity": Metric("fraction of near-zero MLP activations", phenomenon="MLP activation sparsity"),
    "resid_norm_growth": Metric("residual norm / embedding norm", phenomenon="residual norm growth"),
}
NO_HEAD = -1  # the head key of per-layer metrics
FORMAT_VERSION = 1


@dataclass(frozen=True)
class DynamicsSettings:
    """Everything that determines a run's per-checkpoint values (stored with each checkpoint file; a resume with
    other settings is refused)."""

    context_length: int = 64
    max_sequences: int = 32
    max_tokens: int | None = None
    batch_size: int = 8
    bos: bool | None = None
    sparsity_threshold: float = 0.1
    sink_k: int = 1
    extra: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "extra": list(self.extra), "format_version": FORMAT_VERSION}


@dataclass
class DynamicsResult:
    """``metrics``: one row per (checkpoint, metric, layer, head) with the mean over prompts, its standard error
    and (massive metrics) the top-1's token / dimension / position; ``fits``: one row per (metric, layer, head,
    family); ``order``: one row per metric, in order of emergence; ``samples``: metric -> per-prompt values
    [n_steps, n_prompts, n_layers(, n_heads)] over ``steps``; ``spec``: the model's shape facts (ModelSpec)."""

    metrics: pd.DataFrame
    fits: pd.DataFrame
    order: pd.DataFrame
    steps: list[int]
    samples: dict[str, np.ndarray]
    duplicates: dict[int, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    spec: dict[str, Any] = field(default_factory=dict)

    def frames(self) -> dict[str, pd.DataFrame]:
        """The run's tables of :data:`ANALYSIS` (``dynamics_metrics``, ``dynamics_fits``, ``dynamics_order``), for
        ``write_tables``."""
        return {"dynamics_metrics": self.metrics, "dynamics_fits": self.fits, "dynamics_order": self.order}


# ---------------------------------------------------------------------------------------------- capture
def capture_names(model: HookedModel) -> list[str]:
    """The hooks one checkpoint's capture needs (no MLP hook on a model without MLP blocks)."""
    names = [
        "hook_embed",
        "blocks.*.hook_resid_post",
        "blocks.*.attn.hook_sink",
        "blocks.*.attn.hook_entropy",
    ]
    if model.cfg.d_mlp > 0:
        names.append("blocks.*.mlp.hook_post")
    return model.resolve(names)


def checkpoint_metrics(
    model: HookedModel, ids: torch.Tensor, mask: torch.Tensor, settings: DynamicsSettings | None = None
) -> dict[str, np.ndarray]:
    """Per-prompt values of every metric for one model, from one capture per batch.

    Args:
        ids, mask: token rows [n_prompts, pos] and their attention mask (1 = real token).

    Returns metric -> [n_prompts, n_layers + 1] (massive metrics: column 0 is the embedding, layer −1),
    [n_prompts, n_layers] or [n_prompts, n_layers, n_heads]; and ``top1_dim`` / ``top1_token`` /
    ``top1_position`` [n_layers + 1] (where the largest residual magnitude over all prompts sits).
    """
    settings = settings or DynamicsSettings()
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    names = capture_names(model)
    n = len(ids)
    out = {
        "massive_top1": np.zeros((n, n_layers + 1)),
        "massive_ratio": np.zeros((n, n_layers + 1)),
        "sink_mass": np.zeros((n, n_layers, n_heads)),
        "attention_entropy": np.zeros((n, n_layers, n_heads)),
        "resid_norm_growth": np.zeros((n, n_layers)),
    }
    if model.cfg.d_mlp > 0:
        out["mlp_sparsity"] = np.zeros((n, n_layers))
    best = np.full(n_layers + 1, -1.0)
    where = np.full((3, n_layers + 1), -1, dtype=np.int64)  # dim, token, position of the top-1
    previous_sink = model.sink_k
    model.sink_k = settings.sink_k
    try:
        for start in range(0, n, settings.batch_size):
            batch_ids = ids[start : start + settings.batch_size]
            real = mask[start : start + settings.batch_size].bool()
            rows = slice(start, start + len(batch_ids))
            with torch.no_grad(), model.capture(names, dtype=torch.float32) as cache:
                model({"input_ids": batch_ids, "attention_mask": real.long()})
            residuals = [cache["hook_embed"]] + [
                cache[f"blocks.{layer}.hook_resid_post"] for layer in range(n_layers)
            ]
            for column, act in enumerate(residuals):
                magnitude = act.abs().masked_fill(~real[..., None], -1.0)
                top = magnitude.flatten(1).amax(1)
                medians = torch.stack([act[b][real[b]].abs().median() for b in range(len(act))])
                out["massive_top1"][rows, column] = top.double().numpy()
                out["massive_ratio"][rows, column] = (top / medians.clamp_min(1e-12)).double().numpy()
                flat = int(magnitude.argmax())
                if float(magnitude.flatten()[flat]) > best[column]:
                    b, rest = divmod(flat, act.shape[1] * act.shape[2])
                    position, dim = divmod(rest, act.shape[2])
                    best[column] = float(magnitude.flatten()[flat])
                    where[:, column] = (dim, int(batch_ids[b, position]), position)
            later = real.clone()
            later[:, 0] = False  # the first query attends only to itself
            weight = later.double()
            counts = weight.sum(1).clamp_min(1.0)[:, None]
            embed_norm = _mean_norm(cache["hook_embed"], later)
            for layer in range(n_layers):
                for metric, hook in (("sink_mass", "hook_sink"), ("attention_entropy", "hook_entropy")):
                    stat = cache[f"blocks.{layer}.attn.{hook}"].double().nan_to_num(0.0, neginf=0.0)
                    out[metric][rows, layer] = ((stat * weight[:, None, :]).sum(-1) / counts).numpy()
                resid = cache[f"blocks.{layer}.hook_resid_post"]
                out["resid_norm_growth"][rows, layer] = (
                    _mean_norm(resid, later) / embed_norm.clamp_min(1e-12)
                ).numpy()
                if "mlp_sparsity" in out:
                    post = cache[f"blocks.{layer}.mlp.hook_post"].double()
                    out["mlp_sparsity"][rows, layer] = _near_zero_fraction(
                        post, real, settings.sparsity_threshold
                    )
    finally:
        model.sink_k = previous_sink
    for metric, values in out.items():
        if not np.isfinite(values).all():
            raise DynamicsError(
                f"{model.cfg.name} step {model.cfg.checkpoint}: {metric} is NaN/inf (the "
                "checkpoint's activations overflow); check the checkpoint or use --dtype float32"
            )
    out.update(top1_dim=where[0], top1_token=where[1], top1_position=where[2])
    return out


def _mean_norm(act: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean L2 norm over the real positions of each row: act [batch, pos, d], real [batch, pos] -> [batch]."""
    norms = act.double().norm(dim=-1) * real
    return norms.sum(1) / real.sum(1).clamp_min(1)


def _near_zero_fraction(post: torch.Tensor, real: torch.Tensor, threshold: float) -> np.ndarray:
    """Per row: the fraction of real-token entries with |a| ≤ threshold × RMS of the batch's real entries."""
    values = post[real]
    rms = values.pow(2).mean().sqrt().clamp_min(1e-12)
    small = (post.abs() <= threshold * rms) & real[..., None]
    return (small.sum((1, 2)).double() / (real.sum(1).double() * post.shape[-1]).clamp_min(1)).numpy()


# ---------------------------------------------------------------------------------------------- tracking
def run_dir(workspace: Workspace | str | Path | None, run: str) -> Path:
    """Where a run's per-checkpoint files live: ``<workspace>/dynamics/<run>/``."""
    return Workspace(workspace).root / "dynamics" / safe_name(run, "as a dynamics run name")


def metric_providers() -> dict[str, Callable[..., Callable[[HookedModel], Any]]]:
    """Metric factories the installed analysis packages offer (``workbench.dynamics_metrics`` entry points): name ->
    factory(SOURCE, **options) returning a function of a checkpoint's HookedModel -> [n_layers] values
    (``probe_accuracy``: SOURCE is a label source, the probes package fits one probe per layer)."""
    return {
        entry.name: entry.load()
        for entry in importlib.metadata.entry_points(group="workbench.dynamics_metrics")
    }


def track_dynamics(
    series: CheckpointSeries,
    data: Dataset,
    *,
    settings: DynamicsSettings | None = None,
    workspace: Workspace | str | Path | None = None,
    run: str | None = None,
    extra_metrics: Mapping[str, Callable[[HookedModel], Any]] | None = None,
    families: Sequence[str] = ("exp_log",),
    n_boot: int = 100,
    level: float = 0.9,
    steps: Sequence[int] | None = None,
    attention_path: str | None = None,
    seed: int = 0,
    write: bool = True,
    progress: bool = True,
) -> DynamicsResult:
    """Capture every metric at every checkpoint of ``series`` on ``data`` (resuming a killed run), fit their
    emergence curves and order them.

    Each checkpoint's ``dynamics_metrics`` rows go to the workspace as it finishes (a killed run's progress is kept
    there as in its run directory); ``write`` also stores the run's three tables at the end (:meth:`DynamicsResult.
    frames`; False when the caller stores them, as :func:`run`'s command does). ``run`` names the run directory
    (default: series name + dataset); ``steps`` restricts the checkpoints; ``attention_path="kernel"`` computes the
    attention statistics inside the fused Triton kernel.
    """
    extra_metrics = dict(extra_metrics or {})
    clash = sorted(set(extra_metrics) & set(METRICS))
    if clash:
        raise DynamicsError(f"extra metric name(s) {clash} are built-in metrics; name them differently")
    for family in families:
        if family not in FAMILIES:
            raise FitError(f"unknown curve family {family!r}; registered: {', '.join(FAMILIES)}")
    settings = settings or DynamicsSettings()
    settings = DynamicsSettings(**{**asdict(settings), "extra": tuple(sorted(extra_metrics))})
    ANALYSIS.check(data=data)
    chosen = sorted(steps) if steps is not None else list(series.steps)
    run = run or f"{short_name(series.name)}--{short_name(data.name)}"
    directory = run_dir(workspace, run)  # made by the first checkpoint's write (nothing before a refusal)
    remove_temp_files(directory)
    expected = json.dumps({**settings.to_json(), "model": series.name, "dataset": data.name}, sort_keys=True)
    done = _read_done(directory, expected, run)
    fingerprints = {step: record["fingerprint"] for step, record in done.items() if record["fingerprint"]}
    duplicates: dict[int, int] = {}
    todo = []
    for step in chosen:
        if step in done:
            continue
        key = series.fingerprint(step)
        earlier = [s for s, f in fingerprints.items() if key is not None and f == key and s < step]
        if earlier:
            duplicates[step] = min(earlier)
        else:
            todo.append(step)
    tokens: tuple[torch.Tensor, torch.Tensor] | None = None
    tokenizer: Any = None
    series.duplicates.clear()
    for model in series.iter(steps=todo, progress=progress) if todo else []:
        step = int(model.cfg.checkpoint or 0)
        if attention_path is not None:
            model.set_attention_path(attention_path)
        if tokens is None:
            tokens, tokenizer = _tokens(data, model, settings), model.tokenizer
        ids, mask = tokens
        values = checkpoint_metrics(model, ids, mask, settings)
        for name, fn in extra_metrics.items():
            values[name] = _extra_values(name, fn(model), model.cfg.n_layers)
        meta = {
            "settings": expected,
            "step": str(step),
            "fingerprint": series.fingerprint(step) or "",
            "tokens_sha256": hashlib.sha256(ids.numpy().tobytes() + mask.numpy().tobytes()).hexdigest(),
            "spec": json.dumps(model.cfg.to_dict(), sort_keys=True, default=str),
        }
        atomic_save_tensors(
            directory / f"step{step}.safetensors",
            {k: torch.tensor(np.asarray(v)) for k, v in values.items()},
            meta,
            boundary="dynamics.checkpoint",
        )
        done[step] = {"values": values, "fingerprint": meta["fingerprint"], "meta": meta}
        write_tables(
            workspace,
            ANALYSIS,
            {"dynamics_metrics": _metric_rows(series.name, data.name, {step: values}, model.tokenizer)},
        )
        crash_point("dynamics.checkpoint_written")
    duplicates.update(series.duplicates)
    analysed = sorted(s for s in done if s in chosen and s not in duplicates)
    if not analysed:
        raise DynamicsError(f"{series.name}: no checkpoint analysed (steps {chosen})")
    hashes = {done[s]["meta"]["tokens_sha256"] for s in analysed}
    if len(hashes) > 1:
        raise DynamicsError(
            f"{directory}: checkpoints were analysed on different token rows (tokenizers differ "
            "between checkpoints?); delete the directory or pass another --run"
        )
    per_step = {s: done[s]["values"] for s in analysed}
    tokenizer = tokenizer if tokenizer is not None else _tokenizer_of(series, analysed[-1])
    metrics = _metric_rows(series.name, data.name, per_step, tokenizer)
    samples = {
        name: np.stack([per_step[s][name] for s in analysed]) for name in _metric_names(per_step[analysed[0]])
    }
    fits = fit_dynamics(
        analysed, samples, families=families, n_boot=n_boot, level=level, seed=seed, progress=progress
    )
    fits = fits.assign(model=series.name, dataset=data.name)
    order = emergence_order(fits).assign(model=series.name, dataset=data.name)
    notes = []
    needed = min(len(FAMILIES[f].params) for f in families) + 1
    if len(analysed) < needed:
        notes.append(
            f"{len(analysed)} distinct checkpoint(s): metrics recorded, but an emergence fit needs at least "
            f"{needed}; pass a series with more checkpoints (or --family log, which needs 4)"
        )
    if duplicates:
        notes.append(
            "byte-identical checkpoints analysed once and left out of the fits: "
            + ", ".join(f"step {s} = step {o}" for s, o in sorted(duplicates.items()))
        )
    spec = json.loads(done[analysed[-1]]["meta"].get("spec", "{}"))
    result = DynamicsResult(metrics, fits, order, analysed, samples, duplicates, notes, spec)
    if write:
        write_tables(workspace, ANALYSIS, result.frames())
    return result


def run(
    model: CheckpointSeries,
    data: Dataset,
    *,
    labels: str | None = None,
    report: Callable[[str], None] | None = None,
    **options: Any,
) -> dict[str, pd.DataFrame]:
    """Training dynamics of a checkpoint series on a dataset → ``{table: frame}`` of :data:`ANALYSIS`
    (``dynamics_metrics``, ``dynamics_fits``, ``dynamics_order``) for ``write_tables``.

    Args:
        model: a CheckpointSeries (``workbench.references.resolve_series``; any model reference with checkpoints).
        data: a text or token Dataset (``workbench.datasets.load_dataset``).
        labels: also track probe accuracy per layer for this label source (the ``probe_accuracy`` metric of the
            ``workbench.dynamics_metrics`` entry points; texts for label functions come from ``data``).
        report: receives each note of the run (too few checkpoints to fit, byte-identical checkpoints).
        options: :func:`track_dynamics`'s keyword arguments (settings, workspace, run, extra_metrics, families,
            n_boot, level, steps, attention_path, seed, progress); the run's files and each checkpoint's
            ``dynamics_metrics`` rows go to ``workspace`` as the checkpoints finish, the returned frames are the
            whole run's.
    """
    if labels is not None:
        providers = metric_providers()
        if "probe_accuracy" not in providers:
            raise DynamicsError(
                "--labels needs the probes package's probe_accuracy metric (workbench.dynamics_metrics "
                "entry point); reinstall the workbench (pip install -e .)"
            )
        extra = dict(options.pop("extra_metrics", None) or {})
        extra["probe_accuracy"] = providers["probe_accuracy"](labels, data=data)
        options["extra_metrics"] = extra
    result = track_dynamics(model, data, write=False, **options)
    if report is not None:
        for note in result.notes:
            report(note)
    return result.frames()


def _tokens(
    data: Dataset, model: HookedModel, settings: DynamicsSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = data.token_tensor(
        model.tokenizer,
        context_length=settings.context_length,
        bos=settings.bos,
        max_rows=settings.max_sequences,
        max_tokens=settings.max_tokens,
    )
    if len(ids) == 0 or int(mask[:, 1:].sum()) == 0:
        raise DynamicsError(
            f"{data.name} gives no token rows with more than one token at context length "
            f"{settings.context_length}; pass more text or a longer --context-length"
        )
    return ids, mask


def _extra_values(name: str, value: Any, n_layers: int) -> np.ndarray:
    array = np.asarray(value, dtype=float)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != n_layers:
        raise DynamicsError(
            f"extra metric {name!r} returned shape {np.shape(value)}; expected [n_layers={n_layers}]"
            " or [n_samples, n_layers]"
        )
    return array


def _metric_names(values: Mapping[str, np.ndarray]) -> list[str]:
    return [name for name in values if not name.startswith("top1_")]


def _read_done(directory: Path, expected: str, run: str) -> dict[int, dict[str, Any]]:
    """The checkpoints a previous run finished (their per-prompt values, fingerprint and metadata)."""
    done: dict[int, dict[str, Any]] = {}
    for path in sorted(directory.glob("step*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                values = {key: handle.get_tensor(key).numpy() for key in handle.keys()}  # noqa: SIM118
        except Exception as err:  # noqa: BLE001 - a damaged file is named, with the fix
            raise DynamicsError(
                f"{path} is not a readable checkpoint result ({err}); delete it to recompute"
            ) from None
        if meta.get("settings") != expected:
            raise DynamicsError(
                f"{directory} holds run {run!r} with other settings or another model/dataset (stored "
                f"{meta.get('settings')}, requested {expected}); pass another --run, or delete {directory} to start over"
            )
        done[int(meta["step"])] = {"values": values, "fingerprint": meta.get("fingerprint", ""), "meta": meta}
    return done


def _tokenizer_of(series: CheckpointSeries, step: int) -> Any:
    """The series' tokenizer without loading weights (None when it cannot be had)."""
    try:
        return series.tokenizer(step)
    except Exception:  # noqa: BLE001 - token texts are a convenience; ids are always recorded
        return None


def _metric_rows(
    model: str, dataset: str, per_step: Mapping[int, Mapping[str, np.ndarray]], tokenizer: Any
) -> pd.DataFrame:
    """Long table: the mean over prompts (and its standard error) per checkpoint × metric × layer × head."""
    rows = []
    for step, values in per_step.items():
        for name in _metric_names(values):
            array = np.asarray(values[name], dtype=float)
            mean = array.mean(0)
            sem = array.std(0, ddof=1) / np.sqrt(len(array)) if len(array) > 1 else np.zeros_like(mean)
            offset = 1 if name.startswith("massive_") else 0
            for index in np.ndindex(mean.shape):
                layer = index[0] - offset
                row = {
                    "model": model,
                    "checkpoint": int(step),
                    "dataset": dataset,
                    "metric": name,
                    "layer": layer,
                    "head": int(index[1]) if len(index) > 1 else NO_HEAD,
                    "value": float(mean[index]),
                    "sem": float(sem[index]),
                    "n_prompts": len(array),
                    "hook": _hook_of(name, layer),
                }
                if offset:
                    token = int(values["top1_token"][index[0]])
                    row.update(
                        top1_dim=int(values["top1_dim"][index[0]]),
                        top1_token_id=token,
                        top1_position=int(values["top1_position"][index[0]]),
                        top1_token=tokenizer.decode([token]) if tokenizer is not None else str(token),
                    )
                rows.append(row)
    return pd.DataFrame(rows)


def _hook_of(metric: str, layer: int) -> str:
    if metric.startswith("massive_"):
        return "hook_embed" if layer < 0 else f"blocks.{layer}.hook_resid_post"
    return {
        "sink_mass": f"blocks.{layer}.attn.hook_sink",
        "attention_entropy": f"blocks.{layer}.attn.hook_entropy",
        "mlp_sparsity": f"blocks.{layer}.mlp.hook_post",
        "resid_norm_growth": f"blocks.{layer}.hook_resid_post",
    }.get(metric, f"blocks.{layer}")


# ---------------------------------------------------------------------------------------------- fits
def fit_dynamics(
    steps: Sequence[int],
    samples: Mapping[str, np.ndarray],
    *,
    families: Sequence[str] = ("exp_log",),
    n_boot: int = 100,
    level: float = 0.9,
    seed: int = 0,
    progress: bool = False,
) -> pd.DataFrame:
    """Fit every metric × layer (× head) over ``steps`` with bootstrap intervals over prompts.

    Args:
        samples: metric -> [n_steps, n_prompts, n_layers(, n_heads)] per-prompt values (massive metrics carry the
            embedding as column 0, reported as layer −1).

    Returns one row per (metric, layer, head, family) with status, parameters, delta-method errors, bootstrap
    intervals (``low_<q>`` / ``high_<q>``), the derived quantities and ``selected`` (the family used for the
    emergence order: the lowest AIC among identifiable fits, else among usable ones).
    """
    t = np.asarray(steps, dtype=float)
    rows = []
    bar = tqdm(
        total=sum(int(np.prod(np.shape(a)[2:])) for a in samples.values()),
        desc="dynamics: fits",
        unit="curve",
        disable=not progress,
    )
    for name, array in samples.items():
        array = np.asarray(array, dtype=float)
        offset = 1 if name.startswith("massive_") else 0
        for index in np.ndindex(array.shape[2:]):
            bar.update()
            per_prompt = array[(slice(None), slice(None), *index)].T  # [n_prompts, n_steps]
            candidates = []
            for family in families:
                base = {
                    "metric": name,
                    "layer": index[0] - offset,
                    "head": int(index[1]) if len(index) > 1 else NO_HEAD,
                    "hook": _hook_of(name, index[0] - offset),
                }
                try:
                    fit = bootstrap_fit(
                        t, family=family, samples=per_prompt, n_boot=n_boot, level=level, seed=seed
                    )
                except FitError as err:
                    rows.append({**base, "family": family, "status": "refused", "message": str(err)})
                    continue
                row = {**base, **fit.as_row(), **derived_quantities(fit, float(t.max()))}
                change = float(np.nanmean(per_prompt[:, -1]) - np.nanmean(per_prompt[:, 0]))
                row["change"], row["trend"] = abs(change), int(np.sign(change))
                row["scale"] = float(np.nanmax(np.abs(per_prompt.mean(0)))) or 1.0
                candidates.append(row)
            usable = [r for r in candidates if r["status"] in ("ok", "non_identifiable")]
            pool = [r for r in usable if r["status"] == "ok"] or usable
            chosen = min(pool, key=lambda r: r["aic"]) if pool else None
            for row in candidates:
                row["selected"] = row is chosen
                rows.append(row)
    bar.close()
    frame = pd.DataFrame(rows)
    for column in ("r2", "aic", "change", "scale", "trend", "direction", *DERIVED):
        if column not in frame:
            frame[column] = np.nan
    frame["selected"] = frame["selected"].fillna(False).astype(bool) if "selected" in frame else False
    return frame


def emergence_order(fits: pd.DataFrame) -> pd.DataFrame:
    """Which phenomena emerge in which order: per metric, its most pronounced series (the largest relative change
    among selected usable fits), its emergence (half-rise) step with the bootstrap interval, ranked by that step.

    ``resolved_before_next`` is True when the interval ends before the next phenomenon's interval begins (the order
    is beyond the prompt-sampling uncertainty); metrics without a usable fit come last with their status. Ties
    (equal steps, no fit) follow :data:`METRICS`' order, then the name, so a resumed run ranks as a fresh one.
    ``steady_state`` (the curve's extrapolated level) is NaN for a non-identifiable fit, whose half-rise step is
    determined but whose long-run level is not.
    """
    rows = []
    for metric, group in fits.groupby("metric", sort=False):
        usable = group[group["selected"] & group["status"].isin(["ok", "non_identifiable"])]
        usable = usable[np.isfinite(usable["emergence_step"].astype(float))]
        base = {"metric": metric, "phenomenon": METRICS[metric].phenomenon if metric in METRICS else metric}
        if usable.empty:
            statuses = ", ".join(sorted(set(group["status"].astype(str))))
            rows.append({**base, "status": statuses, "emergence_step": np.nan})
            continue
        best = usable.loc[(usable["change"] / usable["scale"]).idxmax()]
        rows.append(
            {
                **base,
                "layer": int(best["layer"]),
                "head": int(best["head"]),
                "family": best["family"],
                "status": best["status"],
                "emergence_step": float(best["emergence_step"]),
                "low_emergence_step": float(best.get("low_emergence_step", np.nan)),
                "high_emergence_step": float(best.get("high_emergence_step", np.nan)),
                # the extrapolated level is only reported where the curve's parameters are determined
                "steady_state": float(best["steady_state"]) if best["status"] == "ok" else np.nan,
                "trend": int(best["trend"]),
                "relative_change": float(best["change"] / best["scale"]),
                "n_series": int(len(usable)),
            }
        )
    order = pd.DataFrame(rows)
    built_in = list(METRICS)
    tie = order["metric"].map(lambda m: built_in.index(m) if m in built_in else len(built_in))
    order = (
        order.assign(tie=tie)
        .sort_values(["emergence_step", "tie", "metric"], na_position="last", kind="stable")
        .drop(columns="tie")
        .reset_index(drop=True)
    )
    order["rank"] = np.arange(1, len(order) + 1)
    high = order.get("high_emergence_step", pd.Series(np.nan, index=order.index)).to_numpy(dtype=float)
    low = order.get("low_emergence_step", pd.Series(np.nan, index=order.index)).to_numpy(dtype=float)
    order["resolved_before_next"] = [
        bool(i + 1 < len(order) and high[i] < low[i + 1]) for i in range(len(order))
    ]
    return order


def describe_order(order: pd.DataFrame) -> str:
    """The emergence order as one sentence per phenomenon (for the CLI, notebooks and RESULTS)."""
    lines = []
    for _, row in order.iterrows():
        if not np.isfinite(row["emergence_step"]):
            lines.append(f"{row['phenomenon']} ({row['metric']}): no usable fit ({row['status']})")
            continue
        where = f"layer {int(row['layer'])}" + (f" head {int(row['head'])}" if row["head"] != NO_HEAD else "")
        interval = ""
        if np.isfinite(row.get("low_emergence_step", np.nan)):
            interval = f" [{row['low_emergence_step']:.0f}, {row['high_emergence_step']:.0f}]"
        tie = "" if row["resolved_before_next"] or row["rank"] == len(order) else " (overlaps the next)"
        trend = "rises" if row["trend"] > 0 else "falls"
        lines.append(
            f"{int(row['rank'])}. {row['phenomenon']} ({row['metric']}, {where}) {trend}: half-way at step "
            f"{row['emergence_step']:.0f}{interval}, {row['status']}{tie}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- tables
_METRIC_KEYS = ("model", "checkpoint", "dataset", "metric", "layer", "head")
ANALYSIS = Analysis(
    name="dynamics",
    command="workbench dynamics run SERIES --data DATA",
    tables=(
        Table(
            "dynamics_metrics",
            keys=_METRIC_KEYS,
            columns=("value", "sem", "n_prompts", "top1_dim", "top1_token"),
            description="per checkpoint × metric × layer (× head): mean over prompts",
        ),
        Table(
            "dynamics_fits",
            keys=("model", "dataset", "metric", "layer", "head", "family"),
            columns=("status", "r2", "emergence_step", "steady_state", "selected"),
            description="emergence fits with bootstrap intervals and identifiability status",
        ),
        Table(
            "dynamics_order",
            keys=("model", "dataset", "metric"),
            columns=("rank", "emergence_step", "low_emergence_step", "high_emergence_step"),
            description="which phenomenon emerges when",
        ),
        Table(
            "dynamics_sweep_fits",
            keys=("sweep", "model", "dataset", "metric", "layer", "head", "family"),
            columns=("status", "r2", "emergence_step", "steady_state"),
            description="the architecture sweep's per-layer fits with each configuration's features",
        ),
        Table(
            "dynamics_predictor",
            keys=("sweep", "metric", "target"),
            columns=("r2", "n_rows", "claim"),
            description="leave-one-architecture-out R² of the architecture → parameter predictor",
        ),
        Table(
            "dynamics_predictions",
            keys=("sweep", "metric", "target", "model", "layer"),
            columns=("fitted", "predicted"),
            description="out-of-fold predicted vs fitted parameters",
        ),
    ),
    requires=("text",),
    description="training dynamics: massive activations, sinks, entropy, MLP sparsity and norm growth over "
    "checkpoints, their emergence fits and order",
)
