"""The weighted k-NN against scikit-learn's KNeighborsClassifier with the same votes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from benchmark.probe.knn import knn_predict


@pytest.mark.parametrize(("k", "temperature"), [(20, 0.07), (5, 0.5), (1, 1.0)])
def test_knn_matches_sklearn_with_exponential_cosine_votes(k: int, temperature: float):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16))
    train_labels = rng.integers(0, 4, 200)
    train = centres[train_labels] + rng.normal(scale=1.5, size=(200, 16))
    test = centres[rng.integers(0, 4, 60)] + rng.normal(scale=1.5, size=(60, 16))
    ours = knn_predict(
        torch.tensor(train),
        torch.tensor(train_labels),
        torch.tensor(test),
        4,
        k,
        temperature,
        chunk=7,  # several chunks, one of them short
    ).numpy()

    def votes(distance: np.ndarray) -> np.ndarray:  # sklearn's cosine distance is 1 - sim
        return np.exp((1.0 - distance) / temperature)

    ref = KNeighborsClassifier(k, weights=votes, metric="cosine", algorithm="brute")
    expected = ref.fit(train, train_labels).predict(test)
    np.testing.assert_array_equal(ours, expected)
    assert (ours == expected).mean() > 0  # the comparison is about something


def test_knn_votes_by_similarity_weight_not_by_count():
    # two far class-0 neighbours against one near class-1 neighbour: exp(sim / T) decides
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.1]])
    assert knn_predict(train, labels, query, 2, k=3, temperature=0.07).tolist() == [1]
    # a high temperature flattens the weights: the majority wins
    assert knn_predict(train, labels, query, 2, k=3, temperature=100.0).tolist() == [0]


def test_k_is_capped_at_the_training_set():
    train = torch.eye(3)
    out = knn_predict(train, torch.tensor([0, 1, 2]), torch.eye(3), 3, k=20)
    assert out.tolist() == [0, 1, 2]
