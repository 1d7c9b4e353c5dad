"""Neuron paths: joint integrated-gradient attribution of MLP hidden units, one per layer, at one position.

After "Discovering Influential Neuron Path in Vision Transformers". A path is a set of neurons
``{(layer, neuron)}`` at a single token position (CLS = 0 for the ViT, a chosen position for an LM). Its joint
score is the integral over α ∈ [0, 1] of dP/dα when the path neurons are scaled by α together (every other unit of
those layers held at its clean value), P = probability of the target class / next token, by a Riemann sum of m
steps evaluated as one batch.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import pandas as pd
import torch

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
    inputs = torch.as_tensor(inputs)
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
    targets = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
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
    alphas = torch.arange(1, steps + 1, dtype=torch.float32) / steps
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
        mask = torch.zeros(model.cfg.d_mlp, dtype=torch.bool)
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
    from tqdm.auto import tqdm

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
            m[layer] = torch.zeros(model.cfg.d_mlp, dtype=torch.bool)
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
    alphas = torch.arange(1, steps + 1, dtype=torch.float32) / steps
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


def analyse(model, model_name: str, tasks: dict[int, Task], steps: int = 20, top_k: int = 1,
            progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """Paths of all three methods for each target ({target: Task}) → (neuron_paths rows, neuron_path_metrics rows)."""
    from tqdm.auto import tqdm

    checkpoint = model.cfg.checkpoint
    path_rows, metric_rows = [], []
    for target, task in tqdm(tasks.items(), desc=f"{model_name} targets", disable=not progress):
        ours, _ = locate_path(model, task, steps, top_k, progress=False)
        paths = {"joint_ig": ours, "top_activation": top_activation_path(model, task, top_k),
                 "influence_pattern": influence_pattern_path(model, task, steps, top_k)}  # fmt: skip
        for method, path in paths.items():
            score = joint_score(model, task, path, steps)
            removed, enhanced = manipulate(model, task, path, 0.0), manipulate(model, task, path, 2.0)
            for layer, neurons in path.items():
                for rank, neuron in enumerate(neurons):
                    path_rows.append({"model": model_name, "checkpoint": checkpoint, "target": int(target), "method": method, "layer": layer,
                                      "rank": rank, "neuron": int(neuron), "position": task.position,
                                      "joint_score": score, "n_inputs": int(task.inputs.shape[0])})  # fmt: skip
            metric_rows.append({"model": model_name, "checkpoint": checkpoint, "target": int(target), "method": method, "joint_score": score,
                                "remove_prob_ratio": removed["prob_ratio"],
                                "remove_accuracy_change": removed["accuracy_change"],
                                "enhance_prob_ratio": enhanced["prob_ratio"],
                                "enhance_accuracy_change": enhanced["accuracy_change"]})  # fmt: skip
    per_target = pd.DataFrame(metric_rows)
    metrics = (
        per_target.drop(columns="target")
        .groupby(["model", "checkpoint", "method"], as_index=False, dropna=False, sort=False)
        .mean()
    )
    metrics["n_targets"] = len(tasks)
    metrics["steps"] = steps
    return pd.DataFrame(path_rows), metrics


def write_results(workspace, paths: pd.DataFrame, metrics: pd.DataFrame) -> None:
    """Write both tables to the workspace results database, replacing earlier rows of the same (model,
    checkpoint)."""
    db = workspace.results()
    db.write("neuron_paths", paths, replace_keys=["model", "checkpoint"])
    db.write("neuron_path_metrics", metrics, replace_keys=["model", "checkpoint"])


def vit_tasks(per_class: int = 8, seed: int = 0) -> dict[int, Task]:
    """One task per digit class from the digits test split: up to ``per_class`` images each, position 0 (CLS)."""
    from workbench.zoo.corpora import digits_dataset

    _, _, x_test, y_test = digits_dataset()
    generator = torch.Generator().manual_seed(seed)
    tasks = {}
    for c in range(10):
        idx = (y_test == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=generator)[:per_class]]
        tasks[c] = Task(x_test[idx], y_test[idx].long(), 0)
    return tasks


def lm_tasks(model, tokens: torch.Tensor, position: int, n_targets: int = 2) -> dict[int, Task]:
    """Tasks for the ``n_targets`` most frequent next tokens after ``position`` in ``tokens`` [batch, pos]."""
    task = make_task(model, tokens, None, position)
    values, counts = task.targets.unique(return_counts=True)
    chosen = values[counts.argsort(descending=True)[:n_targets]]
    return {int(t): Task(task.inputs[task.targets == t], task.targets[task.targets == t], task.position)
            for t in chosen}  # fmt: skip


def fsm_tokens(model_name: str, length: int, n_sequences: int = 64, seed: int = 0) -> torch.Tensor:
    """Token sequences [n_sequences, length] sampled from the TokFSM of zoo model ``model_name`` (the LM tasks
    of FSM zoo models are built from these rather than from text)."""
    from workbench.zoo.corpora import TokFSM
    from workbench.zoo.train import get_spec

    spec = get_spec(model_name)
    if spec.corpus != "fsm":
        raise NeuronPathError(f"{model_name} is not a TokFSM zoo model (corpus {spec.corpus!r})")
    tokens, _ = TokFSM(**spec.fsm, seed=spec.seed).sample(n_sequences, length, seed=seed)
    return torch.from_numpy(tokens)


def demo_step(workspace, progress: bool = True) -> str:
    """Neuron paths (3 neurons per layer) on the workspace's zoo ViT, all digit classes; writes results; returns a
    summary line."""
    from workbench.checkpoints import CheckpointSeries

    series = CheckpointSeries.from_directory(workspace.model_dir("vit-digits"))
    model = series.load(series.steps[-1])
    model.eval()
    paths, metrics = analyse(model, "vit-digits", vit_tasks(per_class=3), steps=5, top_k=3, progress=progress)
    write_results(workspace, paths, metrics)
    m = metrics.set_index("method")
    return (
        "neuron paths (vit-digits, 10 classes): joint score ours {:.3f} vs top-act {:.3f} / influence {:.3f}; "
        "remove → accuracy change ours {:+.2f} vs {:+.2f} / {:+.2f}".format(
            m.loc["joint_ig", "joint_score"],
            m.loc["top_activation", "joint_score"],
            m.loc["influence_pattern", "joint_score"],
            m.loc["joint_ig", "remove_accuracy_change"],
            m.loc["top_activation", "remove_accuracy_change"],
            m.loc["influence_pattern", "remove_accuracy_change"],
        )  # fmt: skip
    )
