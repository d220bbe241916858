"""Linear probe: L2-regularized logistic regression on frozen, unaugmented image features.

scikit-learn's LogisticRegression (lbfgs, multinomial, max_iter 1000) on the normalized test-view
features of the few-shot training images. The inverse regularization strength C is chosen on the
few-shot validation split, in the style of CoOp's linear-probe script (the procedure is ours):
a coarse log grid (1e6, 1e4, …, 1e-6), then ``search_steps`` bisections in log space between a
tenth and ten times the best coarse value, always moving the worse end of the bracket; the C with
the best validation accuracy wins (ties: the first one tried). The final classifier is refitted on
the training features with that C. Without a validation split ``C`` must be given.
The learned weights (classes × dim) and biases (classes) are the state.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from blocklora.methods.frozen import FeatureMethod
from blocklora.methods.registry import register_method


@register_method
class LinearProbe(FeatureMethod):
    name = "linear_probe"
    summary = "linear probe: logistic regression on frozen features, C searched on val (scikit-learn)"
    defaults: ClassVar[dict[str, Any]] = {
        "C": None,
        "c_grid": [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6],
        "search_steps": 8,
        "max_iter": 1000,
    }
    hparam_types: ClassVar[dict[str, str]] = {"C": "float|null"}

    def setup(self) -> None:
        self.head = nn.Linear(self.feature_dim, self.task.num_classes).to(self.device)

    def extra_modules(self) -> list[nn.Module]:
        return [self.head]

    def _fit(self, c: float, x: np.ndarray, y: np.ndarray):
        # scikit-learn loads in about a second: only when a probe is fitted, not with the registry
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(C=c, solver="lbfgs", max_iter=int(self.hp["max_iter"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return model.fit(x, y)

    def search(self, x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray) -> list[list[float]]:
        """Validation accuracy of every C tried, in the order tried."""
        tried: list[list[float]] = []

        def score(c: float) -> float:
            acc = float((self._fit(c, x, y).predict(xv) == yv).mean())
            tried.append([c, acc])
            return acc

        coarse = [score(float(c)) for c in self.hp["c_grid"]]
        peak = float(self.hp["c_grid"][int(np.argmax(coarse))])
        left, right = peak / 10, peak * 10
        acc_left, acc_right = score(left), score(right)
        for _ in range(int(self.hp["search_steps"])):
            middle = math.sqrt(left * right)
            if acc_left < acc_right:
                left, acc_left = middle, score(middle)
            else:
                right, acc_right = middle, score(middle)
        return tried

    def fit(self, run) -> dict[str, Any]:
        started = time.perf_counter()
        x = self.features(self.task.train, run)[0].cpu().numpy()
        y = self.labels(self.task.train).cpu().numpy()
        stats: dict[str, Any] = {"iterations": 0}
        if self.hp["C"] is not None:
            c = float(self.hp["C"])
        elif self.task.val:
            xv = self.features(self.task.val, run)[0].cpu().numpy()
            yv = self.labels(self.task.val).cpu().numpy()
            tried = self.search(x, y, xv, yv)
            c, stats["val_accuracy"] = max(tried, key=lambda t: t[1])
            stats["search"] = tried
        else:
            raise ValueError(
                f"linear_probe on {self.task.dataset}: no validation split to choose C; give C in hparams"
            )
        model = self._fit(c, x, y)
        if list(model.classes_) != list(range(self.task.num_classes)):
            raise ValueError(
                f"linear_probe on {self.task.dataset}: the training set holds labels "
                f"{list(model.classes_)[:10]}…, not every class 0..{self.task.num_classes - 1}"
            )
        coef, intercept = model.coef_, model.intercept_
        if coef.shape[0] == 1:  # two classes: sklearn keeps one logit; split it symmetrically
            coef, intercept = np.concatenate([-coef, coef]) / 2, np.concatenate([-intercept, intercept]) / 2
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(coef))
            self.head.bias.copy_(torch.from_numpy(intercept))
        return {
            **stats,
            "C": c,
            "solver_iterations": int(np.max(model.n_iter_)),
            "train_seconds": time.perf_counter() - started,
        }

    @torch.no_grad()
    def eval_logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features.float())

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.head.named_parameters())
