"""Dataset-wide k-means and PCL's concentration φ against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from methods.clustering import concentration, kmeans

TAU = 0.2


def _pcl_density(sq_dist: np.ndarray, labels: np.ndarray, k: int, temperature: float):
    """``run_kmeans``'s concentration loops of PCL's ``main_pcl.py``, verbatim in numpy."""
    d_cluster: list[list[float]] = [[] for _ in range(k)]
    for im, i in enumerate(labels):
        d_cluster[i].append(sq_dist[im])
    density = np.zeros(k)
    for i, dist in enumerate(d_cluster):
        if len(dist) > 1:
            density[i] = (np.asarray(dist) ** 0.5).mean() / np.log(len(dist) + 10)
    dmax = density.max()
    for i, dist in enumerate(d_cluster):
        if len(dist) <= 1:
            density[i] = dmax
    density = density.clip(np.percentile(density, 10), np.percentile(density, 90))
    return temperature * density / density.mean()


def test_concentration_by_hand() -> None:
    # Distances (not squared) per cluster; cluster 2 has one member, cluster 3 none.
    members = {0: [1.0, 3.0], 1: [2.0, 2.0, 2.0, 2.0], 2: [5.0], 4: [0.5, 0.5, 2.0], 5: [4.0] * 6}
    labels = torch.tensor([c for c, ds in members.items() for _ in ds])
    dist = torch.tensor([d for ds in members.values() for d in ds])
    phi = concentration(dist**2, labels, 6, TAU)

    raw = {0: 2 / math.log(12), 1: 2 / math.log(14), 4: 1 / math.log(13), 5: 4 / math.log(16)}
    top = max(raw.values())  # cluster 5; clusters 2 (one member) and 3 (empty) get it too
    values = sorted([raw[0], raw[1], top, top, raw[4], raw[5]])  # 6 values: positions 0..5
    lo = values[0] + 0.5 * (values[1] - values[0])  # 10th percentile at position 0.5
    hi = values[4] + 0.5 * (values[5] - values[4])  # 90th at position 4.5
    clipped = [min(max(v, lo), hi) for v in (raw[0], raw[1], top, top, raw[4], raw[5])]
    mean = sum(clipped) / 6
    expected = torch.tensor([TAU * v / mean for v in clipped])
    torch.testing.assert_close(phi, expected, rtol=1e-5, atol=1e-7)
    assert phi[2] == phi[3] == phi[5] == phi.max()
    assert phi[4] == phi.min() and phi[4] > TAU * raw[4] / mean  # lifted by the clip
    torch.testing.assert_close(phi.mean(), torch.tensor(TAU))
    pcl = _pcl_density((dist**2).numpy(), labels.numpy(), 6, TAU)
    torch.testing.assert_close(phi, torch.from_numpy(pcl).float(), rtol=1e-5, atol=1e-7)


def test_concentration_matches_pcl_on_random_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 40, (300,), generator=g)
    sq_dist = torch.rand(300, generator=g) * 2
    phi = concentration(sq_dist, labels, 50, TAU)  # clusters 40..49 are empty
    pcl = _pcl_density(sq_dist.double().numpy(), labels.numpy(), 50, TAU)
    torch.testing.assert_close(phi, torch.from_numpy(pcl).float(), rtol=1e-5, atol=1e-7)


def test_concentration_of_singletons_only_is_the_temperature() -> None:
    phi = concentration(torch.rand(5), torch.arange(5), 5, TAU)
    torch.testing.assert_close(phi, torch.full((5,), TAU))


def _blobs(per: int = 25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0], [-4.0, -4.0, 0]])
    truth = torch.arange(4).repeat_interleave(per)
    x = centers[truth] + 0.3 * torch.randn(4 * per, 3, generator=g)
    order = torch.randperm(4 * per, generator=g)
    return x[order], truth[order], centers


@pytest.mark.parametrize("max_points", [1000, 5], ids=["all_points", "subsampled"])
def test_kmeans_recovers_separated_clusters(max_points: int) -> None:
    x, truth, centers = _blobs()
    result = kmeans(x, 4, iterations=10, restarts=3, seed=1, max_points_per_centroid=max_points)
    # One label per true cluster and a different one for each: a bijection.
    mapping = {int(t): set(result.labels[truth == t].tolist()) for t in range(4)}
    assert all(len(v) == 1 for v in mapping.values())
    assert len(set().union(*mapping.values())) == 4
    for t, (label,) in mapping.items():
        if max_points == 1000:  # trained on every point: the mean of the true cluster
            torch.testing.assert_close(result.centroids[label], x[truth == t].mean(dim=0))
        else:  # trained on 4 x 5 random points: near the true centre
            torch.testing.assert_close(result.centroids[label], centers[t], atol=0.6, rtol=0)
    # Assignments and distances are those of the returned centroids.
    d = torch.cdist(x, result.centroids) ** 2
    assert torch.equal(result.labels, d.argmin(dim=1))
    torch.testing.assert_close(result.sq_distances, d.min(dim=1).values, rtol=1e-4, atol=1e-4)
    assert result.inertia == pytest.approx(float(result.sq_distances.sum()), rel=1e-6)


def test_kmeans_is_seeded_and_keeps_the_best_restart() -> None:
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(3))
    a, b = kmeans(x, 12, 5, 4, seed=7), kmeans(x, 12, 5, 4, seed=7)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centroids, b.centroids)
    # Restart 0 of a 4-restart run starts where the 1-restart run does.
    single = kmeans(x, 12, 5, 1, seed=7)
    assert a.inertia <= single.inertia
    assert min(kmeans(x, 12, 5, 1, seed=s).inertia for s in range(4)) < single.inertia * 1.5


def test_empty_cluster_takes_the_farthest_point() -> None:
    # Five copies of one point and one far point: whenever both initial centroids are
    # copies, cluster 1 is empty (ties go to cluster 0) and must move to the far point; left
    # at the zero mean of no members it would never win a point (inertia 83.3).
    x = torch.tensor([[5.0, 5.0]] * 5 + [[15.0, 5.0]])
    for seed in range(8):
        result = kmeans(x, 2, iterations=3, restarts=1, seed=seed)
        assert result.inertia == 0.0, seed
        assert result.labels[:5].unique().numel() == 1 and result.labels[5] != result.labels[0]


def test_kmeans_rejects_more_clusters_than_points() -> None:
    with pytest.raises(ValueError, match="cannot make 5 clusters of 4 points"):
        kmeans(torch.randn(4, 2), 5)
