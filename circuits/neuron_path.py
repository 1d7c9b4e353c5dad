"""Neuron paths: joint integrated-gradient attribution of MLP hidden units, one per layer, at one position.

After "Discovering Influential Neuron Path in Vision Transformers". A path is a set of neurons
``{(layer, neuron)}`` at a single token position (CLS = 0 for the ViT, a chosen position for an LM). Its joint
score is the integral over α ∈ [0, 1] of dP/dα when the path neurons are scaled by α together (every other unit of
those layers held at its clean value), P = probability of the target class / next token, by a Riemann sum of m
steps evaluated as one batch.

:func:`run` takes any model (``resolve_model``) and any dataset (``load_dataset``): a causal LM traces paths for
the most frequent next tokens at a position of the dataset's token rows; an image classifier (ViT) one path per
class of the dataset's label array, at CLS. :func:`check` refuses what cannot work (no MLP units, an encoder with
no logits, data of the wrong modality, a position beyond the context) before any work; :func:`write_results`
stores the ``ANALYSIS`` tables.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from workbench.analysis import Analysis, AnalysisNotApplicable, Table, write_tables
from workbench.datasets import Dataset, load_dataset
from workbench.references import resolve_model

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
    names = [HOOK.format(layer=ly) for ly in range(model.cfg.n_layers)]
    with torch.no_grad(), model.capture(names) as cache:
        model(task.inputs)
    return {ly: cache[HOOK.format(layer=ly)][:, task.position].float() for ly in range(model.cfg.n_layers)}


def _repeat(x: torch.Tensor, times: int) -> torch.Tensor:
    return x.repeat_interleave(times, dim=0)


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


def _joint_scores(model, task: Task, clean: dict[int, torch.Tensor], masks: list[dict[int, torch.Tensor]],
                  steps: int) -> torch.Tensor:  # fmt: skip
    """Joint IG score of each candidate set (masks[c][ly]: [d_mlp] bool) averaged over inputs → [candidates]."""
    n, c = task.inputs.shape[0], len(masks)
    alphas = torch.arange(1, steps + 1, dtype=torch.float32, device=task.inputs.device) / steps
    alpha = alphas.repeat(c * n).requires_grad_(True)
    inputs = _repeat(task.inputs, steps).repeat(c, *([1] * (task.inputs.ndim - 1)))
    targets = _repeat(task.targets, steps).repeat(c)
    layers = sorted(masks[0])
    row_clean = {ly: _repeat(clean[ly], steps).repeat(c, 1) for ly in layers}
    row_masks = {ly: _repeat(torch.stack([m[ly] for m in masks]), n * steps) for ly in layers}
    with model.hooks(_scaled_hooks(row_clean, row_masks, alpha, task.position)):
        probs = target_probs(model(inputs), targets, task.position)
    (grad,) = torch.autograd.grad(probs.sum(), alpha)
    return grad.reshape(c, n * steps).mean(1).detach()


def _masks(model, path: dict[int, list[int]]) -> dict[int, torch.Tensor]:
    out = {}
    for layer, neurons in path.items():
        mask = torch.zeros(model.cfg.d_mlp, dtype=torch.bool, device=model.device)
        mask[list(neurons)] = True
        out[layer] = mask
    return out


def joint_score(model, task: Task, path: dict[int, list[int]], steps: int = 20) -> float:
    """Joint IG attribution of ``path`` ({layer: [neurons]}) to the target probability, averaged over inputs."""
    _check_steps(steps)
    _check_path(model, path)
    clean = clean_activations(model, task)
    return float(_joint_scores(model, task, clean, [_masks(model, path)], steps)[0])


def locate_path(model, task: Task, steps: int = 20, top_k: int = 1, chunk: int = 96,
                progress: bool = True) -> tuple[dict[int, list[int]], list[float]]:  # fmt: skip
    """Layer-progressive search: per layer pick the ``top_k`` neurons maximising the joint score with earlier picks.

    Returns ({layer: [neurons]}, joint score after each layer).
    """
    _check_steps(steps)
    if top_k < 1 or top_k > model.cfg.d_mlp:
        raise NeuronPathError(f"top_k={top_k} must be in 1..{model.cfg.d_mlp}")
    clean = clean_activations(model, task)
    path: dict[int, list[int]] = {}
    scores: list[float] = []
    for layer in tqdm(range(model.cfg.n_layers), desc="neuron path", disable=not progress):
        base = _masks(model, path)
        candidates = []
        for j in range(model.cfg.d_mlp):
            m = {ly: v.clone() for ly, v in base.items()}
            m[layer] = torch.zeros(model.cfg.d_mlp, dtype=torch.bool, device=model.device)
            m[layer][j] = True
            candidates.append(m)
        values = torch.cat([_joint_scores(model, task, clean, candidates[i : i + chunk], steps)
                            for i in range(0, len(candidates), chunk)])  # fmt: skip
        path[layer] = values.topk(top_k).indices.tolist()
        scores.append(joint_score(model, task, path, steps) if top_k > 1 else float(values.max()))
    return path, scores


def top_activation_path(model, task: Task, top_k: int = 1) -> dict[int, list[int]]:
    """Baseline: per layer, the ``top_k`` neurons with the largest mean clean activation at the task position."""
    clean = clean_activations(model, task)
    return {ly: clean[ly].mean(0).topk(top_k).indices.tolist() for ly in range(model.cfg.n_layers)}


def influence_pattern_path(model, task: Task, steps: int = 20, top_k: int = 1) -> dict[int, list[int]]:
    """Baseline: scale the input embedding by α, pick per layer the ``top_k`` neurons with the largest mean
    gradient."""
    _check_steps(steps)
    n = task.inputs.shape[0]
    alphas = torch.arange(1, steps + 1, dtype=torch.float32, device=task.inputs.device) / steps
    alpha = alphas.repeat(n)
    inputs = _repeat(task.inputs, steps)
    targets = _repeat(task.targets, steps)

    def scale(act: torch.Tensor, hook) -> torch.Tensor:
        return act * alpha.reshape(-1, *([1] * (act.ndim - 1))).to(act.dtype)

    names = [HOOK.format(layer=ly) for ly in range(model.cfg.n_layers)]
    with model.hooks([("hook_embed", scale)]), model.capture(names, grad=True) as cache:
        probs = target_probs(model(inputs), targets, task.position)
    acts = [cache[name] for name in names]
    grads = torch.autograd.grad(probs.sum(), acts)
    return {
        ly: g[:, task.position].float().mean(0).topk(top_k).indices.tolist() for ly, g in enumerate(grads)
    }


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


def analyse(model, tasks: dict[int, Task], *, dataset: str, steps: int = 20, top_k: int = 1,
            progress: bool = True) -> dict[str, pd.DataFrame]:  # fmt: skip
    """Paths of all three methods for each target ({target: Task}) → {"neuron_paths": one row per (target, method,
    layer, rank), "neuron_path_metrics": one row per method, averaged over the targets}; ``dataset`` is the name
    recorded in every row (``Dataset.name``)."""
    name, checkpoint = model.cfg.name, model.cfg.checkpoint
    run_keys = {"model": name, "checkpoint": checkpoint, "dataset": dataset, "hook": HOOK.format(layer="*")}
    path_rows, metric_rows = [], []
    for target, task in tqdm(tasks.items(), desc=f"{name} targets", disable=not progress):
        ours, _ = locate_path(model, task, steps, top_k, progress=False)
        paths = {"joint_ig": ours, "top_activation": top_activation_path(model, task, top_k),
                 "influence_pattern": influence_pattern_path(model, task, steps, top_k)}  # fmt: skip
        label = _target_text(model, target)
        for method, path in paths.items():
            score = joint_score(model, task, path, steps)
            removed, enhanced = manipulate(model, task, path, 0.0), manipulate(model, task, path, 2.0)
            for layer, neurons in path.items():
                for rank, neuron in enumerate(neurons):
                    path_rows.append({**run_keys, "position": task.position, "target": int(target),
                                      "target_text": label, "method": method, "layer": layer, "rank": rank,
                                      "neuron": int(neuron), "joint_score": score,
                                      "n_inputs": int(task.inputs.shape[0])})  # fmt: skip
            metric_rows.append({**run_keys, "position": task.position, "target": int(target), "method": method,
                                "joint_score": score, "remove_prob_ratio": removed["prob_ratio"],
                                "remove_accuracy_change": removed["accuracy_change"],
                                "enhance_prob_ratio": enhanced["prob_ratio"],
                                "enhance_accuracy_change": enhanced["accuracy_change"]})  # fmt: skip
    group = ["model", "checkpoint", "dataset", "hook", "position", "method"]
    metrics = (pd.DataFrame(metric_rows).drop(columns="target")
               .groupby(group, as_index=False, dropna=False, sort=False).mean())  # fmt: skip
    metrics["n_targets"] = len(tasks)
    metrics["steps"] = steps
    return {"neuron_paths": pd.DataFrame(path_rows), "neuron_path_metrics": metrics}


def _target_text(model, target: int) -> str:
    if model.cfg.family != "vit" and model.tokenizer is not None:
        return str(model.to_string([target]))
    return str(target)


_RUN_KEYS = ("model", "checkpoint", "dataset", "position")
ANALYSIS = Analysis(
    name="neuron_path",
    command="workbench neuron-path run MODEL --data DATA",
    tables=(
        Table("neuron_paths", keys=_RUN_KEYS,
              columns=("target", "target_text", "method", "layer", "rank", "neuron", "joint_score", "n_inputs"),
              description="per target and method, the neuron picked at each layer (rank < top_k); a rerun of the "
              "same model, checkpoint, dataset and position replaces its rows"),
        Table("neuron_path_metrics", keys=_RUN_KEYS,
              columns=("method", "joint_score", "remove_prob_ratio", "remove_accuracy_change", "enhance_prob_ratio",
                       "enhance_accuracy_change", "n_targets", "steps"),
              description="per method, joint score and remove (×0) / enhance (×2) effects averaged over targets"),
    ),
    requires=("mlp",),
    description="neuron paths: joint integrated gradients over MLP hidden units (causal LMs and ViT classifiers)",
)  # fmt: skip


def model_kind(model) -> str:
    """Kind of ``model``: "lm" for a causal LM (next-token logits [batch, pos, d_vocab]), "classifier" for a ViT
    (class logits [batch, n_classes]); anything else raises AnalysisNotApplicable (an encoder's forward returns
    hidden states, so there is no target probability to attribute)."""
    if model.cfg.family == "vit":
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
        raise NeuronPathError(f"dataset {data.name!r} holds no input array (it is {data.modality}); class tasks "
                              "need an inputs dataset such as zoo:digits")  # fmt: skip
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


def token_rows(model, data: Dataset, position: int, max_rows: int = 64, seed: int | None = 0) -> torch.Tensor:
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
    if model.cfg.d_vocab and int(rows.max()) >= model.cfg.d_vocab:
        raise NeuronPathError(
            f"dataset {data.name!r} holds token id {int(rows.max())}, outside {model.cfg.name}'s vocabulary "
            f"(d_vocab={model.cfg.d_vocab}); pass token ids made with this model's tokenizer, or text"
        )
    return rows


def lm_tasks(model, tokens: torch.Tensor, position: int, n_targets: int = LM_TARGETS) -> dict[int, Task]:
    """Tasks for the ``n_targets`` most frequent next tokens after ``position`` in ``tokens`` [batch, pos]."""
    task = make_task(model, tokens, None, position)
    values, counts = task.targets.unique(return_counts=True)
    chosen = values[counts.argsort(descending=True, stable=True)[:n_targets]]
    return {int(t): Task(task.inputs[task.targets == t], task.targets[task.targets == t], task.position)
            for t in chosen}  # fmt: skip


def class_tasks(model, data: Dataset, *, per_class: int = 8, n_targets: int | None = None, label: str | None = None,
                position: int = 0, seed: int = 0) -> dict[int, Task]:  # fmt: skip
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


def run(model, data: Dataset, *, position: int | None = None, n_targets: int | None = None, steps: int = 20,
        top_k: int = 1, max_sequences: int = 64, label: str | None = None, seed: int = 0,
        progress: bool = True) -> dict[str, pd.DataFrame]:  # fmt: skip
    """Neuron paths of any causal LM or ViT classifier on any dataset → {table: DataFrame} (``write_results``).

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
    """
    kind = check(model, data, position, label)
    _check_steps(steps)
    if not 1 <= top_k <= model.cfg.d_mlp:
        raise NeuronPathError(f"--top-k {top_k} must be in 1..{model.cfg.d_mlp} (d_mlp of {model.cfg.name})")
    if kind == "lm":
        position = LM_POSITION if position is None else position
        tokens = token_rows(model, data, position, max_sequences, seed)
        tasks = lm_tasks(model, tokens, position, n_targets or LM_TARGETS)
    else:
        _, labels = _class_labels(data, label)
        n_classes = min(n_targets or len(labels.unique()), len(labels.unique()))
        tasks = class_tasks(model, data, per_class=max(1, max_sequences // n_classes), n_targets=n_targets,
                            label=label, position=position or 0, seed=seed)  # fmt: skip
    return analyse(model, tasks, dataset=data.name, steps=steps, top_k=top_k, progress=progress)


def write_results(workspace, frames: dict[str, pd.DataFrame]) -> dict[str, int]:
    """Store ``run``'s frames in the workspace results database (``workbench.analysis.write_tables``): a rerun of
    the same model, checkpoint, dataset and position replaces its rows."""
    return write_tables(workspace, ANALYSIS, frames)


def demo_step(workspace, progress: bool = True) -> str:
    """Neuron paths (3 neurons per layer) of the workspace's ``vit-digits`` on ``zoo:digits``, 3 images per class;
    writes results; returns a summary line."""
    model = resolve_model("vit-digits", workspace=workspace)
    frames = run(model, load_dataset("zoo:digits"), steps=5, top_k=3, max_sequences=30, progress=progress)
    write_results(workspace, frames)
    m = frames["neuron_path_metrics"].set_index("method")
    return (
        "neuron paths (vit-digits on zoo:digits, 10 classes): joint score ours {:.3f} vs top-act {:.3f} / "
        "influence {:.3f}; remove → accuracy change ours {:+.2f} vs {:+.2f} / {:+.2f}".format(
            m.loc["joint_ig", "joint_score"],
            m.loc["top_activation", "joint_score"],
            m.loc["influence_pattern", "joint_score"],
            m.loc["joint_ig", "remove_accuracy_change"],
            m.loc["top_activation", "remove_accuracy_change"],
            m.loc["influence_pattern", "remove_accuracy_change"],
        )  # fmt: skip
    )
