"""scikit-learn estimators over the batched probes, for pipelines, ``cross_val_score`` and grid searches.

    cross_val_score(make_pipeline(ProbeClassifier(l2=1e-2)), X, y, cv=5)

They fit one site (X [n_samples, n_features]); use :func:`probes.linear.fit_probes` directly to fit many sites
in one optimisation.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.validation import check_is_fitted, check_X_y, validate_data

from workbench.probes.linear import LinearProbes, fit_probes


class _ProbeEstimator(BaseEstimator):
    task = "classification"

    def __init__(self, l2: float = 1e-3, standardize: bool = True, max_iter: int = 100, tol: float = 1e-4):
        self.l2 = l2
        self.standardize = standardize
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, X, y):
        X, y = check_X_y(X, y, dtype=np.float32, y_numeric=self.task == "regression", multi_output=True)
        validate_data(self, X, reset=True, skip_check_array=True)
        labels = torch.as_tensor(y)
        if self.task == "classification":
            self.classes_, encoded = np.unique(y, return_inverse=True)
            labels = torch.as_tensor(encoded)
        self.probes_: LinearProbes = fit_probes(
            torch.from_numpy(X)[None],
            labels,
            task=self.task,
            l2=self.l2,
            standardize=self.standardize,
            max_iter=self.max_iter,
            tol=self.tol,
        )
        self.n_iter_ = self.probes_.iterations
        return self

    def _decision(self, X) -> torch.Tensor:
        check_is_fitted(self, "probes_")
        X = validate_data(self, X, reset=False, dtype=np.float32)
        return self.probes_.decision_function(torch.from_numpy(X)[None])[0]

    @property
    def coef_(self) -> np.ndarray:
        """Weights in the input space [outputs, n_features] (standardisation folded in)."""
        check_is_fitted(self, "probes_")
        return (self.probes_.weight[0] / self.probes_.scale[0][:, None]).T.numpy()


class ProbeClassifier(ClassifierMixin, _ProbeEstimator):
    """L2-regularised multinomial logistic regression (sklearn's ``LogisticRegression(C=1/(l2·n))`` objective on
    standardised inputs), fitted in torch."""

    task = "classification"

    def decision_function(self, X) -> np.ndarray:
        """Logits [n_samples, n_classes]."""
        return self._decision(X).numpy()

    def predict_proba(self, X) -> np.ndarray:
        return self._decision(X).softmax(-1).numpy()

    def predict(self, X) -> np.ndarray:
        return self.classes_[self._decision(X).argmax(-1).numpy()]


class ProbeRegressor(RegressorMixin, _ProbeEstimator):
    """Ridge regression (sklearn's ``Ridge(alpha=l2·n)`` objective on standardised inputs), solved in closed form."""

    task = "regression"

    def predict(self, X) -> np.ndarray:
        out = self._decision(X).numpy()
        return out[:, 0] if out.shape[1] == 1 and self._y_1d else out

    def fit(self, X, y):
        self._y_1d = np.ndim(y) == 1
        return super().fit(X, y)
