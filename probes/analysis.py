"""Probing a model (or every checkpoint of a series) for any label source: data, controls, results rows.

    frames = run(model, "reviews.csv", labels="reviews.csv:text:label", position="first")  # or zoo:bracket_depth, …
    write_tables(workspace, ANALYSIS, frames)                   # table probe_results: one row per checkpoint × hook
    probe_heatmap(frames["probe_results"], "reviews.csv:label@first")      # probes.figures

Label sources (user files, label functions, the zoo's label sets) live in :mod:`workbench.labels`. Every row reports
the held-out score of the probe, the control-task score (Hewitt & Liang: a random label per token type, drawn from
the label distribution; for per-sequence labels the "type" is the sequence's token content, so held-out sequences
are unseen types and the control scores near chance), the selectivity (score − control score), the majority-class
baseline, the token-identity baseline (the best lookup from the probed token's type to the real label; NaN for
mean-pooled sequences and regression) and, optionally, the score of the same probe on a randomly initialised copy
of the model.

With a small vocabulary (the zoo's 512 BPE tokens, TokFSM's 20) token identity is linearly decodable at every
layer, so the control task saturates (1.0 on TokFSM) and selectivity is negative even for a probe that reads
context. The token-identity baseline is then the informative control: a probe above it reads information the
token alone does not carry.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from workbench.analysis import Analysis, Table
from workbench.checkpoints import CheckpointSeries
from workbench.datasets import Dataset, load_dataset
from workbench.deprecation import renamed_keywords
from workbench.labels import LabelDataset, LabelSource, label_provider, parse_label_source
from workbench.model import HookedModel
from workbench.probes.linear import TASKS, LinearProbes, ProbeError, cross_validate, fit_probes

__all__ = [
    "ANALYSIS",
    "LabelDataset",
    "ProbeSettings",
    "collect_activations",
    "fit_model_probes",
    "label_dataset",
    "labels_for_model",
    "run",
]

RESULTS_TABLE = "probe_results"
TASKS_TABLE = "probe_tasks"
RESULT_KEYS = ["model", "checkpoint", "hook", "label_set", "dataset"]
DEFAULT_HOOKS = "blocks.*.hook_resid_post"
ANALYSIS = Analysis(
    name="probes",
    command="workbench probe run MODEL --labels LABELS [--data DATA]  |  workbench probe jobs run JOB.toml",
    tables=(
        Table(
            RESULTS_TABLE,
            keys=tuple(RESULT_KEYS),
            columns=(
                "layer",
                "position",
                "label_names",
                "metric",
                "score",
                "control_score",
                "selectivity",
                "majority_score",
                "token_identity_score",
                "random_init_score",
                "cv_mean",
                "cv_std",
                "n_train",
                "n_test",
                "n_classes",
                "l2",
                "job",
            ),
            description="One linear probe per (model, checkpoint, hook, label set, dataset): held-out "
            "score and its controls",
        ),
        Table(
            TASKS_TABLE,
            keys=("job", "task"),
            columns=(
                "model",
                "checkpoint",
                "label_set",
                "status",
                "error",
                "seconds",
                "fingerprint",
                "threads",
                "finished_at",
            ),
            description="State of each task of a probe job (done / failed, with its error)",
        ),
    ),
    description="Linear probes for any label source (label files, label functions, zoo label sets) with controls",
)


class ProbeSettingError(ProbeError):
    """An invalid :class:`ProbeSettings` value; ``key`` names the setting."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"setting {key!r} {message}")
        self.key = key


# What each setting must satisfy (its type comes from the default value).
_SETTING_RULES: dict[str, tuple[Any, str]] = {
    "n_sequences": (lambda v: v >= 2, "≥ 2 (the held-out split is by sequence)"),
    "context_length": (lambda v: v >= 2, "≥ 2"),
    "test_fraction": (lambda v: 0 < v < 1, "strictly between 0 and 1"),
    "l2": (lambda v: math.isfinite(v) and v >= 0, "a finite number ≥ 0"),
    "max_iter": (lambda v: v >= 1, "≥ 1"),
    "task": (lambda v: v in TASKS, f"one of {', '.join(TASKS)}"),
    "cv_folds": (lambda v: v == 0 or v >= 2, "0 (no cross-validation) or ≥ 2"),
    "batch_size": (lambda v: v >= 1, "≥ 1"),
    "seed": (lambda v: v >= 0, "≥ 0"),
}


