"""The architecture → emergence-curve parameters predictor: architecture features per layer, one scikit-learn
regressor per curve parameter or derived quantity, cross-validated leaving one architecture out (the sweep's
``dynamics_predictor`` table, :mod:`workbench.analyses.dynamics.sweep`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import clone
from sklearn.ensemble import RandomForestRegressor
from sklearn.metrics import r2_score
from sklearn.model_selection import KFold, LeaveOneGroupOut, cross_val_predict

from workbench.analyses.dynamics.emergence import FitError

CONFIG_FEATURES = (
    "n_layers",
    "d_model",
    "n_heads",
    "d_mlp",
    "layer_fraction",
    "prepend_bos",
    "log10_lr",
    "weight_decay",
)
# what a predictor learns per parameter: log10 for scale parameters, the value itself otherwise
LOG_TARGETS = ("A", "gamma", "t0", "emergence_step", "peak_step")


def config_features(config: dict[str, Any], layer: int) -> dict[str, float]:
    """Architecture features of one layer: sizes (log2), the layer's position as a fraction of depth, and the
    training recipe when given (fixed first token, log10 learning rate, weight decay; 0 when absent)."""
    n_layers = int(config["n_layers"])
    lr = config.get("lr")
    return {
        "n_layers": float(n_layers),
        "d_model": float(np.log2(config["d_model"])),
        "n_heads": float(config["n_heads"]),
        "d_mlp": float(np.log2(config["d_mlp"])),
        "layer_fraction": layer / max(n_layers - 1, 1),
        "prepend_bos": float(bool(config.get("prepend_bos", False))),
        "log10_lr": float(np.log10(lr)) if lr else 0.0,
        "weight_decay": float(config.get("weight_decay", 0.0) or 0.0),
    }


def _target(table: pd.DataFrame, name: str) -> np.ndarray:
    column = f"param_{name}" if f"param_{name}" in table else name
    y = table[column].to_numpy(dtype=float)
    if name in LOG_TARGETS:
        with np.errstate(all="ignore"):
            y = np.log10(np.abs(y))
    return y


class ParameterPredictor:
    """Predict emergence-curve parameters (and derived quantities) from architecture: one scikit-learn regressor
    per target.

    Train on any table with the raw config columns (n_layers, d_model, n_heads, d_mlp, layer, and optionally
    prepend_bos, lr, weight_decay) or the :data:`CONFIG_FEATURES` columns, plus one column per target
    (``param_<name>`` or a derived quantity such as ``steady_state``). Scale parameters (:data:`LOG_TARGETS`) are
    learnt as log10 |value|. ``groups`` (a column, e.g. the architecture's name) makes the cross-validation
    leave one group out: every layer of a held-out architecture is predicted by a model that never saw it.
    ``cv_scores``: pooled out-of-fold R² per target; ``cv_predictions``: the out-of-fold predictions.
    """

    def __init__(self, parameters: Sequence[str] | None = None, estimator: Any = None) -> None:
        self.parameters = list(parameters) if parameters is not None else None
        self.estimator = estimator
        self.models: dict[str, Any] = {}
        self.cv_scores: dict[str, float] = {}
        self.cv_predictions = pd.DataFrame()

    def _features(self, table: pd.DataFrame) -> np.ndarray:
        if "layer_fraction" not in table:
            table = pd.DataFrame(
                [config_features(row, int(row["layer"])) for row in table.to_dict("records")]
            )
        return table[list(CONFIG_FEATURES)].to_numpy(dtype=float)

    def fit(self, table: pd.DataFrame, cv: int = 5, groups: str | None = None) -> ParameterPredictor:
        params = self.parameters or [
            c.removeprefix("param_") for c in table.columns if c.startswith("param_")
        ]
        if not params:
            raise FitError("the table has no param_<name> columns to learn; pass parameters=[...]")
        if len(table) < 3:
            raise FitError(f"the predictor needs at least 3 fitted layers; got {len(table)}")
        if groups is not None:
            if groups not in table:
                raise FitError(
                    f"no column {groups!r} to group the cross-validation by; columns: {list(table)}"
                )
            if table[groups].nunique() < 2:
                raise FitError(f"leave-one-{groups}-out needs at least 2 distinct {groups} values")
        self.parameters = params
        x = self._features(table)
        base = (
            self.estimator
            if self.estimator is not None
            else RandomForestRegressor(n_estimators=200, random_state=0)
        )
        if groups is not None:
            folds: Any = LeaveOneGroupOut()
            split_groups = table[groups].to_numpy()
        else:
            folds, split_groups = KFold(n_splits=min(cv, len(table)), shuffle=True, random_state=0), None
        predictions = {}
        for name in params:
            y = _target(table, name)
            keep = np.isfinite(y)
            if keep.sum() < 3:
                raise FitError(f"target {name!r} has {int(keep.sum())} finite values; the predictor needs 3")
            g = split_groups[keep] if split_groups is not None else None
            if g is not None and len(set(g)) < 2:
                raise FitError(f"target {name!r} is finite for one {groups} only; leave-one-out needs 2")
            out_of_fold = np.full(len(y), np.nan)
            out_of_fold[keep] = cross_val_predict(clone(base), x[keep], y[keep], cv=folds, groups=g)
            self.cv_scores[name] = float(r2_score(y[keep], out_of_fold[keep]))
            predictions[name] = out_of_fold
            self.models[name] = clone(base).fit(x[keep], y[keep])
        self.cv_predictions = pd.DataFrame(predictions, index=table.index)
        return self

    def predict(self, config: dict[str, Any], layers: Sequence[int] | None = None) -> pd.DataFrame:
        """Predicted parameters for each layer of a model config (dict with n_layers, d_model, n_heads, d_mlp);
        scale parameters come back in their own units (10 ** the learnt log10)."""
        if not self.models:
            raise FitError("fit the predictor first (ParameterPredictor().fit(table))")
        layers = range(int(config["n_layers"])) if layers is None else layers
        rows = pd.DataFrame([config_features(config, layer) for layer in layers])
        out = pd.DataFrame({"layer": list(layers)})
        for name, model in self.models.items():
            value = model.predict(rows[list(CONFIG_FEATURES)].to_numpy(dtype=float))
            out[f"param_{name}"] = 10.0**value if name in LOG_TARGETS else value
        return out
