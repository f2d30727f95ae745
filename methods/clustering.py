"""Dataset-wide k-means and PCL's concentration estimate, in torch on the features' device.

PCL clusters the momentum features of the whole training set with faiss (``run_kmeans`` in
``main_pcl.py``: Euclidean k-means, 20 iterations, best of 5 restarts, at most 1000 points
per centroid). faiss-gpu is not a pip dependency this suite can rely on, so the same
algorithm is written here with chunked matrix products: the restarts run side by side
(one distance GEMM per chunk of points serves all of them) and the (N, K) distance matrix is
never materialised whole, so 100k points × 8k clusters fit in a few hundred MB.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Distance entries computed at once (restarts × points × clusters): 256 MB in float32.
CHUNK_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class KMeansResult:
    """The best restart: centroids (K, D), each point's cluster (N,) and squared distance
    to that centroid (N,), and the inertia (sum of those distances)."""

    centroids: Tensor
    labels: Tensor
    sq_distances: Tensor
    inertia: float


def _assign(x: Tensor, centroids: Tensor, chunk_elements: int) -> tuple[Tensor, Tensor]:
    """Nearest centroid of every point for every restart: (R, N) labels and squared distances.

    ``‖x‖² − 2·x·c + ‖c‖²`` as faiss's flat L2 index computes it, clamped at 0 (rounding can
    make it slightly negative); ties go to the lower cluster id.
    """
    restarts, k, _ = centroids.shape
    c_sq = centroids.pow(2).sum(dim=2).unsqueeze(1)  # (R, 1, K)
    rows = max(1, chunk_elements // (restarts * k))
    labels, sq_dist = [], []
    for chunk in x.split(rows):
        dots = torch.matmul(chunk, centroids.transpose(1, 2))  # (R, n, K)
        d = (c_sq - 2 * dots).add_(chunk.pow(2).sum(dim=1).view(1, -1, 1))
        best, label = d.min(dim=2)
        labels.append(label)
        sq_dist.append(best.clamp_(min=0))
    return torch.cat(labels, dim=1), torch.cat(sq_dist, dim=1)


@torch.no_grad()
def kmeans(
    x: Tensor,
    num_clusters: int,
    iterations: int = 20,
    restarts: int = 5,
    seed: int = 0,
    max_points_per_centroid: int | None = 1000,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> KMeansResult:
    """Euclidean k-means of ``x`` (N, D), best of ``restarts`` by inertia (faiss ``nredo``).

    As ``faiss.Clustering``: when N exceeds ``num_clusters · max_points_per_centroid`` the
    centroids are trained on a random subset of that size; each restart starts from K
    distinct random training points and runs ``iterations`` rounds of (assign, move every
    centroid to its members' mean). Then every point of ``x`` is assigned to the final
    centroids (PCL's ``index.search``) and the restart with the lowest inertia wins.
    Deviation: faiss refills an empty cluster by splitting a large one; here it moves to
    the training point farthest from its centroid (a different point for each empty
    cluster, as scikit-learn does), which needs no sequential loop. All draws come from a
    generator seeded with ``seed``, so equal inputs on one device give equal results.
    """
    n, _ = x.shape
    if not 1 <= num_clusters <= n:
        raise ValueError(f"cannot make {num_clusters} clusters of {n} points")
    if iterations < 0 or restarts < 1:
        raise ValueError(f"need iterations >= 0 and restarts >= 1, got {iterations}, {restarts}")
    x = x.float()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    train = x
    if max_points_per_centroid is not None and n > num_clusters * max_points_per_centroid:
        keep = torch.randperm(n, device=x.device, generator=generator)
        train = x[keep[: num_clusters * max_points_per_centroid]]
    n_train = train.shape[0]
    seeds = torch.stack(
        [
            torch.randperm(n_train, device=x.device, generator=generator)[:num_clusters]
            for _ in range(restarts)
        ]
    )
    centroids = train[seeds]  # (R, K, D)
    far_count = min(num_clusters, n_train)
    for _ in range(iterations):
        labels, sq_dist = _assign(train, centroids, chunk_elements)
        counts = torch.zeros(restarts, num_clusters, device=x.device)
        counts.scatter_add_(1, labels, torch.ones_like(sq_dist))
        sums = torch.zeros_like(centroids)
        for r in range(restarts):
            sums[r].index_add_(0, labels[r], train)
        means = sums / counts.clamp(min=1).unsqueeze(2)
        # Empty cluster number e (in id order) takes the e-th farthest training point.
        empty = counts == 0
        farthest = sq_dist.topk(far_count, dim=1).indices  # (R, far_count)
        slot = (empty.long().cumsum(dim=1) - 1).clamp(0, far_count - 1)
        refill = train[torch.gather(farthest, 1, slot)]  # (R, K, D)
        centroids = torch.where(empty.unsqueeze(2), refill, means)
    labels, sq_dist = _assign(x, centroids, chunk_elements)
    inertia = sq_dist.sum(dim=1)
    best = int(inertia.argmin())
    return KMeansResult(centroids[best], labels[best], sq_dist[best], float(inertia[best]))


@torch.no_grad()
def concentration(
    sq_distances: Tensor,
    labels: Tensor,
    num_clusters: int,
    temperature: float,
    alpha: float = 10.0,
) -> Tensor:
    """PCL's per-cluster concentration φ (K,), the temperature of each prototype.

    ``φ_c = mean_{z∈c} ‖z − c‖ / log(|c| + α)``; a cluster with at most one member gets
    the largest φ of the others; φ is clipped to its 10th–90th percentile (linear
    interpolation, numpy's default) and scaled so that its mean is ``temperature``.
    Degenerate input where every cluster has at most one member (all φ zero, which gives
    NaN in PCL) yields ``temperature`` for every cluster.
    """
    sq_distances, labels = sq_distances.float(), labels.long()
    counts = torch.bincount(labels, minlength=num_clusters).float()
    dist_sum = torch.zeros(num_clusters, device=labels.device)
    dist_sum.index_add_(0, labels, sq_distances.clamp(min=0).sqrt())
    phi = dist_sum / counts.clamp(min=1) / torch.log(counts + alpha)
    several = counts > 1
    phi = phi.masked_fill(~several, 0.0)
    phi = torch.where(several, phi, phi.max())
    bounds = torch.quantile(phi, torch.tensor([0.1, 0.9], device=phi.device))
    phi = phi.clamp(bounds[0], bounds[1])
    mean = phi.mean()
    return torch.where(mean > 0, temperature * phi / mean.clamp(min=1e-12), temperature)
