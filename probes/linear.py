"""Linear probes fitted for many activation sites at once: one optimisation over a [sites, d, outputs] weight.

Classification minimises, per site, the mean multinomial cross-entropy + ``l2``/2 · ‖W‖² (the bias is not
penalised) — sklearn's ``LogisticRegression(C=1 / (l2 · n_train))`` objective. Regression (ridge) minimises the
mean squared error + ``l2`` · ‖W‖², solved in closed form — sklearn's ``Ridge(alpha=l2 · n_train)``. Inputs are
standardised per site and dimension with training statistics unless ``standardize=False``.

The sites are independent problems, fitted by one L-BFGS loop whose steps evaluate every still-running site
(two float32 products per site, on a pool of worker threads where the sites are large); each site keeps its own
correction pairs and line search and leaves the batch as soon as it meets sklearn's stopping rule (largest
gradient entry ≤ tol), so easy sites do not wait for the hardest. Narrow sites (where a d × d factorisation is
cheap next to the iterations) are preconditioned with their input covariance and start from the closed-form
ridge fit to one-hot targets; wide ones (d 768) start from zero.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.nn import functional as F
from tqdm.auto import tqdm

from workbench.fileio import atomic_save_tensors
from workbench.labels import TASKS


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
    site_iterations: torch.Tensor | None = None

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
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 — safe_open is not iterable
        return cls(
            meta["task"],
            tensors["weight"],
            tensors["bias"],
            tensors["mean"],
            tensors["scale"],
            tensors.get("classes"),
            json.loads(meta["sites"]),
            float(meta["l2"]),
        )


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
    # the sum first: one read and no [sites, n, d] mask; only a non-finite sum (or an overflow) looks closer
    if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
        site, row = (int(i) for i in torch.nonzero(~torch.isfinite(x))[0][:2])
        raise ProbeError(f"activations contain NaN/inf (site {site}, row {row}); clean or drop those rows")
    return x.float()


def _standardise(
    x: torch.Tensor, standardize: bool, pool: _SitePool | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-site, per-dimension training mean and scale [sites, d] and the standardised inputs z [sites, n, d]
    (``x`` itself when ``standardize`` is False). Each site in turn (on the pool's workers when there is a pool):
    its mean, then its centred sum of squares in blocks of ``CACHE_FLOATS`` read from cache (``Tensor.std`` and
    column norms over dim 1 are ~10× slower at [96, 1920, 768]); then z = x·(1/scale) − mean/scale in one fused
    op per site into one new tensor, whose first-touch page faults are most of the cost. The fused form is as
    exact as the float32 data: it and x − mean both carry float32 round-off × |mean| / scale."""
    if not standardize:
        return torch.zeros(x.shape[0], x.shape[2]), torch.ones(x.shape[0], x.shape[2]), x
    n_sites, n, d = x.shape
    mean = torch.empty(n_sites, d)
    squares = torch.empty(n_sites, d)
    rows = max(1, CACHE_FLOATS // d)

    def moments(site: int) -> None:
        mean[site] = x[site].mean(0)
        total = torch.zeros(d)
        for row in range(0, n, rows):
            block = x[site, row : row + rows] - mean[site]
            total += (block * block).sum(0)
        squares[site] = total

    _run_sites(pool, moments, n_sites)
    scale = _safe_scale((squares / n).sqrt())
    inverse, shift = 1 / scale, -mean / scale
    z = torch.empty_like(x)

    def fill(site: int) -> None:
        torch.addcmul(shift[site], x[site], inverse[site], out=z[site])

    _run_sites(pool, fill, n_sites)
    return mean, scale, z


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
    precondition: bool | None = None,
    workers: int | None = None,
) -> LinearProbes:
    """Fit one linear probe per site on activations ``x`` [sites, n, d] (or {site: [n, d]}) and labels ``y`` [n].

    Classification labels are any integers (the probes' classes are those seen in ``y``); regression targets are
    [n] or [n, targets]. Classification runs L-BFGS for all sites at once with a history and a line search per
    site; each site stops on its own when the largest entry of its objective's gradient is ≤ ``tol`` (sklearn's
    lbfgs rule), when its line search finds no decrease, or after ``max_iter`` iterations, and then leaves the
    batch. ``precondition`` (default: decided by cost, see :func:`_preconditioner_cost`) preconditions with each
    site's input covariance and starts from the ridge fit — a d² per-site setup that pays off for narrow sites.
    ``workers`` threads (default: torch's intra-op thread count where a site holds ≥ ``PARALLEL_FLOATS`` values,
    else 1) standardise and evaluate the sites side by side, each at one torch thread; the result does not
    depend on it.
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
    if workers is None:
        workers = torch.get_num_threads() if x.shape[1] * x.shape[2] >= PARALLEL_FLOATS else 1
    if workers < 1:
        raise ProbeError(f"workers={workers} must be ≥ 1")
    workers = min(workers, x.shape[0])
    if task == "regression":
        with _one_intra_op_thread():
            mean, scale, z = _standardise(x, standardize)
        weight, bias = _ridge(z, _as_targets(y), l2)
        return LinearProbes(task, weight, bias, mean, scale, None, sites, l2)
    classes, index = torch.unique(y.long(), return_inverse=True)
    if len(classes) < 2:
        raise ProbeError(f"classification needs at least two classes in the labels; got {classes.tolist()}")
    if precondition is None:
        precondition = _preconditioner_cost(x.shape[1], x.shape[2], len(classes)) <= PRECONDITION_LIMIT
    with _one_intra_op_thread(), _site_pool(workers) as pool:
        mean, scale, z = _standardise(x, standardize, pool)
        weight, bias, site_iterations = _logistic(
            z, index, len(classes), l2, max_iter, tol, precondition, pool
        )
    iterations = int(site_iterations.max())
    return LinearProbes(task, weight, bias, mean, scale, classes, sites, l2, iterations, site_iterations)


@contextlib.contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    """Run the block with one torch intra-op thread (process-wide; the previous count is restored after).

    The logistic fit's bookkeeping is thousands of small, memory-bound ops ([sites, C·d] vectors): a second
    thread cannot add bandwidth, and every op's parallel region waits for it — on the shared 2-core VM, with the
    other core busy, 2 threads made a [24, 1920, 768] fit 6–28× slower than 1 (benchmarks/RESULTS.md).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


