"""Emergence curves of a per-layer metric over training steps: pluggable curve families, fits in a well-posed
parameterisation with identifiability checks, bootstrap intervals (the architecture → parameters predictor that
learns them is :mod:`workbench.analyses.dynamics.predictor`).

The default family is the exponentially-modulated logarithm of "Hidden Dynamics of Massive Activations in
Transformer Training" (arXiv 2508.03616)::

    f(t) = A · exp(−λ·t) · log(γ·t + t0) + K

- ``A`` amplitude (> 0 on the metric's own direction: a falling metric, e.g. attention entropy, is fitted as
  −metric, so A is negative in metric units and ``direction`` is −1);
- ``λ`` modulation (decay) rate; 0 means unbounded log growth (no decay within the data);
- ``γ`` logarithmic growth rate: the time scale (1/γ steps) on which growth sets in;
- ``t0`` offset (≥ 1): ``f(0) = A·log(t0) + K``;
- ``K`` baseline.

**How it is fitted.** Steps are divided by the last step T and the metric is centred on its first value and divided
by its range, so every family is fitted on O(1) numbers, in coordinates θ of comparable scale (exp_log:
log10 a, λ·T, log10 γ·T, log10 t0, k) within bounds that keep the paper's regime: positive amplitude, a growth
time scale between a third of the first positive step and 3 T, a decay time no shorter than T/30. The parameters
are mapped back to steps and metric units afterwards.

**When a fit is not trusted.** A fit whose Jacobian (in θ) has condition number above ``max_condition``, whose
parameters sit on a bound, or whose standard error exceeds the value itself has status ``"non_identifiable"`` and
its message says which — e.g. a log term linearised by a tiny γ, where A and γ trade off (A·γ is determined, A
and γ are not). Its curve and derived quantities may still be usable; their bootstrap intervals say how much.
Standard errors are the delta method's (from the Jacobian in θ); :func:`bootstrap_fit` gives percentile
intervals over prompts (resampling the per-prompt values behind each checkpoint's mean) or residuals.

Derived quantities (:func:`derived_quantities`): the **peak step** and **peak value** (extremum of f over the
observed steps [0, last step]), the **emergence step** (first step where f covers half its rise from f(0) to that
peak: within the data, never extrapolated), the **final value** f(last step) and the **steady-state value** (the
extrapolated limit as t → ∞: K when λ > 0, else the value at 10 × the last step).

Add a family with :func:`register_family`; compare families on one layer by AIC (lower is better).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

DERIVED = ("peak_step", "peak_value", "emergence_step", "final_value", "steady_state")
MAX_CONDITION = 1e6
N_OPTIMIZED = 4  # starts that are optimised: those of the family's guesses that already fit best


class FitError(ValueError):
    """A fit was refused (too few points, unknown family); the message names the minimum or the choices."""


@dataclass(frozen=True)
class Scales:
    """The units a fit is done in: steps / ``t_max``; metric = ``y_offset`` + ``direction`` · ``y_scale`` · z.

    ``t_min`` is the first positive step (the shortest time scale the data can resolve).
    """

    t_max: float
    t_min: float
    y_offset: float
    y_scale: float
    direction: float


@dataclass(frozen=True)
class CurveFamily:
    """A curve ``fn(t, *params)`` in steps and metric units, fitted in coordinates ``theta``.

    ``to_params(theta, scales)`` maps fit coordinates to the parameters; ``bounds(scales)`` gives (lower, upper)
    arrays in theta; ``guesses(scales)`` the starting points. ``free_lower`` names the parameters whose lower
    bound is a meaningful value, not a sign of a bad fit (λ = 0: no decay; t0 = 1: f(0) = K). ``locations`` names
    the location parameters, whose standard error is judged against the data's range ("metric": the metric's
    range; "log_step": log(1 + last step)) rather than against their value (K = 0 is as good as any K).
    """

    name: str
    params: tuple[str, ...]
    fn: Callable[..., np.ndarray]
    to_params: Callable[[np.ndarray, Scales], np.ndarray]
    bounds: Callable[[Scales], tuple[np.ndarray, np.ndarray]]
    guesses: Callable[[Scales], list[list[float]]]
    free_lower: tuple[str, ...] = ()
    locations: dict[str, str] = field(default_factory=dict)
    description: str = ""


FAMILIES: dict[str, CurveFamily] = {}


def register_family(family: CurveFamily) -> CurveFamily:
    """Add a curve family to the registry (replacing one of the same name)."""
    FAMILIES[family.name] = family
    return family


def _amplitude(log10_a: float, s: Scales) -> float:
    return s.direction * s.y_scale * 10.0**log10_a


def _baseline(k: float, s: Scales) -> float:
    return s.y_offset + s.direction * s.y_scale * k


def _exp_log(t, a, lam, gamma, t0, k):
    return a * np.exp(-lam * t) * np.log(gamma * t + t0) + k


def _exp_log_params(theta: np.ndarray, s: Scales) -> np.ndarray:
    log_a, lam, log_g, log_t0, k = theta
    return np.array(
        [_amplitude(log_a, s), lam / s.t_max, 10.0**log_g / s.t_max, 10.0**log_t0, _baseline(k, s)]
    )


def _growth_bounds(s: Scales) -> tuple[float, float]:
    """log10 of γ·T: growth time scale between a third of the first positive step and 3 T."""
    return float(np.log10(1.0 / 3.0)), float(np.log10(3.0 * s.t_max / max(s.t_min, 1e-12)))


def _exp_log_bounds(s: Scales) -> tuple[np.ndarray, np.ndarray]:
    g_lo, g_hi = _growth_bounds(s)
    return np.array([-3.0, 0.0, g_lo, 0.0, -2.0]), np.array([3.0, 30.0, g_hi, 2.0, 2.0])


def _exp_log_guesses(s: Scales) -> list[list[float]]:
    g_lo, g_hi = _growth_bounds(s)
    guesses = []
    for log_g in np.linspace(g_lo + 0.5, g_hi - 0.5, 3):
        for lam in (0.1, 3.0):
            scale = np.log(10.0**log_g + 1.0) * np.exp(-lam)
            guesses.append([float(np.log10(max(1.0 / max(scale, 1e-3), 1e-3))), lam, float(log_g), 0.0, 0.0])
    return guesses


register_family(
    CurveFamily(
        "exp_log",
        ("A", "lambda", "gamma", "t0", "K"),
        _exp_log,
        _exp_log_params,
        _exp_log_bounds,
        _exp_log_guesses,
        free_lower=("lambda", "t0"),
        locations={"K": "metric"},
        description="A·exp(−λt)·log(γt + t0) + K (arXiv 2508.03616)",
    )
)


def _logistic(t, a, r, c, k):
    return k + a / (1.0 + np.exp(-r * (np.log1p(t) - c)))


def _logistic_params(theta: np.ndarray, s: Scales) -> np.ndarray:
    log_a, r, c, k = theta
    return np.array([_amplitude(log_a, s), r, c, _baseline(k, s)])


def _logistic_bounds(s: Scales) -> tuple[np.ndarray, np.ndarray]:
    return np.array([-3.0, 0.1, 0.0, -2.0]), np.array([3.0, 30.0, float(np.log1p(s.t_max)) + 1.0, 2.0])


def _logistic_guesses(s: Scales) -> list[list[float]]:
    top = float(np.log1p(s.t_max))
    return [[0.0, r, c * top, 0.0] for r in (1.0, 3.0, 10.0) for c in (0.25, 0.5, 0.75)]


register_family(
    CurveFamily(
        "logistic",
        ("A", "rate", "center_log_step", "K"),
        _logistic,
        _logistic_params,
        _logistic_bounds,
        _logistic_guesses,
        locations={"K": "metric", "center_log_step": "log_step"},
        description="K + A / (1 + exp(−rate·(log(1+t) − center)))",
    )
)


def _log_curve(t, a, gamma, k):
    return a * np.log(gamma * t + 1.0) + k


def _log_params(theta: np.ndarray, s: Scales) -> np.ndarray:
    log_a, log_g, k = theta
    return np.array([_amplitude(log_a, s), 10.0**log_g / s.t_max, _baseline(k, s)])


def _log_bounds(s: Scales) -> tuple[np.ndarray, np.ndarray]:
    g_lo, g_hi = _growth_bounds(s)
    return np.array([-3.0, g_lo, -2.0]), np.array([3.0, g_hi, 2.0])


def _log_guesses(s: Scales) -> list[list[float]]:
    g_lo, g_hi = _growth_bounds(s)
    return [
        [float(-np.log10(np.log(10.0**g + 1.0))), float(g), 0.0]
        for g in np.linspace(g_lo + 0.5, g_hi - 0.5, 5)
    ]


register_family(
    CurveFamily(
        "log",
        ("A", "gamma", "K"),
        _log_curve,
        _log_params,
        _log_bounds,
        _log_guesses,
        locations={"K": "metric"},
        description="A·log(γt + 1) + K",
    )
)


@dataclass
class CurveFit:
    """Result of fitting one family to (steps, values).

    ``status``: "ok" (identifiable), "non_identifiable" (the curve fits, some parameters are not determined; see
    ``message``), "no_emergence" (the metric barely changes) or "failed" (R² < 0.5 or no finite fit).
    ``stderr``: delta-method standard errors; ``intervals``: bootstrap percentile intervals (param or derived
    quantity -> (low, high)) after :func:`bootstrap_fit`.
    """

    family: str
    status: str
    params: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)
    r2: float = float("nan")
    aic: float = float("nan")
    n_points: int = 0
    message: str = ""
    condition_number: float = float("nan")
    direction: int = 0
    theta: list[float] = field(default_factory=list)
    scales: Scales | None = None
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    level: float = float("nan")
    n_boot: int = 0

    @property
    def usable(self) -> bool:
        """The curve describes the data (ok or non_identifiable), so it can be drawn and its shape read."""
        return self.status in ("ok", "non_identifiable")

    def predict(self, steps: np.ndarray | Sequence[float]) -> np.ndarray:
        if not self.usable:
            raise FitError(f"no usable {self.family} fit ({self.status}: {self.message})")
        return FAMILIES[self.family].fn(np.asarray(steps, dtype=float), *self.params.values())

    def as_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "family": self.family,
            "status": self.status,
            "r2": self.r2,
            "aic": self.aic,
            "n_points": self.n_points,
            "message": self.message,
            "condition_number": self.condition_number,
            "direction": self.direction,
        }
        row.update({f"param_{k}": v for k, v in self.params.items()})
        row.update({f"stderr_{k}": v for k, v in self.stderr.items()})
        for name, (low, high) in self.intervals.items():
            row[f"low_{name}"], row[f"high_{name}"] = low, high
        if self.n_boot:
            row["interval_level"], row["n_boot"] = self.level, self.n_boot
        return row


def _scales(t: np.ndarray, y: np.ndarray, direction: float) -> Scales:
    positive = t[t > 0]
    order = np.argsort(t)
    span = float(y.max() - y.min()) or 1.0
    return Scales(
        float(t.max()) or 1.0,
        float(positive.min()) if len(positive) else 1.0,
        float(y[order[0]]),
        span,
        direction,
    )


def _solve(curve: CurveFamily, t: np.ndarray, y: np.ndarray, scales: Scales, starts: list[list[float]]):
    """Best bounded least-squares solution in theta over ``starts`` (None when none is finite)."""
    lower, upper = curve.bounds(scales)
    best = None

    def residual(theta: np.ndarray) -> np.ndarray:
        return (curve.fn(t, *curve.to_params(theta, scales)) - y) / scales.y_scale

    for x0 in (np.clip(np.asarray(start, dtype=float), lower + 1e-9, upper - 1e-9) for start in starts):
        try:
            with np.errstate(all="ignore"):
                result = least_squares(residual, x0, bounds=(lower, upper), max_nfev=400)
        except (ValueError, FloatingPointError):
            continue
        if not np.all(np.isfinite(result.fun)):
            continue
        if best is None or result.cost < best.cost:
            best = result
    return best, lower, upper


def fit_curve(
    steps: Sequence[float] | np.ndarray,
    values: Sequence[float] | np.ndarray,
    family: str = "exp_log",
    *,
    min_relative_change: float = 0.25,
    max_condition: float = MAX_CONDITION,
    restarts: int | None = None,
    seed: int = 0,
) -> CurveFit:
    """Fit ``family`` to a metric over training steps (see the module doc for the parameterisation).

    The direction is the data's: rising when the largest excursion from the first value is upwards (then A > 0,
    the paper's regime), falling otherwise (the curve is fitted to the mirrored metric). Refuses (FitError) fewer than
    ``n_params + 1`` points. Status "no_emergence" when the metric changes by less than ``min_relative_change`` of
    its scale, "failed" when no fit reaches R² ≥ 0.5, "non_identifiable" when the identifiability checks fail —
    never a made-up "ok".
    """
    if family not in FAMILIES:
        raise FitError(f"unknown curve family {family!r}; registered: {', '.join(FAMILIES)}")
    curve = FAMILIES[family]
    t = np.asarray(steps, dtype=float)
    y = np.asarray(values, dtype=float)
    keep = np.isfinite(t) & np.isfinite(y)
    t, y = t[keep], y[keep]
    n_params = len(curve.params)
    if len(t) < n_params + 1:
        raise FitError(
            f"the {family} curve has {n_params} parameters and needs at least {n_params + 1} checkpoints; got "
            f"{len(t)}. Use a longer checkpoint series (or a family with fewer parameters, e.g. 'log')."
        )
    scale = max(float(np.abs(y).max()), 1e-12)
    if float(y.max() - y.min()) < min_relative_change * scale:
        return CurveFit(
            family,
            "no_emergence",
            n_points=len(t),
            message=f"metric varies by {float(y.max() - y.min()):.3g} on a scale of {scale:.3g}",
        )
    rng = np.random.default_rng(seed)
    first = float(y[np.argmin(t)])
    direction = 1.0 if float(y.max()) - first >= first - float(y.min()) else -1.0
    scales = _scales(t, y, direction)
    starts = curve.guesses(scales)
    lower, upper = curve.bounds(scales)
    for _ in range(max(0, (restarts or 0) - len(starts))):
        starts.append(list(rng.uniform(lower, upper)))
    candidates = []  # (initial cost, start): the starts that already fit best are optimised
    for start in starts:
        x0 = np.clip(np.asarray(start, dtype=float), lower + 1e-9, upper - 1e-9)
        with np.errstate(all="ignore"):
            r = (curve.fn(t, *curve.to_params(x0, scales)) - y) / scales.y_scale
        candidates.append((float(np.nan_to_num(r @ r, nan=np.inf)), list(x0)))
    candidates.sort(key=lambda c: c[0])
    result, lower, upper = _solve(curve, t, y, scales, [start for _, start in candidates[:N_OPTIMIZED]])
    if result is None:
        return CurveFit(family, "failed", n_points=len(t), message="no start produced a finite fit")
    return _assess(curve, t, y, result, scales, lower, upper, max_condition=max_condition)


def _assess(curve, t, y, result, scales: Scales, lower, upper, *, max_condition: float) -> CurveFit:
    """Turn a least-squares solution into a CurveFit: R², AIC, delta-method errors and identifiability checks."""
    theta = np.asarray(result.x, dtype=float)
    params = curve.to_params(theta, scales)
    residual = curve.fn(t, *params) - y
    n, p = len(t), len(theta)
    sse = float(residual @ residual)
    sst = float(((y - y.mean()) ** 2).sum()) or 1e-300
    r2 = 1.0 - sse / sst
    aic = n * np.log(max(sse, 1e-300) / n) + 2 * p
    jac = np.asarray(result.jac, dtype=float)
    singular = np.linalg.svd(jac, compute_uv=False)
    condition = float(singular[0] / singular[-1]) if singular[-1] > 0 else float("inf")
    width = upper - lower
    at_lower = theta - lower <= 1e-4 * width
    at_upper = upper - theta <= 1e-4 * width
    free = ~(at_lower | at_upper)  # a parameter on a bound is an active constraint: held fixed for the errors
    sigma2 = (sse / max(n - int(free.sum()), 1)) / scales.y_scale**2
    cov_theta = np.zeros((p, p))
    if free.any():
        cov_theta[np.ix_(free, free)] = np.linalg.pinv(jac[:, free].T @ jac[:, free]) * sigma2
    grad = _params_jacobian(curve, theta, scales)
    cov = grad @ cov_theta @ grad.T
    stderr = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    fit = CurveFit(
        curve.name,
        "ok",
        dict(zip(curve.params, map(float, params), strict=True)),
        dict(zip(curve.params, map(float, stderr), strict=True)),
        float(r2),
        float(aic),
        n,
        condition_number=condition,
        direction=int(scales.direction),
        theta=[float(x) for x in theta],
        scales=scales,
    )
    if r2 < 0.5:
        fit.status, fit.message = "failed", f"best fit explains too little (R² = {r2:.2f})"
        return fit
    problems = []
    if not condition <= max_condition:
        problems.append(f"ill-conditioned (Jacobian condition number {condition:.2g} > {max_condition:.0g})")
    for i, name in enumerate(curve.params):
        if at_upper[i] or (at_lower[i] and name not in curve.free_lower):
            problems.append(f"{name} at its {'upper' if at_upper[i] else 'lower'} bound ({params[i]:.3g})")
        elif name in curve.locations:
            reference = scales.y_scale if curve.locations[name] == "metric" else float(np.log1p(scales.t_max))
            if stderr[i] > reference:
                problems.append(f"stderr({name}) {stderr[i]:.2g} > the data's range {reference:.2g}")
        elif name not in curve.free_lower and stderr[i] > abs(params[i]):
            problems.append(f"stderr({name}) {stderr[i]:.2g} > |{name}| {abs(params[i]):.2g}")
    if problems:
        if "gamma" in curve.params and at_lower[curve.params.index("gamma")]:
            problems.append(
                "the log term is linear over the data (γ·T small): A·γ is determined, A and γ are not"
            )
        fit.status, fit.message = "non_identifiable", "; ".join(problems)
    return fit


def _params_jacobian(curve: CurveFamily, theta: np.ndarray, scales: Scales) -> np.ndarray:
    """d params / d theta by central differences [n_params, n_theta]."""
    grad = np.zeros((len(theta), len(theta)))
    for j in range(len(theta)):
        step = np.zeros(len(theta))
        step[j] = 1e-6
        grad[:, j] = (curve.to_params(theta + step, scales) - curve.to_params(theta - step, scales)) / 2e-6
    return grad


def bootstrap_fit(
    steps: Sequence[float] | np.ndarray,
    values: Sequence[float] | np.ndarray | None = None,
    family: str = "exp_log",
    *,
    samples: np.ndarray | None = None,
    n_boot: int = 200,
    level: float = 0.9,
    seed: int = 0,
    **fit_kwargs: Any,
) -> CurveFit:
    """:func:`fit_curve` plus bootstrap percentile intervals of the parameters and derived quantities.

    Args:
        steps: [n_steps] training steps.
        values: [n_steps] the metric (the mean over prompts); may be omitted when ``samples`` is given.
        samples: [n_prompts, n_steps] per-prompt values behind each checkpoint's mean (NaN = missing). Prompts are
            resampled with replacement (the uncertainty of the prompt set); without ``samples`` the residuals of
            the fit are resampled instead.
        n_boot: replicates; each is refitted from the full fit's solution.
        level: interval coverage, e.g. 0.9 for 5 %–95 %.

    Intervals of steps (emergence, peak) are never narrower than the checkpoints bracketing the estimate: between
    two checkpoints the curve's shape is the family's, not the data's.
    """
    t = np.asarray(steps, dtype=float)
    if samples is not None:
        samples = np.asarray(samples, dtype=float)
        if samples.ndim != 2 or samples.shape[1] != len(t):
            raise FitError(f"samples must be [n_prompts, n_steps={len(t)}]; got shape {samples.shape}")
        values = np.nanmean(samples, axis=0)
    if values is None:
        raise FitError("bootstrap_fit needs values or samples")
    y = np.asarray(values, dtype=float)
    fit = fit_curve(t, y, family, **fit_kwargs)
    if not fit.usable or n_boot < 1:
        return fit
    curve = FAMILIES[family]
    scales = fit.scales
    assert scales is not None
    fitted = curve.fn(t, *fit.params.values())
    rng = np.random.default_rng(seed)
    draws = []
    start = [fit.theta]
    for _ in range(n_boot):
        if samples is not None:
            replicate = np.nanmean(samples[rng.integers(0, len(samples), len(samples))], axis=0)
        else:
            replicate = fitted + rng.choice(y - fitted, size=len(y), replace=True)
        keep = np.isfinite(replicate)
        result, _, _ = _solve(curve, t[keep], replicate[keep], scales, start)
        if result is None:
            continue
        boot = CurveFit(
            family, "ok", dict(zip(curve.params, map(float, curve.to_params(result.x, scales)), strict=True))
        )
        draws.append([*boot.params.values(), *derived_quantities(boot, float(t.max())).values()])
    if not draws:
        return fit
    table = np.asarray(draws, dtype=float)
    tail = (1.0 - level) / 2.0
    for i, name in enumerate([*curve.params, *DERIVED]):
        column = table[:, i][np.isfinite(table[:, i])]
        if len(column):
            fit.intervals[name] = (float(np.quantile(column, tail)), float(np.quantile(column, 1.0 - tail)))
    observed = np.unique(t)
    derived = derived_quantities(fit, float(t.max()))
    for name in (
        "emergence_step",
        "peak_step",
    ):  # the data place a step no finer than between two checkpoints
        if name in fit.intervals and np.isfinite(derived[name]):
            low, high = fit.intervals[name]
            below, above = observed[observed <= derived[name]], observed[observed >= derived[name]]
            fit.intervals[name] = (
                min(low, float(below.max()) if len(below) else low),
                max(high, float(above.min()) if len(above) else high),
            )
    fit.level, fit.n_boot = level, len(draws)
    return fit


def compare_families(
    steps: Sequence[float], values: Sequence[float], families: Sequence[str] | None = None
) -> pd.DataFrame:
    """Fit every (or the given) family and rank by AIC (lower is better)."""
    rows = []
    for name in families or list(FAMILIES):
        try:
            rows.append(fit_curve(steps, values, name).as_row())
        except FitError as err:
            rows.append({"family": name, "status": "refused", "message": str(err)})
    return pd.DataFrame(rows).sort_values("aic", na_position="last").reset_index(drop=True)


def derived_quantities(fit: CurveFit, last_step: float) -> dict[str, float]:
    """Peak step/value, emergence (half-rise) step, final and steady-state value of a fitted curve (module doc)."""
    if not fit.usable:
        return dict.fromkeys(DERIVED, np.nan)
    grid = np.unique(np.concatenate([[0.0], np.geomspace(1.0, max(last_step, 1.0), 2000)]))
    with np.errstate(all="ignore"):
        curve = fit.predict(grid)
        final = float(curve[-1])
        far = float(fit.predict([10.0 * max(last_step, 1.0)])[0])
    rising = np.max(curve) - curve[0] >= curve[0] - np.min(curve)
    peak_index = int(np.argmax(curve) if rising else np.argmin(curve))
    start, peak = float(curve[0]), float(curve[peak_index])
    half = start + 0.5 * (peak - start)
    crossed = np.nonzero((curve >= half) if rising else (curve <= half))[0]
    steady = far
    if fit.family == "exp_log" and fit.params.get("lambda", 0.0) > 0:
        steady = fit.params["K"]
    if fit.family == "logistic":
        steady = fit.params["K"] + fit.params["A"]
    return {
        "peak_step": float(grid[peak_index]),
        "peak_value": peak,
        "emergence_step": float(grid[crossed[0]]) if len(crossed) else np.nan,
        "final_value": final,
        "steady_state": float(steady),
    }
