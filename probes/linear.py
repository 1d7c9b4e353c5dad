"""Linear probes fitted for many activation sites at once: one optimisation over a [sites, d, outputs] weight.

Classification minimises, per site, the mean multinomial cross-entropy + ``l2``/2 · ‖W‖² (the bias is not
penalised) — sklearn's ``LogisticRegression(C=1 / (l2 · n_train))`` objective. Regression (ridge) minimises the
mean squared error + ``l2`` · ‖W‖², solved in closed form — sklearn's ``Ridge(alpha=l2 · n_train)``. Inputs are
standardised per site and dimension with training statistics unless ``standardize=False``.

The sites are independent problems; summing their losses lets one L-BFGS run (and one batched matmul per step)
fit all of them. Logistic weights start from the closed-form ridge fit to one-hot targets, which cuts the
number of L-BFGS iterations severalfold.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from workbench.fileio import atomic_save_tensors

TASKS = ("classification", "regression")


class ProbeError(ValueError):
    """Bad probe input: shapes, labels, settings."""


@dataclass
class LinearProbes:
    """Fitted linear probes for ``len(sites)`` activation sites of width ``d``.

    ``weight`` [sites, d, outputs] and ``bias`` [sites, outputs] act on standardised inputs
    ``(x - mean) / scale`` with ``mean``/``scale`` [sites, d]. ``classes`` [outputs] holds the label value of each
    output column (classification); regression has one output per target.
    """

    task: str
    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor
    classes: torch.Tensor | None
    sites: list[str]
    l2: float
    iterations: int = 0

    def decision_function(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (or regression outputs) [sites, n, outputs] for activations ``x`` [sites, n, d]."""
        x = _check_inputs(x, len(self.sites), self.weight.shape[1])
        return torch.baddbmm(
            self.bias[:, None, :], (x - self.mean[:, None]) / self.scale[:, None], self.weight
        )

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities [sites, n, classes]."""
        self._require_classifier("predict_proba")
        return self.decision_function(x).softmax(-1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted labels [sites, n] (classification) or values [sites, n, targets] (regression)."""
        out = self.decision_function(x)
        if self.task == "classification":
            return self._require_classifier("predict")[out.argmax(-1)]
        return out

    def score(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Accuracy (classification) or R² averaged over targets (regression) per site [sites]."""
        if self.task == "classification":
            classes = self._require_classifier("score")
            return (self.predict(x) == y.to(classes.dtype)[None]).double().mean(1)
        return r2_score(self.predict(x), _as_targets(y))

    def direction(self, site: str | int = 0, label: int | None = None) -> torch.Tensor:
        """Unit vector [d] in activation space along which the probe's evidence for ``label`` grows.

        Binary probes use the positive class minus the negative; multi-class ones the class column minus the mean
        column (the softmax is invariant to the mean); regression the target's weight column (``label`` = target).
        The standardisation is folded in (weights divided by ``scale``).
        """
        index = self.sites.index(site) if isinstance(site, str) else int(site)
        weight = self.weight[index] / self.scale[index][:, None]
        if self.task == "regression":
            vector = weight[:, 0 if label is None else int(label)]
        else:
            values = self._require_classifier("direction").tolist()
            if label is None:
                if len(values) != 2:
                    raise ProbeError(f"name the label for a {len(values)}-class probe; classes: {values}")
                label = values[1]
            if label not in values:
                raise ProbeError(f"label {label} is not a probe class; classes: {values}")
            vector = weight[:, values.index(label)] - weight.mean(1)
        return vector / vector.norm().clamp_min(1e-12)

    def _require_classifier(self, what: str) -> torch.Tensor:
        """The class values [outputs]; a regression probe is refused naming ``what`` needed them."""
        if self.task != "classification" or self.classes is None:
            raise ProbeError(f"{what} needs a classification probe; this one is {self.task}")
        return self.classes

    def save(self, path: str | Path) -> Path:
        """Write the probes as safetensors (+ JSON metadata in the header), atomically."""

        path = Path(path)
        tensors = {"weight": self.weight, "bias": self.bias, "mean": self.mean, "scale": self.scale}
        if self.classes is not None:
            tensors["classes"] = self.classes
        meta = {"task": self.task, "sites": json.dumps(self.sites), "l2": repr(self.l2)}
        atomic_save_tensors(path, tensors, metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> LinearProbes:
        """Read probes written by :meth:`save`: the tensors (weight [sites, d, outputs], bias [sites, outputs],
        mean and scale [sites, d], classes [outputs] for classification) and the task, site names and l2 from
        the safetensors header. ``iterations`` is not saved and reads 0."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 — safe_open is not iterable
        return cls(
            meta["task"], tensors["weight"], tensors["bias"], tensors["mean"], tensors["scale"],
            tensors.get("classes"), json.loads(meta["sites"]), float(meta["l2"]),
        )  # fmt: skip


def r2_score(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Coefficient of determination per site, averaged over targets: prediction [sites, n, t], target [n, t]."""
    residual = ((prediction - target[None]) ** 2).sum(1)
    total = ((target - target.mean(0)) ** 2).sum(0).clamp_min(1e-12)
    return (1 - residual / total[None]).double().mean(-1)


def _as_targets(y: torch.Tensor) -> torch.Tensor:
    y = torch.as_tensor(y, dtype=torch.float32)
    return y[:, None] if y.ndim == 1 else y


def _check_inputs(x: torch.Tensor, n_sites: int | None = None, d: int | None = None) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 3:
        raise ProbeError(
            f"activations must be [sites, n, d]; got shape {tuple(x.shape)} (stack sites on dim 0)"
        )
    if n_sites is not None and x.shape[0] != n_sites:
        raise ProbeError(f"activations have {x.shape[0]} sites; the probes were fitted on {n_sites}")
    if d is not None and x.shape[2] != d:
        raise ProbeError(f"activations have width {x.shape[2]}; the probes were fitted on width {d}")
    if not torch.isfinite(x).all():
        site, row = (int(i) for i in torch.nonzero(~torch.isfinite(x))[0][:2])
        raise ProbeError(f"activations contain NaN/inf (site {site}, row {row}); clean or drop those rows")
    return x.float()


def _standardise(x: torch.Tensor, standardize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not standardize:
        return torch.zeros(x.shape[0], x.shape[2]), torch.ones(x.shape[0], x.shape[2])
    return x.mean(1), _safe_scale(x.std(1, unbiased=False))


def _safe_scale(scale: torch.Tensor) -> torch.Tensor:
    """Per-dimension standard deviations [sites, d] with (near-)constant dimensions — below 1e-6 of the largest
    standard deviation of all sites — left unscaled (1), so they are neither amplified nor divided by zero."""
    return torch.where(scale > 1e-6 * scale.max().clamp_min(1e-30), scale, torch.ones_like(scale))


def _per_site(op: Callable[..., Any], *tensors: torch.Tensor) -> Any:
    """``op`` applied to each site's slice of ``tensors`` (leading dim = sites), results stacked.

    Batched LAPACK calls (solve, cholesky, triangular solve over [sites, d, d]) run MKL's threaded factorisation
    inside torch's parallel loop over the batch; that nesting of OpenMP teams can deadlock (seen on the 2-core CPU
    build: a probe fit spinning in mkl_lapack_dgetrf forever). One call per site never nests; sites are few.
    """
    results = [op(*(t[i] for t in tensors)) for i in range(tensors[0].shape[0])]
    if isinstance(results[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*results, strict=True))
    return torch.stack(results)


def _ridge(z: torch.Tensor, targets: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge on standardised ``z`` [sites, n, d] and ``targets`` [n, t]: weight [sites, d, t], bias."""
    n = z.shape[1]
    z_mean = z.mean(1, keepdim=True)
    t_mean = targets.mean(0)
    zc = z - z_mean
    gram = (zc.transpose(1, 2) @ zc).double() / n
    gram.diagonal(dim1=1, dim2=2).add_(l2)
    rhs = (zc.transpose(1, 2) @ (targets - t_mean)[None]).double() / n
    weight = _per_site(torch.linalg.solve, gram, rhs).float()
    bias = t_mean[None] - (z_mean @ weight)[:, 0]
    return weight, bias


def fit_probes(
    x: torch.Tensor | dict[str, torch.Tensor],
    y: torch.Tensor,
    *,
    task: str = "classification",
    l2: float = 1e-3,
    standardize: bool = True,
    max_iter: int = 100,
    tol: float = 1e-4,
    sites: Sequence[str] | None = None,
) -> LinearProbes:
    """Fit one linear probe per site on activations ``x`` [sites, n, d] (or {site: [n, d]}) and labels ``y`` [n].

    Classification labels are any integers (the probes' classes are those seen in ``y``); regression targets are
    [n] or [n, targets]. All sites are optimised together (L-BFGS with strong-Wolfe line search, at most
    ``max_iter`` iterations, stopping when the largest gradient entry falls below ``tol``).
    """
    if task not in TASKS:
        raise ProbeError(f"task={task!r} is not known; use one of {TASKS}")
    if l2 < 0 or not math.isfinite(l2):
        raise ProbeError(f"l2={l2} must be a finite number ≥ 0")
    if isinstance(x, dict):
        sites = list(x)
        x = torch.stack([torch.as_tensor(v) for v in x.values()])
    x = _check_inputs(x)
    sites = list(sites) if sites is not None else [str(i) for i in range(x.shape[0])]
    if len(sites) != x.shape[0]:
        raise ProbeError(f"{len(sites)} site names for {x.shape[0]} sites")
    y = torch.as_tensor(y)
    if y.shape[0] != x.shape[1]:
        raise ProbeError(f"{y.shape[0]} labels for {x.shape[1]} activation rows")
    mean, scale = _standardise(x, standardize)
    z = (x - mean[:, None]) / scale[:, None]
    if task == "regression":
        weight, bias = _ridge(z, _as_targets(y), l2)
        return LinearProbes(task, weight, bias, mean, scale, None, sites, l2)
    classes, index = torch.unique(y.long(), return_inverse=True)
    if len(classes) < 2:
        raise ProbeError(f"classification needs at least two classes in the labels; got {classes.tolist()}")
    weight, bias, iterations = _logistic(z, index, len(classes), l2, max_iter, tol)
    return LinearProbes(task, weight, bias, mean, scale, classes, sites, l2, iterations)


def _whitener(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cholesky factor L of each site's input covariance and P = L⁻ᵀ, so that z @ P has identity covariance:
    z [sites, n, d] → (P, L) [sites, d, d]."""
    centred = z - z.mean(1, keepdim=True)
    covariance = (centred.transpose(1, 2) @ centred).double() / z.shape[1]
    jitter = 1e-6 * covariance.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-12)
    covariance.diagonal(dim1=1, dim2=2).add_(jitter[:, None])
    lower, info = _per_site(torch.linalg.cholesky_ex, covariance)
    while bool((info > 0).any()):  # fewer samples than dimensions: float32 round-off makes it indefinite
        covariance.diagonal(dim1=1, dim2=2).add_(jitter[:, None] * 99)
        jitter = jitter * 100
        lower, info = _per_site(torch.linalg.cholesky_ex, covariance)
    eye = torch.eye(z.shape[2], dtype=torch.float64).expand_as(lower)
    whiten = _per_site(lambda a, b: torch.linalg.solve_triangular(a, b, upper=False), lower, eye).transpose(
        1, 2
    )
    return whiten.float().contiguous(), lower.float()


def _logistic(
    z: torch.Tensor, index: torch.Tensor, n_classes: int, l2: float, max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Multinomial logistic regression for every site at once; z [sites, n, d], index [n] in [0, n_classes).

    L-BFGS runs on whitened inputs (z @ P, identity covariance) with weights V, W = P V, and the penalty kept on
    W: the same objective with a better-conditioned Hessian. The loss and gradient are computed by hand in a
    class-major layout (logits [sites, classes, n]), where the skinny matmuls are several times faster than
    [n, d] @ [d, classes].
    """
    onehot = F.one_hot(index, n_classes).float()
    start_weight, start_bias = _ridge(z, onehot - onehot.mean(0), max(l2, 1e-4))
    scale = 2.0 * n_classes
    whiten, lower = _whitener(z)
    zw = torch.bmm(z, whiten)
    inner = (lower.transpose(1, 2) @ (start_weight * scale)).transpose(1, 2).contiguous()  # Vᵀ [sites, C, d]
    bias = (start_bias * scale + torch.log(onehot.mean(0).clamp_min(1e-6))[None]).contiguous()
    inner, bias, iterations = _lbfgs_logistic(zw, index, inner, bias, whiten, l2, max_iter, tol)
    return torch.bmm(whiten, inner.transpose(1, 2)), bias, iterations


def _lbfgs_logistic(
    zw: torch.Tensor,
    index: torch.Tensor,
    inner: torch.Tensor,
    bias: torch.Tensor,
    whiten: torch.Tensor,
    l2: float,
    max_iter: int,
    tol: float,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """L-BFGS on whitened inputs zw [sites, n, d] from Vᵀ ``inner`` [sites, C, d] and ``bias`` [sites, C]."""
    n_classes, n = inner.shape[1], zw.shape[1]
    zw_t = zw.transpose(1, 2).contiguous()
    target = F.one_hot(index, n_classes).T.float()[None]
    inner = inner.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [inner, bias], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
        history_size=50, line_search_fn="strong_wolfe",
    )  # fmt: skip

    @torch.no_grad()
    def closure() -> torch.Tensor:
        logits = torch.baddbmm(bias[:, :, None], inner, zw_t)
        lse = torch.logsumexp(logits, dim=1, keepdim=True)
        weight_t = torch.bmm(inner, whiten.transpose(1, 2))
        loss = (lse.sum() - (logits * target).sum()) / n + 0.5 * l2 * (weight_t**2).sum()
        residual = (torch.exp(logits - lse) - target) / n
        inner.grad = torch.bmm(residual, zw) + l2 * torch.bmm(weight_t, whiten)
        bias.grad = residual.sum(-1)
        return loss

    optimizer.step(closure)
    done = optimizer.state[optimizer._params[0]].get("n_iter", 0)
    return inner.detach(), bias.detach(), int(done)


def kfold_indices(
    n: int, folds: int, seed: int = 0, groups: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Test-row indices of each of ``folds`` folds; rows sharing a group (e.g. a sequence) stay together."""
    if folds < 2:
        raise ProbeError(f"cross-validation needs folds ≥ 2; got {folds}")
    generator = torch.Generator().manual_seed(seed)
    if groups is None:
        order = torch.randperm(n, generator=generator)
        return list(order.tensor_split(folds))
    unique = torch.unique(groups)
    if len(unique) < folds:
        raise ProbeError(f"{len(unique)} groups cannot fill {folds} folds; lower folds")
    shuffled = unique[torch.randperm(len(unique), generator=generator)]
    return [torch.nonzero(torch.isin(groups, part)).flatten() for part in shuffled.tensor_split(folds)]


def cross_validate(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    folds: int = 5,
    seed: int = 0,
    groups: torch.Tensor | None = None,
    **fit_kwargs,
) -> torch.Tensor:
    """Held-out score of each fold for each site [folds, sites] (one batched fit per fold)."""
    x = _check_inputs(x)
    y = torch.as_tensor(y)
    scores = []
    for test in kfold_indices(x.shape[1], folds, seed, groups):
        train = torch.ones(x.shape[1], dtype=torch.bool)
        train[test] = False
        probes = fit_probes(x[:, train], y[train], **fit_kwargs)
        scores.append(probes.score(x[:, test], y[test]))
    return torch.stack(scores)


def fit_probes_streaming(
    batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    *,
    sites: Sequence[str],
    task: str = "classification",
    classes: Sequence[int] | None = None,
    l2: float = 1e-3,
    epochs: int = 5,
    lr: float = 0.05,
    standardize: bool = True,
    progress: bool = False,
) -> LinearProbes:
    """Fit probes from data that does not fit in memory.

    ``batches()`` returns a fresh iterable of (x [sites, batch, d], y [batch]) each time it is called (one pass over
    the data). Ridge is exact (normal equations accumulated in one pass); logistic regression takes a statistics
    pass and ``epochs`` passes of Adam on the same objective as :func:`fit_probes`. Every y must have one entry
    per row of its x; ``classes`` (default: the labels seen in the statistics pass) lists the class labels, and a
    label outside it raises :class:`ProbeError` (drop unlabelled rows before yielding them). Standardisation
    uses the same near-constant-dimension rule as the in-memory fit.
    """
    from tqdm.auto import tqdm

    if task not in TASKS:
        raise ProbeError(f"task={task!r} is not known; use one of {TASKS}")
    wanted = None if classes is None or task == "regression" else {int(v) for v in classes}
    count, total, squares, seen = 0, None, None, set()
    for x, y in batches():
        x, y = _check_batch(x, y, sites, wanted)
        x = x.double()
        total = x.sum(1) if total is None else total + x.sum(1)
        squares = (x**2).sum(1) if squares is None else squares + (x**2).sum(1)
        count += x.shape[1]
        if task == "classification":
            seen.update(y.long().unique().tolist())
    if count == 0 or total is None or squares is None:
        raise ProbeError("the batch source yielded no rows")
    if standardize:
        mean = (total / count).float()
        scale = _safe_scale((squares / count - (total / count) ** 2).clamp_min(0).sqrt().float())
    else:
        mean, scale = torch.zeros(total.shape), torch.ones(total.shape)
    if task == "regression":
        return _ridge_streaming(batches, sites, mean, scale, count, l2)
    class_values = torch.tensor(sorted(wanted if wanted is not None else seen))
    if len(class_values) < 2:
        raise ProbeError(f"classification needs at least two classes; got {class_values.tolist()}")
    d = mean.shape[1]
    weight = torch.zeros(len(sites), d, len(class_values), requires_grad=True)
    bias = torch.zeros(len(sites), len(class_values), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    n_steps = 0
    for _ in tqdm(range(epochs), desc="probe epochs", disable=not progress):
        for x, y in batches():
            x, y = _check_batch(x, y, sites, wanted)
            z = (x - mean[:, None]) / scale[:, None]
            target = torch.searchsorted(class_values, y.long())
            logits = torch.baddbmm(bias[:, None, :], z, weight)
            loss = F.cross_entropy(logits.reshape(-1, len(class_values)), target.repeat(len(sites)))
            loss = loss * len(sites) + 0.5 * l2 * (weight**2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            n_steps += 1
    return LinearProbes(
        task, weight.detach(), bias.detach(), mean, scale, class_values, list(sites), l2, n_steps
    )


def _check_batch(
    x: torch.Tensor, y: torch.Tensor, sites: Sequence[str], classes: set[int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A streamed batch checked: x [sites, batch, d] finite, y [batch] (or [batch, targets]) with one label per
    row and, when ``classes`` is given, only those labels."""
    x = _check_inputs(x, len(sites))
    y = torch.as_tensor(y)
    if y.ndim == 0 or y.shape[0] != x.shape[1]:
        raise ProbeError(
            f"a batch has {x.shape[1]} activation rows but labels of shape {tuple(y.shape)}; "
            "yield (x [sites, batch, d], y [batch]) pairs"
        )
    if classes is not None:
        unknown = sorted(set(y.long().unique().tolist()) - classes)
        if unknown:
            raise ProbeError(
                f"labels {unknown} are not among classes={sorted(classes)}; add them to classes or drop "
                "those rows (e.g. the −1 'no label' rows) from the batches"
            )
    return x, y


def _ridge_streaming(
    batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    sites: Sequence[str],
    mean: torch.Tensor,
    scale: torch.Tensor,
    count: int,
    l2: float,
) -> LinearProbes:
    """Exact ridge from one more pass: accumulate, in float64, the Gram matrix Σ zᵀz [sites, d, d], Σ zᵀt
    [sites, d, targets], Σ z [sites, d] and Σ t [targets] of the standardised batches z = (x − mean) / scale
    (x [sites, batch, d], t [batch, targets]), centre them with the means over all ``count`` rows and solve
    (Cov(z) + l2·I) W = Cov(z, t) per site — the same normal equations :func:`_ridge` solves in memory.
    ``mean``/``scale`` [sites, d] come from the statistics pass. Returns weight [sites, d, targets], bias
    [sites, targets]."""
    gram = z_sum = t_sum = cross = None
    for x, y in batches():
        x, y = _check_batch(x, y, sites, None)
        z = ((x - mean[:, None]) / scale[:, None]).double()
        t = _as_targets(y).double()
        gram = z.transpose(1, 2) @ z if gram is None else gram + z.transpose(1, 2) @ z
        cross = z.transpose(1, 2) @ t[None] if cross is None else cross + z.transpose(1, 2) @ t[None]
        z_sum = z.sum(1) if z_sum is None else z_sum + z.sum(1)
        t_sum = t.sum(0) if t_sum is None else t_sum + t.sum(0)
    if gram is None or cross is None or z_sum is None or t_sum is None:
        raise ProbeError(
            "the batch source yielded no rows on the second pass (it must yield the same batches)"
        )
    z_mean, t_mean = z_sum / count, t_sum / count
    centred_gram = gram / count - z_mean[:, :, None] * z_mean[:, None, :]
    centred_gram.diagonal(dim1=1, dim2=2).add_(l2)
    centred_cross = cross / count - z_mean[:, :, None] * t_mean[None, None, :]
    weight = _per_site(torch.linalg.solve, centred_gram, centred_cross)
    bias = t_mean[None] - (z_mean[:, None, :] @ weight)[:, 0]
    return LinearProbes("regression", weight.float(), bias.float(), mean, scale, None, list(sites), l2)