@dataclass
class ProbeSettings:
    """What a probe fit uses; every field is a key of a job file's [settings] table.

    ``n_sequences`` is the number of sequences of a zoo label set (and of documents a label function labels; label
    files use every row); ``context_length`` the tokens per sequence every label source is tokenized to.
    Values are checked on construction (:class:`ProbeSettingError` names the bad one): ints must be ints (not
    bools), floats accept ints, and each value must satisfy its rule (e.g. ``0 < test_fraction < 1``).
    """

    n_sequences: int = 64
    context_length: int = 64
    test_fraction: float = 0.25
    l2: float = 1e-3
    max_iter: int = 100
    task: str = "classification"
    cv_folds: int = 0
    control: bool = True
    random_init: bool = True
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            expected = type(item.default)
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, item.name, value)
            if type(value) is not expected:
                raise ProbeSettingError(item.name, f"must be {expected.__name__}; got {value!r}")
            rule, wanted = _SETTING_RULES.get(item.name, (lambda v: True, ""))
            if not rule(value):
                raise ProbeSettingError(item.name, f"must be {wanted}; got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@renamed_keywords(seq_len="context_length")
def label_dataset(
    label_set: str,
    *,
    tokenizer: Any = None,
    fsm: Any = None,
    n_sequences: int = 64,
    context_length: int = 64,
    seed: int = 0,
) -> LabelDataset:
    """A seeded zoo label set (``zoo:NAME`` of :mod:`workbench.labels`): Python labels need the model's ``tokenizer``,
    TokFSM labels the ``fsm`` (a :class:`workbench.zoo.corpora.TokFSM`)."""
    name = label_set.removeprefix("zoo:")
    return parse_label_source(f"zoo:{name}").build(
        tokenizer, fsm=fsm, n_sequences=n_sequences, context_length=context_length, seed=seed
    )


def labels_for_model(
    source: str | Path | LabelSource | Any,
    model: HookedModel,
    *,
    location: str | Path | None = None,
    data: str | Path | Dataset | None = None,
    position: str | int | None = None,
    settings: ProbeSettings | None = None,
) -> LabelDataset:
    """Any label source aligned to ``model``'s tokenizer with ``settings`` (n_sequences, context_length, seed, task).

    The TokFSM label sets find their machine in the zoo model directory ``location`` (the one the model was loaded
    from) unless ``data`` is ``zoo:tokfsm``.
    """
    settings = settings or ProbeSettings()
    parsed = source if isinstance(source, LabelSource) else parse_label_source(source)
    dataset = load_dataset(data) if data is not None and not isinstance(data, Dataset) else data
    fsm = None
    if parsed.needs_fsm and dataset is None:
        if location is None:
            raise ProbeError(
                f"label set {parsed.set_name!r} needs a zoo model trained on TokFSM (or --data zoo:tokfsm)"
            )
        fsm = zoo_fsm(location)
    return parsed.build(
        model.tokenizer,
        data=dataset,
        fsm=fsm,
        position=position,
        task=settings.task,
        context_length=settings.context_length,
        batch_size=settings.batch_size,
        n_sequences=settings.n_sequences,
        seed=settings.seed,
    )


def collect_activations(
    model: HookedModel, dataset: LabelDataset, hooks: str | Sequence[str], batch_size: int = 16
) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations of the labelled tokens: (hook names, x [hooks, n_samples, d], labels [n_samples], token ids
    [n_samples], sequence index [n_samples]). Hooks must share the width d (e.g. the residual stream).

    A sample is a labelled token; for a mean-pooled dataset (``position="mean"``) it is a sequence, its activation
    the mean over its labelled tokens and its token id −1. Padding (``dataset.mask`` = 0) is never a sample.
    """
    names = model.resolve(hooks)
    keep = dataset.labelled()
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    with torch.no_grad(), model.capture(names) as cache:
        for begin in range(0, len(dataset.tokens), batch_size):
            rows = keep[begin : begin + batch_size]
            mask = dataset.mask[begin : begin + batch_size]
            model(
                dataset.tokens[begin : begin + batch_size], attention_mask=None if bool(mask.all()) else mask
            )
            for name in names:
                act = cache[name].float()
                if act.ndim != 3:
                    raise ProbeError(
                        f"probed hooks must be [batch, pos, d] activations; {name} is "
                        f"{list(act.shape)}. Probe the residual stream, attn/mlp outputs or z"
                    )
                if dataset.pooled:
                    weight = rows[..., None].float()
                    act = ((act * weight).sum(1) / weight.sum(1).clamp_min(1))[rows.any(1)]
                else:
                    act = act[rows]
                parts[name].append(act)
    widths = {name: parts[name][0].shape[-1] for name in names}
    if len(set(widths.values())) != 1:
        raise ProbeError(
            f"probed hooks must be [batch, pos, d] activations of one width; got {widths}. "
            "Probe hooks of different widths in separate calls"
        )
    x = torch.stack([torch.cat(parts[name]) for name in names])
    if dataset.pooled:
        has = keep.any(1)
        first = keep.float().argmax(1)
        rows_index = torch.arange(len(keep))
        labels = dataset.labels[rows_index, first][has]
        return names, x, labels, torch.full((int(has.sum()),), -1), rows_index[has]
    sequence = torch.arange(len(dataset.tokens))[:, None].expand_as(keep)[keep]
    return names, x, dataset.labels[keep], dataset.tokens[keep], sequence


def control_labels(token_ids: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Hewitt & Liang's control task: each token type gets one label drawn from the empirical label
    distribution, fixed for every occurrence of that type. token_ids, labels [n] → control labels [n]."""
    generator = torch.Generator().manual_seed(seed)
    values, counts = torch.unique(labels, return_counts=True)
    types, inverse = torch.unique(token_ids, return_inverse=True)
    drawn = torch.multinomial(counts.double(), len(types), replacement=True, generator=generator)
    return values[drawn][inverse]


def split_by_sequence(
    sequence: torch.Tensor, test_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out split by sequence (no sequence is in both halves): boolean train, test masks [n]."""
    if not 0 < test_fraction < 1:
        raise ProbeError(f"test_fraction={test_fraction} must lie strictly between 0 and 1")
    ids = torch.unique(sequence)
    if len(ids) < 2:
        raise ProbeError("a held-out split needs at least two sequences; raise n_sequences")
    order = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))]
    n_test = min(len(ids) - 1, max(1, round(len(ids) * test_fraction)))
    test = torch.isin(sequence, order[:n_test])
    return ~test, test


def _majority_score(train: torch.Tensor, test: torch.Tensor, task: str) -> float:
    if task == "regression":
        prediction = train.float().mean()
        residual = ((test.float() - prediction) ** 2).sum()
        total = ((test.float() - test.float().mean()) ** 2).sum().clamp_min(1e-12)
        return float(1 - residual / total)
    values, counts = torch.unique(train, return_counts=True)
    return float((test == values[counts.argmax()]).double().mean())


def token_identity_score(
    token_ids: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, test: torch.Tensor
) -> float:
    """Accuracy of the best lookup from token type to label (the training majority label of each type; unseen
    types get the overall majority): what lexical identity alone explains. Inputs [n]; masks [n]."""
    types, inverse = torch.unique(token_ids, return_inverse=True)
    values, label_index = torch.unique(labels, return_inverse=True)
    counts = torch.zeros(len(types), len(values))
    counts.index_put_((inverse[train], label_index[train]), torch.ones(int(train.sum())), accumulate=True)
    overall = counts.sum(0).argmax()
    best = torch.where(counts.sum(1) > 0, counts.argmax(1), overall)
    return float((values[best[inverse[test]]] == labels[test]).double().mean())


def _layer(hook: str) -> int:
    parts = hook.split(".")
    return int(parts[1]) if parts[0] == "blocks" and parts[1].isdigit() else -1


def fit_model_probes(
    model: HookedModel,
    dataset: LabelDataset,
    hooks: str | Sequence[str] = DEFAULT_HOOKS,
    settings: ProbeSettings | None = None,
) -> tuple[pd.DataFrame, LinearProbes]:
    """Probe every hook of ``model`` for ``dataset``'s labels in one batched fit → (one row per hook, the fitted
    probes, one site per hook, trained on the training split; ``probes.readout.save_probe`` keeps them).

    The fit is a regression when the dataset's or the settings' task is one. Columns: model, checkpoint, hook,
    layer, label_set, dataset, position ("token", or where a sequence label is probed), label_names (JSON list),
    metric, score (held out), control_score, selectivity, majority_score, token_identity_score, random_init_score,
    cv_mean, cv_std, n_train, n_test, n_classes, l2.
    """
    settings = settings or ProbeSettings()
    task = "regression" if "regression" in (dataset.task, settings.task) else "classification"
    if (
        task == "regression"
        and dataset.task == "classification"
        and dataset.classes
        and not _numeric(dataset)
    ):
        raise ProbeError(
            f"{dataset.name!r} holds classes {list(dataset.classes)[:5]}, not numbers; regression needs "
            "numeric labels (build them with task='regression')"
        )
    names, x, labels, token_ids, sequence = collect_activations(model, dataset, hooks, settings.batch_size)
    if len(labels) == 0:
        raise ProbeError(f"no labelled tokens for {dataset.name!r} in the dataset ({dataset.dataset})")
    train, test = split_by_sequence(sequence, settings.test_fraction, settings.seed)
    fit = {"task": task, "l2": settings.l2, "max_iter": settings.max_iter, "sites": names}
    probes = fit_probes(x[:, train], labels[train], **fit)
    score = probes.score(x[:, test], labels[test]).numpy()
    identity = task == "classification" and not dataset.pooled
    rows = pd.DataFrame(
        {
            "model": model.cfg.name,
            "checkpoint": model.cfg.checkpoint,
            "hook": names,
            "layer": [_layer(n) for n in names],
            "label_set": dataset.name,
            "dataset": dataset.dataset,
            "position": "token" if dataset.level == "token" else str(dataset.position),
            "label_names": json.dumps(list(dataset.label_names)),
            "metric": "accuracy" if task == "classification" else "r2",
            "score": score,
            "majority_score": _majority_score(labels[train], labels[test], task),
            "token_identity_score": token_identity_score(token_ids, labels, train, test)
            if identity
            else np.nan,
            "n_train": int(train.sum()),
            "n_test": int(test.sum()),
            "n_classes": len(probes.classes) if probes.classes is not None else 0,
            "l2": settings.l2,
        }
    )
    rows["control_score"] = np.nan
    if settings.control:
        types = _sequence_types(dataset)[sequence] if dataset.level == "sequence" else token_ids
        control = control_labels(types, labels, settings.seed)
        if len(torch.unique(control[train])) > 1:
            control_probes = fit_probes(x[:, train], control[train], **fit)
            rows["control_score"] = control_probes.score(x[:, test], control[test]).numpy()
    rows["selectivity"] = rows["score"] - rows["control_score"]
    rows["random_init_score"] = np.nan
    if settings.random_init:
        baseline = model.fresh_copy(settings.seed)
        _, x_random, *_ = collect_activations(baseline, dataset, names, settings.batch_size)
        random_probes = fit_probes(x_random[:, train], labels[train], **fit)
        rows["random_init_score"] = random_probes.score(x_random[:, test], labels[test]).numpy()
    rows["cv_mean"] = rows["cv_std"] = np.nan
    if settings.cv_folds:
        folds = cross_validate(
            x, labels, folds=settings.cv_folds, seed=settings.seed, groups=sequence, **fit
        ).numpy()
        rows["cv_mean"], rows["cv_std"] = folds.mean(0), folds.std(0)
    return rows, probes


def run(
    model: HookedModel | CheckpointSeries,
    data: str | Path | Dataset | None = None,
    *,
    labels: str | Path | LabelSource | LabelDataset,
    hooks: str | Sequence[str] = DEFAULT_HOOKS,
    position: str | int | None = None,
    settings: ProbeSettings | None = None,
    location: str | Path | None = None,
    steps: Sequence[int] | None = None,
    on_fit: Callable[[HookedModel, LabelDataset, LinearProbes], None] | None = None,
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """Linear probes on every hook of a model, or of every checkpoint of a series (each loaded once), for one label
    source → ``{"probe_results": frame}`` of :data:`ANALYSIS` (one row per checkpoint × hook, the columns of
    :func:`fit_model_probes`) for ``write_tables``.

    Args:
        model: a HookedModel or a CheckpointSeries (``workbench.references.resolve_series``).
        data: the texts a label source reads (the zoo's Python label sets, label functions) or ``zoo:tokfsm`` for
            the TokFSM label sets: a dataset reference or a Dataset; None when the labels bring their own.
        labels: any label source of :mod:`workbench.labels` (a label file, ``zoo:NAME``, ``FILE.py:FN``, a
            LabelSource), aligned once to the first checkpoint's tokenizer (the checkpoints of a series share it),
            or a LabelDataset already aligned.
        position: where a per-sequence label is probed: last, first, mean or a token index.
        settings: the fit's :class:`ProbeSettings` (sequences, context length, split, controls, seed).
        location: the zoo model directory the TokFSM label sets read their machine from (default: a series' first
            checkpoint).
        steps: the checkpoints of a series to probe (default: all).
        on_fit: receives each checkpoint's model, label dataset and fitted probes (``probe run --save`` keeps
            them with ``probes.readout.save_probe``).
    """
    settings = settings or ProbeSettings()
    if isinstance(model, CheckpointSeries):
        if location is None:
            location = model.location(model.steps[0])
        models: Iterable[HookedModel] = model.iter(steps, progress=progress)
    else:
        models = [model]
    dataset = labels if isinstance(labels, LabelDataset) else None
    frames = []
    for each in models:
        if dataset is None:
            dataset = labels_for_model(
                labels, each, location=location, data=data, position=position, settings=settings
            )
        rows, probes = fit_model_probes(each, dataset, hooks, settings)
        if on_fit is not None:
            on_fit(each, dataset, probes)
        frames.append(rows)
    return {RESULTS_TABLE: pd.concat(frames, ignore_index=True)}


def probe_accuracy_metric(
    labels: str | Path | LabelSource,
    *,
    data: str | Path | Dataset | None = None,
    hooks: str | Sequence[str] = DEFAULT_HOOKS,
    settings: ProbeSettings | None = None,
) -> Callable[[HookedModel], np.ndarray]:
    """A training-dynamics metric (``workbench.dynamics_metrics`` entry point ``probe_accuracy``): for each
    checkpoint, the held-out probe score per hook [n_hooks] (one per layer with the default hooks) for ``labels``,
    aligned once to the first checkpoint's tokenizer (checkpoints of a series share it). The label source is
    checked when the metric is made, before any checkpoint loads."""
    settings = settings or ProbeSettings(random_init=False, control=False)
    source = labels if isinstance(labels, LabelSource) else parse_label_source(labels)
    built: list[LabelDataset] = []

    def metric(model: HookedModel) -> np.ndarray:
        if not built:
            built.append(labels_for_model(source, model, data=data, settings=settings))
        return run(model, labels=built[0], hooks=hooks, settings=settings)[RESULTS_TABLE]["score"].to_numpy()

    return metric


def _numeric(dataset: LabelDataset) -> bool:
    try:
        [float(c) for c in dataset.classes]
    except ValueError:
        return False
    return True


def _sequence_types(dataset: LabelDataset) -> torch.Tensor:
    """One id per distinct sequence content (real tokens only) [n]: the control task's "type" for sequence labels."""
    masked = torch.where(dataset.mask.bool(), dataset.tokens, -1)
    return torch.unique(masked, dim=0, return_inverse=True)[1]


def zoo_fsm(model_dir: str | Path):
    """The TokFSM a zoo model directory (or one of its step dirs) was trained on, read by the zoo's label-set
    provider (``LabelSets.model_fsm``); a LabelError for any other model."""
    return label_provider("zoo").model_fsm(Path(model_dir))