HISTORY = 10  # L-BFGS correction pairs kept per site (scipy's L-BFGS-B default, which sklearn uses)
LINE_SEARCH_ROUNDS = 20  # loss evaluations one line search may take before its site counts as stalled
PRECONDITION_LIMIT = 32.0  # precondition when the setup costs at most this many loss-and-gradient evaluations
CACHE_FLOATS = 2**18  # float32 entries per block of the standardising pass (1 MiB: stays in L2)
# a site's values (n·d) from which the default fit runs one worker per intra-op thread (d 768 × 1920 rows: 5.6×)
PARALLEL_FLOATS = 2**18


def _preconditioner_cost(n: int, d: int, n_classes: int) -> float:
    """The covariance preconditioner's one-off cost for one site, in loss-and-gradient evaluations: the Gram
    matrix (n·d² multiply-adds) and its Cholesky factor and inverse (≈ d³) against 2·n·d·C per evaluation. At
    d 64 it is a few evaluations and cuts the iterations; at d 768 (C 4) it is > 100, more than a whole fit."""
    return (n * d * d + d**3) / (2 * n * d * n_classes)


def _curvature(n_classes: int) -> float:
    """1 / C: the eigenvalue of the softmax's Hessian diag(p) − ppᵀ on logit directions summing to zero, at uniform
    class probabilities — the loss's curvature per unit input variance, which sets the first step's length."""
    return 1 / n_classes


