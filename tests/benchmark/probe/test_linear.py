"""The linear probe and its scores against scikit-learn built by hand."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression

from benchmark.probe.linear import classification_scores, linear_predict


def test_linear_probe_standardises_with_training_statistics_only():
    rng = np.random.default_rng(1)
    train_labels = rng.integers(0, 3, 120)
    scale = np.array([1e3, 1.0, 1e-3, 10.0])  # channel scales as different as random init's
    train = (rng.normal(size=(120, 4)) + train_labels[:, None]) * scale
    test = (rng.normal(size=(50, 4)) + rng.integers(0, 3, 50)[:, None]) * scale + 5.0
    mean, std = train.mean(axis=0), train.std(axis=0)
    ref = LogisticRegression(C=0.5, max_iter=500).fit((train - mean) / std, train_labels)
    expected = ref.predict((test - mean) / std)
    np.testing.assert_array_equal(linear_predict(train, train_labels, test, 0.5, 500), expected)


def test_scores_by_hand():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    predictions = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    # recalls 3/4, 1/2, 1 -> balanced accuracy 3/4; F1 per class 6/7, 1/2, 4/5
    scores = classification_scores(labels, predictions)
    assert np.isclose(scores["balanced_accuracy"], 75.0)
    assert np.isclose(scores["macro_f1"], 100 * (6 / 7 + 1 / 2 + 4 / 5) / 3)


def test_a_class_predicted_but_absent_from_the_test_set_does_not_count():
    scores = classification_scores(np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1]))
    # classes 0 and 1 only: F1 2/3 and 1
    assert np.isclose(scores["macro_f1"], 100 * (2 / 3 + 1) / 2)
    assert np.isclose(scores["balanced_accuracy"], 75.0)
