"""Emergence curves of a per-layer metric over training steps: pluggable curve families, robust fits, and an
architecture → parameters predictor.

The default family is the exponentially-modulated logarithm of "Hidden Dynamics of Massive Activations in
Transformer Training" (arXiv 2508.03616)::

    f(t) = A · exp(−λ·t) · log(γ·t + t0) + K

- ``A`` amplitude: how far the metric rises above its baseline (sign = direction);
- ``λ`` modulation (decay) rate: how fast the logarithmic growth is damped; 0 means unbounded log growth;
- ``γ`` logarithmic growth rate: the time scale (1/γ steps) on which growth sets in;
- ``t0`` offset (onset): shifts the logarithm, ``f(0) = A·log(t0) + K``;
- ``K`` baseline.

Derived quantities (:func:`derived_quantities`): the **peak step** and **peak value** (maximum of f over
[0, 10 × last observed step]), the **emergence step** (first step where f covers half its rise from f(0) to the
peak), and the **steady-state value** (limit as t → ∞: K when λ > 0, else unbounded and reported as the value at
10 × the last step).

Add a family with :func:`register_family`; compare families on one layer by AIC (lower is better).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd


class FitError(ValueError):
    """A fit was refused (too few points); the message names the minimum."""


@dataclass(frozen=True)
class CurveFamily:
    """A curve ``fn(t, *params)`` with parameter names, bounds and data-driven initial guesses."""

    name: str
    params: tuple[str, ...]
    fn: Callable[..., np.ndarray]
    bounds: tuple[Sequence[float], Sequence[float]]
    initial_guesses: Callable[[np.ndarray, np.ndarray], list[list[float]]]
    description: str = ""


FAMILIES: dict[str, CurveFamily] = {}


def register_family(family: CurveFamily) -> CurveFamily:
    """Add a curve family to the registry (replacing one of the same name)."""
    FAMILIES[family.name] = family
    return family


def _exp_log(t, a, lam, gamma, t0, k):
    return a * np.exp(-lam * t) * np.log(gamma * t + t0) + k


def _exp_log_guesses(t: np.ndarray, y: np.ndarray) -> list[list[float]]:
    span = float(y.max() - y.min()) or 1.0
    t_max = float(t.max()) or 1.0
    k0 = float(y[np.argmin(t)])
    guesses = []
    for gamma in (10.0 / t_max, 100.0 / t_max, 1000.0 / t_max, 1.0):
        for lam in (0.0, 0.3 / t_max, 3.0 / t_max):
            scale = np.log(gamma * t_max + 1.0) * np.exp(-lam * t_max) or 1.0
            sign = 1.0 if y[np.argmax(t)] >= k0 else -1.0
            guesses.append([sign * span / scale, lam, gamma, 1.0, k0])
    return guesses


register_family(CurveFamily(
    "exp_log", ("A", "lambda", "gamma", "t0", "K"), _exp_log,
    ([-np.inf, 0.0, 1e-9, 1.0, -np.inf], [np.inf, np.inf, np.inf, np.inf, np.inf]),
    _exp_log_guesses, "A·exp(−λt)·log(γt + t0) + K (arXiv 2508.03616)",
))  # fmt: skip


def _logistic(t, a, r, c, k):
    return k + a / (1.0 + np.exp(-r * (np.log1p(t) - c)))


def _logistic_guesses(t: np.ndarray, y: np.ndarray) -> list[list[float]]:
    span = float(y.max() - y.min()) or 1.0
    k0 = float(y[np.argmin(t)])
    sign = 1.0 if y[np.argmax(t)] >= k0 else -1.0
    mid = np.log1p(t)
    return [
        [sign * span, r, float(c), k0] for r in (1.0, 3.0, 10.0) for c in np.quantile(mid, [0.25, 0.5, 0.75])
    ]


register_family(CurveFamily(
    "logistic", ("A", "rate", "center_log_step", "K"), _logistic,
    ([-np.inf, 1e-6, -5.0, -np.inf], [np.inf, 100.0, 30.0, np.inf]),
    _logistic_guesses, "K + A / (1 + exp(−rate·(log(1+t) − center)))",
))  # fmt: skip


def _log_curve(t, a, gamma, k):
    return a * np.log(gamma * t + 1.0) + k


def _log_guesses(t: np.ndarray, y: np.ndarray) -> list[list[float]]:
    t_max = float(t.max()) or 1.0
    k0 = float(y[np.argmin(t)])
    span = float(y[np.argmax(t)] - k0) or 1.0
    return [[span / np.log(g * t_max + 1.0), g, k0] for g in (1.0 / t_max, 10.0 / t_max, 100.0 / t_max, 1.0)]


register_family(CurveFamily(
    "log", ("A", "gamma", "K"), _log_curve, ([-np.inf, 1e-9, -np.inf], [np.inf, np.inf, np.inf]),
    _log_guesses, "A·log(γt + 1) + K",
))  # fmt: skip


@dataclass
class CurveFit:
    """Result of fitting one family to (steps, values). ``status``: "ok", "no_emergence" or "failed"."""

    family: str
    status: str
    params: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)
    r2: float = float("nan")
    aic: float = float("nan")
    n_points: int = 0
    message: str = ""

    def predict(self, steps: np.ndarray | Sequence[float]) -> np.ndarray:
        if self.status != "ok":
            raise FitError(f"no usable {self.family} fit ({self.status}: {self.message})")
        return FAMILIES[self.family].fn(np.asarray(steps, dtype=float), *self.params.values())

    def as_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"family": self.family, "status": self.status, "r2": self.r2, "aic": self.aic,
                               "n_points": self.n_points, "message": self.message}  # fmt: skip
        row.update({f"param_{k}": v for k, v in self.params.items()})
        row.update({f"stderr_{k}": v for k, v in self.stderr.items()})
        return row


def fit_curve(
    steps: Sequence[float],
    values: Sequence[float],
    family: str = "exp_log",
    *,
    min_relative_change: float = 0.25,
    restarts: int | None = None,
    seed: int = 0,
) -> CurveFit:
    """Fit ``family`` to a metric over training steps by bounded least squares with several restarts.

    Refuses (FitError) fewer than ``n_params + 1`` points. Returns status "no_emergence" when the metric changes
    by less than ``min_relative_change`` of its scale (nothing to fit), and "failed" when no restart converges to
    a fit with R² ≥ 0.5 — never a made-up fit.
    """
    from scipy.optimize import least_squares

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
        return CurveFit(family, "no_emergence", n_points=len(t),
                        message=f"metric varies by {float(y.max() - y.min()):.3g} on a scale of {scale:.3g}")  # fmt: skip
    guesses = curve.initial_guesses(t, y)
    rng = np.random.default_rng(seed)
    extra = max(0, (restarts or 0) - len(guesses))
    for _ in range(extra):
        base = np.array(guesses[int(rng.integers(len(guesses)))], dtype=float)
        guesses.append(list(base * np.exp(rng.normal(0, 0.5, size=len(base)))))
    lower, upper = (np.asarray(b, dtype=float) for b in curve.bounds)
    best = None
    for guess in guesses:
        x0 = np.clip(np.asarray(guess, dtype=float), lower + 1e-12, upper - 1e-12)
        try:
            result = least_squares(
                lambda p: (curve.fn(t, *p) - y) / scale, x0, bounds=(lower, upper), max_nfev=4000
            )
        except (ValueError, FloatingPointError):
            continue
        if not np.all(np.isfinite(result.fun)):
            continue
        if best is None or result.cost < best.cost:
            best = result
    if best is None:
        return CurveFit(family, "failed", n_points=len(t), message="no restart produced a finite fit")
    residual = curve.fn(t, *best.x) - y
    sse = float(residual @ residual)
    sst = float(((y - y.mean()) ** 2).sum()) or 1e-300
    r2 = 1.0 - sse / sst
    aic = len(t) * np.log(max(sse, 1e-300) / len(t)) + 2 * n_params
    stderr = _standard_errors(best.jac * scale, sse, len(t), n_params)
    fit = CurveFit(family, "ok" if r2 >= 0.5 else "failed", dict(zip(curve.params, map(float, best.x), strict=True)),
                   dict(zip(curve.params, stderr, strict=True)), r2, float(aic), len(t))  # fmt: skip
    if fit.status == "failed":
        fit.message = f"best fit explains too little (R² = {r2:.2f})"
    return fit


def _standard_errors(jacobian: np.ndarray, sse: float, n: int, p: int) -> list[float]:
    dof = max(n - p, 1)
    try:
        cov = np.linalg.pinv(jacobian.T @ jacobian) * (sse / dof)
        return [float(np.sqrt(max(v, 0.0))) for v in np.diag(cov)]
    except np.linalg.LinAlgError:
        return [float("nan")] * p


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
    """Peak step/value, emergence (half-rise) step and steady-state value of a fitted curve (see module doc)."""
    if fit.status != "ok":
        return {"peak_step": np.nan, "peak_value": np.nan, "emergence_step": np.nan, "steady_state": np.nan}
    grid = np.unique(np.concatenate([[0.0], np.geomspace(1.0, 10.0 * max(last_step, 1.0), 2000)]))
    curve = fit.predict(grid)
    rising = np.max(curve) - curve[0] >= curve[0] - np.min(curve)
    peak_index = int(np.argmax(curve) if rising else np.argmin(curve))
    start, peak = float(curve[0]), float(curve[peak_index])
    half = start + 0.5 * (peak - start)
    crossed = np.nonzero((curve >= half) if rising else (curve <= half))[0]
    lam = fit.params.get("lambda", 0.0)
    steady = fit.params["K"] if fit.family == "exp_log" and lam > 0 else float(curve[-1])
    if fit.family == "logistic":
        steady = fit.params["K"] + fit.params["A"]
    return {
        "peak_step": float(grid[peak_index]),
        "peak_value": peak,
        "emergence_step": float(grid[crossed[0]]) if len(crossed) else np.nan,
        "steady_state": float(steady),
    }


# ---------------------------------------------------------------------------------------------- predictor
CONFIG_FEATURES = ("n_layers", "d_model", "n_heads", "d_mlp", "layer_fraction")


def config_features(config: dict[str, Any], layer: int) -> dict[str, float]:
    """Architecture features of one layer: sizes (log2) and the layer's position as a fraction of depth."""
    n_layers = int(config["n_layers"])
    return {
        "n_layers": float(n_layers),
        "d_model": float(np.log2(config["d_model"])),
        "n_heads": float(config["n_heads"]),
        "d_mlp": float(np.log2(config["d_mlp"])),
        "layer_fraction": layer / max(n_layers - 1, 1),
    }