def _logistic(
    z: torch.Tensor,
    index: torch.Tensor,
    n_classes: int,
    l2: float,
    max_iter: int,
    tol: float,
    precondition: bool,
    pool: _SitePool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression per site; z [sites, n, d] standardised, index [n] in [0, n_classes).

    Returns weight [sites, d, C], bias [sites, C] and each site's iteration count [sites]. Without
    preconditioning the weights start at 0 and the bias at the log class priors. With it, L-BFGS's initial
    inverse Hessian is γ·M⁻¹ with M = Cov(z) + C·l2·I per class column — L-BFGS on whitened inputs,
    without whitening the data — and the weights start from the ridge fit to the centred one-hot targets under
    the same M (one Cholesky factor serves both) times C: one Newton step from zero.
    """
    n_sites, n, d = z.shape
    onehot = F.one_hot(index, n_classes).float()
    prior = onehot.mean(0)
    curvature = _curvature(n_classes)
    weight = torch.zeros(n_sites, n_classes, d, dtype=torch.float64)
    bias = torch.log(prior.clamp_min(1e-6)).double().expand(n_sites, n_classes).clone()
    inverse = None
    if precondition:
        centred = z - z.mean(1, keepdim=True)
        covariance = (centred.transpose(1, 2) @ centred).double() / n
        lower = _damped_cholesky(covariance, l2 / curvature)
        inverse = _per_site(torch.cholesky_inverse, lower)
        rhs = (centred.transpose(1, 2) @ (onehot - prior)[None]).double() / n
        ridge = _per_site(torch.cholesky_solve, rhs, lower)  # [sites, d, C]
        weight = (ridge / curvature).transpose(1, 2).contiguous()
        bias = bias - (z.mean(1).double()[:, None, :] @ ridge / curvature)[:, 0]
    weight, bias, iterations = _lbfgs_logistic(
        z, index, weight, bias, l2, max_iter, tol, inverse, curvature, pool
    )
    return weight.transpose(1, 2).float().contiguous(), bias.float(), iterations


def _damped_cholesky(covariance: torch.Tensor, damping: float) -> torch.Tensor:
    """Cholesky factor [sites, d, d] of covariance [sites, d, d] + damping·I, with a jitter (1e-6 of the mean
    variance, raised ×100 until it factorises) for damping 0 and the round-off of float32 Gram matrices."""
    jitter = 1e-6 * covariance.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-12)
    damped = covariance.clone()
    damped.diagonal(dim1=1, dim2=2).add_((damping + jitter)[:, None])
    lower, info = _per_site(torch.linalg.cholesky_ex, damped)
    while bool((info > 0).any()):
        damped.diagonal(dim1=1, dim2=2).add_(jitter[:, None] * 99)
        jitter = jitter * 100
        lower, info = _per_site(torch.linalg.cholesky_ex, damped)
    return lower


class _SitePool:
    """Worker threads that evaluate sites side by side (``workers`` ≥ 2), each running torch at one intra-op
    thread: the per-site matrix products release the GIL, and a site is a task of its own, so a worker on a
    core that other jobs keep busy simply takes fewer sites (no parallel region waits for it)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.executor = ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,))

    def map(self, task: Callable[[int], None], count: int) -> None:
        for _ in self.executor.map(task, range(count)):
            pass

    def close(self) -> None:
        self.executor.shutdown()


def _run_sites(pool: _SitePool | None, task: Callable[[int], None], count: int) -> None:
    """``task(i)`` for i in range(count), on the pool's workers when there is a pool and more than one task."""
    if pool is None or count < 2:
        for i in range(count):
            task(i)
    else:
        pool.map(task, count)


@contextlib.contextmanager
def _site_pool(workers: int) -> Iterator[_SitePool | None]:
    pool = _SitePool(workers) if workers > 1 else None
    try:
        yield pool
    finally:
        if pool is not None:
            pool.close()


