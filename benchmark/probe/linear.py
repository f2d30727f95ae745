"""The linear probe: multinomial logistic regression on standardised pooled features.

scikit-learn's ``LogisticRegression`` (L-BFGS, L2) after a ``StandardScaler`` fitted on the
training features only. Standardising matters: random-init features have wildly different
scales per channel, and a probe that cannot cope with that would flatter pre-training.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def linear_predict(
    train: np.ndarray,
    train_labels: np.ndarray,
    test: np.ndarray,
    c: float = 1.0,
    max_iter: int = 1000,
) -> np.ndarray:
    """Predicted class of each row of ``test``; deterministic for given features."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    with warnings.catch_warnings():
        # the budget is part of the protocol; a probe that has not converged is still scored
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(train, train_labels)
    return probe.predict(test)


def classification_scores(labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """Balanced accuracy and macro-F1 in percent, over the classes present in ``labels``."""
    present = np.unique(labels)
    with warnings.catch_warnings():
        # a class predicted but absent from the test set has no recall; sklearn drops it
        warnings.filterwarnings("ignore", "y_pred contains classes not in y_true")
        balanced = balanced_accuracy_score(labels, predictions)
    f1 = f1_score(labels, predictions, labels=present, average="macro", zero_division=0)
    return {"balanced_accuracy": 100.0 * float(balanced), "macro_f1": 100.0 * float(f1)}