class ParameterPredictor:
    """Predict emergence-curve parameters from architecture: one scikit-learn regressor per parameter.

    Train on any table with the columns of :data:`CONFIG_FEATURES` (or raw config columns n_layers, d_model,
    n_heads, d_mlp and layer) and one column per parameter (``param_<name>``), e.g. fits of Pythia runs.
    """

    def __init__(self, parameters: Sequence[str] | None = None, estimator: Any = None) -> None:
        self.parameters = list(parameters) if parameters is not None else None
        self.estimator = estimator
        self.models: dict[str, Any] = {}
        self.cv_scores: dict[str, float] = {}

    def _features(self, table: pd.DataFrame) -> np.ndarray:
        if "layer_fraction" not in table:
            table = pd.DataFrame(
                [config_features(row, int(row["layer"])) for row in table.to_dict("records")]
            )
        return table[list(CONFIG_FEATURES)].to_numpy(dtype=float)

    def fit(self, table: pd.DataFrame, cv: int = 5) -> ParameterPredictor:
        from sklearn.base import clone
        from sklearn.ensemble import RandomForestRegressor
        from sklearn.model_selection import KFold, cross_val_score

        params = self.parameters or [
            c.removeprefix("param_") for c in table.columns if c.startswith("param_")
        ]
        if not params:
            raise FitError("the table has no param_<name> columns to learn")
        if len(table) < 3:
            raise FitError(f"the predictor needs at least 3 fitted layers; got {len(table)}")
        self.parameters = params
        x = self._features(table)
        base = self.estimator or RandomForestRegressor(n_estimators=200, random_state=0, min_samples_leaf=1)
        folds = KFold(n_splits=min(cv, len(table)), shuffle=True, random_state=0)
        for name in params:
            y = table[f"param_{name}"].to_numpy(dtype=float)
            model = clone(base)
            scores = cross_val_score(clone(base), x, y, cv=folds, scoring="r2")
            self.cv_scores[name] = float(np.nanmean(scores))
            self.models[name] = model.fit(x, y)
        return self

    def predict(self, config: dict[str, Any], layers: Sequence[int] | None = None) -> pd.DataFrame:
        """Predicted parameters for each layer of a model config (dict with n_layers, d_model, n_heads, d_mlp)."""
        if not self.models:
            raise FitError("fit the predictor first (ParameterPredictor().fit(table))")
        layers = range(int(config["n_layers"])) if layers is None else layers
        rows = pd.DataFrame([config_features(config, layer) for layer in layers])
        out = pd.DataFrame({"layer": list(layers)})
        for name, model in self.models.items():
            out[f"param_{name}"] = model.predict(rows[list(CONFIG_FEATURES)].to_numpy(dtype=float))
        return out