class _SoftmaxObjective:
    """Mean multinomial cross-entropy + l2/2·‖W‖² of each site (bias unpenalised), with its gradient.

    Parameters are flat per site, [k, C·d + C]: class-major weights [C, d] then the bias [C], in float64; the data
    z [sites, n, d] stays float32. An evaluation takes one site at a time through two float32 matrix products,
    logits = W zᵀ + b [C, n] and (softmax − onehot) z [C, d], the second reading the site's data from cache
    (5.9 MB at [1920, 768]). Class-major logits make the softmax run along rows (10× faster than over 4 classes
    per row).
    Sites run on the pool's workers when one is given. The loss is −log p(label) per row, summed in float64.
    """

    def __init__(
        self, z: torch.Tensor, index: torch.Tensor, n_classes: int, l2: float, pool: _SitePool | None = None
    ):
        n, d = z.shape[1:]
        self.z, self.l2, self.n_classes, self.split, self.pool = z, l2, n_classes, n_classes * d, pool
        self.target = F.one_hot(index, n_classes).T.float().contiguous()  # [C, n]
        self.counts = self.target.sum(1, dtype=torch.float64)  # [C]
        self.pick = index[None, None, :]  # [1, 1, n]

    def __call__(self, sites: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss [k] and gradient [k, C·d + C] of ``sites`` [k] at ``params`` [k, C·d + C]."""
        k, (n, d) = len(sites), self.z.shape[1:]
        weight = params[:, : self.split].reshape(k, self.n_classes, d)
        weight32, bias32 = weight.float(), params[:, self.split :].float()
        logits_all = torch.empty(k, self.n_classes, n)
        probs_all = torch.empty(k, self.n_classes, n)
        residual_data = torch.empty(k, self.n_classes, d)  # Σ_rows (softmax − onehot) zᵀ
        ids = sites.tolist()
        zero = (
            (weight32 == 0).flatten(1).all(1).tolist()
        )  # the start from 0: logits = bias, no product needed

        def evaluate(i: int) -> None:
            data = self.z[ids[i]]
            if zero[i]:
                logits = logits_all[i].copy_(bias32[i, :, None].expand(-1, n))
            else:
                logits = torch.addmm(bias32[i, :, None], weight32[i], data.T, out=logits_all[i])
            probs = probs_all[i]
            probs.copy_(torch.softmax(logits, dim=0))
            torch.mm(probs - self.target, data, out=residual_data[i])

        _run_sites(self.pool, evaluate, k)
        loss = self._cross_entropy(logits_all, probs_all) + 0.5 * self.l2 * (weight**2).sum((1, 2))
        grad_weight = residual_data.double() / n + self.l2 * weight
        grad_bias = (probs_all.sum(2, dtype=torch.float64) - self.counts) / n
        return loss, torch.cat([grad_weight.reshape(k, -1), grad_bias], 1)

    def _cross_entropy(self, logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy [k] from logits and probabilities [k, C, n]: −log p(label) per row, whose error
        from the float32 logits shrinks with the row's loss (a confidently right row contributes ≈ 0 ± 0). Rows
        whose label probability underflows (< 1e-30) use log-sum-exp − label logit, with the log-sum-exp taken
        as the likeliest class's logit − log of its probability (≥ 1 / C)."""
        pick = self.pick.expand(len(logits), 1, -1)
        label_prob = probs.gather(1, pick)[:, 0]
        row_loss = -label_prob.clamp_min(1e-30).log()
        tiny = label_prob < 1e-30
        if bool(tiny.any()):
            lse = logits.amax(1) - probs.amax(1).log()
            row_loss = torch.where(tiny, lse - logits.gather(1, pick)[:, 0], row_loss)
        return row_loss.sum(1, dtype=torch.float64) / logits.shape[2]


def _lbfgs_logistic(
    z: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    l2: float,
    max_iter: int,
    tol: float,
    inverse: torch.Tensor | None,
    curvature: float,
    pool: _SitePool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L-BFGS per site from weight [sites, C, d] and bias [sites, C] (float64), all active sites per step.

    Each site has its own correction pairs, step length and stopping: it leaves the batch when the largest
    gradient entry is ≤ ``tol``, when its line search stalls, or after ``max_iter`` iterations, so later
    iterations cost only the sites still running. ``inverse`` [sites, d, d] (M⁻¹ per class column) or None
    (identity) is the initial inverse Hessian up to L-BFGS's scale γ = sᵀy / yᵀM⁻¹y, which starts at
    min(1 / ``curvature``, 1 / ‖g‖). Returns weight, bias and the iterations each site took [sites].
    """
    n_sites, n_classes, d = weight.shape
    split = n_classes * d
    objective = _SoftmaxObjective(z, index, n_classes, l2, pool)
    result = torch.cat([weight.reshape(n_sites, split), bias], 1)
    iterations = torch.zeros(n_sites, dtype=torch.long)
    every = torch.arange(n_sites)
    loss, grad = objective(every, result)
    keep = grad.abs().amax(1) > tol
    ids, params, loss, grad = every[keep], result[keep], loss[keep], grad[keep]
    inv = inverse[keep] if inverse is not None else None
    size = params.shape[1]
    s_hist = torch.zeros(len(ids), HISTORY, size, dtype=torch.float64)
    y_hist = torch.zeros_like(s_hist)
    rho = torch.zeros(len(ids), HISTORY, dtype=torch.float64)
    # the first step: the Newton length 1 / curvature, but at most 1 in parameter norm (scipy's first L-BFGS-B
    # step) — a longer one from zero into saturated softmaxes leaves L-BFGS crawling on a flat, curved loss
    gamma = (1 / grad.norm(dim=1)).clamp(max=1 / curvature)

    def initial_inverse(q: torch.Tensor) -> torch.Tensor:
        """M⁻¹ q for the active sites' q [A, C·d + C] (without γ)."""
        if inv is None:
            return q
        out = q.clone()
        out[:, :split] = torch.bmm(q[:, :split].reshape(-1, n_classes, d), inv).reshape(-1, split)
        return out

    for step in range(max_iter):
        if len(ids) == 0:
            break
        # two-loop recursion: direction = −H g, the newest pair first
        q = grad.clone()
        slots = [(step - 1 - k) % HISTORY for k in range(min(step, HISTORY))]
        alphas = []
        for slot in slots:
            a = rho[:, slot] * torch.linalg.vecdot(s_hist[:, slot], q)
            q.addcmul_(y_hist[:, slot], a[:, None], value=-1)
            alphas.append(a)
        r = gamma[:, None] * initial_inverse(q)
        for slot, a in zip(reversed(slots), reversed(alphas), strict=True):
            b = rho[:, slot] * torch.linalg.vecdot(y_hist[:, slot], r)
            r.addcmul_(s_hist[:, slot], (a - b)[:, None])
        direction = -r
        slope = (grad * direction).sum(1)
        uphill = slope >= 0  # round-off in a stale history: restart that site from the initial inverse
        if bool(uphill.any()):
            direction[uphill] = -initial_inverse(grad[uphill]) / curvature
            slope = (grad * direction).sum(1)
        moved, new_params, new_loss, new_grad = _line_search(objective, ids, params, loss, slope, direction)
        iterations[ids[moved]] += 1
        s = new_params - params
        y = new_grad - grad
        sy = (s * y).sum(1)
        valid = moved & (sy > 1e-10 * (y * y).sum(1).sqrt() * (s * s).sum(1).sqrt())
        slot = step % HISTORY
        s_hist[:, slot] = torch.where(valid[:, None], s, 0)
        y_hist[:, slot] = torch.where(valid[:, None], y, 0)
        rho[:, slot] = torch.where(valid, 1 / torch.where(valid, sy, 1), 0)
        yhy = (y * initial_inverse(y)).sum(1)
        gamma = torch.where(valid & (yhy > 0), sy / torch.where(yhy > 0, yhy, 1), gamma)
        params = torch.where(moved[:, None], new_params, params)
        loss = torch.where(moved, new_loss, loss)
        grad = torch.where(moved[:, None], new_grad, grad)
        running = moved & (grad.abs().amax(1) > tol)
        if not bool(running.all()):
            result[ids[~running]] = params[~running]
            ids, params, loss, grad = ids[running], params[running], loss[running], grad[running]
            s_hist, y_hist, rho, gamma = s_hist[running], y_hist[running], rho[running], gamma[running]
            inv = inv[running] if inv is not None else None
    result[ids] = params
    return result[:, :split].reshape(n_sites, n_classes, d), result[:, split:], iterations


def _cubic_minimiser(
    a: torch.Tensor, fa: torch.Tensor, da: torch.Tensor, b: torch.Tensor, fb: torch.Tensor, db: torch.Tensor
) -> torch.Tensor:
    """Minimiser [k] of the cubic through values f and slopes d at both ends of each bracket [a, b] (Nocedal and
    Wright, eq. 3.59); the derivative's secant where the cubic has none or an end is not finite (a loss or slope
    that overflowed), the midpoint where that fails too. Interpolating values matters near separable classes:
    there the loss grows exponentially past its minimum and a slope-only secant lands far short of it."""
    d1 = da + db - 3 * (fa - fb) / (a - b)
    root = (d1 * d1 - da * db).clamp_min(0).sqrt()
    cubic = b - (b - a) * (db + root - d1) / (db - da + 2 * root)
    usable = torch.isfinite(cubic) & (d1 * d1 >= da * db) & torch.isfinite(fb)
    secant = a - da * (b - a) / (db - da)
    secant = torch.where(torch.isfinite(secant) & (db > da), secant, (a + b) / 2)
    return torch.where(usable, cubic, secant)


def _line_search(
    objective: _SoftmaxObjective,
    ids: torch.Tensor,
    params: torch.Tensor,
    loss: torch.Tensor,
    slope: torch.Tensor,
    direction: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Wolfe line search per site along ``direction`` [A, P] from ``params`` [A, P] (loss [A], slope = gᵀp [A]
    < 0), evaluating only the sites still searching; trial step 1, then the minimiser of the cubic through the
    bracket ends' losses and slopes, kept 10 % inside the bracket, expanding ×10 at most while the step is short.

    A step is accepted when the derivative has risen to ≥ 0.9·slope (curvature) and the loss fell by the Armijo
    amount — or, near the optimum where float32 round-off hides that, when the loss rose by at most 1e-6·|loss|
    and the derivative is ≤ −0.8·slope (Hager and Zhang's approximate Wolfe condition). Returns which sites moved
    [A] (False: no acceptable step in ``LINE_SEARCH_ROUNDS`` evaluations; its point is unchanged) and the new
    params, loss [A] and gradient.
    """
    count = len(ids)
    new_params, new_loss = params.clone(), loss.clone()
    new_grad = torch.zeros_like(params)
    moved = torch.zeros(count, dtype=torch.bool)
    step = torch.ones(count, dtype=torch.float64)
    low = torch.zeros(count, dtype=torch.float64)
    low_loss, low_slope = loss.clone(), slope.clone()
    high = torch.full((count,), math.inf, dtype=torch.float64)
    high_loss = torch.zeros(count, dtype=torch.float64)
    high_slope = torch.zeros(count, dtype=torch.float64)
    pending = torch.arange(count)
    for _ in range(LINE_SEARCH_ROUNDS):
        if len(pending) == 0:
            break
        trial = params[pending] + step[pending, None] * direction[pending]
        trial_loss, trial_grad = objective(ids[pending], trial)
        trial_slope = (trial_grad * direction[pending]).sum(1)
        finite = torch.isfinite(trial_loss) & torch.isfinite(trial_slope)
        start_loss, start_slope, t = loss[pending], slope[pending], step[pending]
        armijo = trial_loss <= start_loss + 1e-4 * t * start_slope
        near = trial_loss <= start_loss + 1e-6 * start_loss.abs()
        approximate = near & (trial_slope <= -0.8 * start_slope)
        decreased = finite & (armijo | approximate)
        accept = decreased & (trial_slope >= 0.9 * start_slope)
        short = decreased & ~accept
        done = pending[accept]
        new_params[done] = trial[accept]
        new_loss[done] = trial_loss[accept]
        new_grad[done] = trial_grad[accept]
        moved[done] = True
        # the bracket: a short step (still descending steeply) raises the low end, a long one lowers the high end
        low[pending[short]] = t[short]
        low_loss[pending[short]] = trial_loss[short]
        low_slope[pending[short]] = trial_slope[short]
        new_params[pending[short]] = trial[short]
        new_loss[pending[short]] = trial_loss[short]
        new_grad[pending[short]] = trial_grad[short]
        long = ~decreased
        high[pending[long]] = t[long]
        high_loss[pending[long]] = torch.where(finite[long], trial_loss[long], math.inf)
        high_slope[pending[long]] = torch.where(finite[long], trial_slope[long], math.inf)
        pending = pending[~accept]
        a, b, da, db = low[pending], high[pending], low_slope[pending], high_slope[pending]
        bracketed = torch.isfinite(b)
        inside = _cubic_minimiser(a, low_loss[pending], da, b, high_loss[pending], db)
        inside = torch.minimum(torch.maximum(inside, a + 0.1 * (b - a)), b - 0.1 * (b - a))
        # not yet bracketed: extrapolate the derivative's secant from the start, 2× to 10× the short step
        start = slope[pending]
        reach = a * start / (start - da)
        beyond = torch.where(torch.isfinite(reach) & (da > start), reach, 10 * a).clamp(2 * a, 10 * a)
        step[pending] = torch.where(bracketed, inside, beyond)
    # out of rounds: a site with a short step that decreased the loss takes it; one without none stays put
    fallback = pending[low[pending] > 0]
    moved[fallback] = True
    return moved, new_params, new_loss, new_grad


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
