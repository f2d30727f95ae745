"""ConCL's concepts, vectorised over images and concepts.

The released code (TencentAILabHealthcare/ConCL ``openselfsup/models/concl.py``:
``batch_cosine_KMeans``, ``match_views_avg_pool``, ``get_paired_prototypes`` and the
concept enqueue of ``forward_train``) loops in Python over images (view matching) and over
images × concepts (prototype pairing); here every step is a batched tensor operation with
the same result: no host synchronisation and no loop longer than the k-means iterations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def cosine_kmeans(
    x: Tensor, num_clusters: int, iterations: int = 10, generator: torch.Generator | None = None
) -> Tensor:
    """Per-image cosine k-means of ``x`` (B, N, D); returns labels (B, N) in [0, K).

    As ConCL's ``batch_cosine_KMeans``: points are L2-normalised; initial centroids are K
    points drawn with replacement, independently per image; each iteration re-normalises
    the centroids, assigns every point to the nearest (1 − cosine), then moves each
    centroid to the mean of its members. An empty cluster is re-seeded with one random
    point, the same point index in every image. The labels returned are those of the
    last assignment, made before the last centroid update. ``generator`` (on ``x``'s
    device) makes the random draws reproducible; by default the global RNG is used.
    """
    if num_clusters < 1 or iterations < 1:
        raise ValueError(
            f"need num_clusters >= 1 and iterations >= 1, got {num_clusters}, {iterations}"
        )
    batch, n, dim = x.shape
    x = F.normalize(x.float(), dim=2)
    seeds = torch.randint(n, (batch, num_clusters), device=x.device, generator=generator)
    centroids = torch.gather(x, 1, seeds.unsqueeze(-1).expand(-1, -1, dim))
    labels = x.new_zeros((batch, n), dtype=torch.long)
    for _ in range(iterations):
        centroids = F.normalize(centroids, dim=2)
        labels = torch.argmin(1 - torch.bmm(x, centroids.transpose(1, 2)), dim=2)
        members = F.one_hot(labels, num_clusters).to(x.dtype)  # (B, N, K)
        counts = members.sum(dim=1).unsqueeze(-1)  # (B, K, 1)
        means = members.transpose(1, 2) @ x / counts.clamp(min=1)
        redraw = torch.randint(n, (num_clusters,), device=x.device, generator=generator)
        reseed = x[:, redraw]  # (B, K, D): one point per cluster, same index in every image
        centroids = torch.where(counts > 0, means, reseed)
    return labels


def _window_indicators(start: Tensor, end: Tensor, size: int, bins: int) -> Tensor:
    """(B, bins, size) 0/1 masks of ``adaptive_avg_pool``'s windows over [start, end).

    Bin ``a`` of a length-L span covers [start + ⌊a·L/bins⌋, start + ⌈(a+1)·L/bins⌉), as in
    PyTorch's adaptive pooling, so counting votes in these windows and pooling the cropped
    one-hot map give the same arg-max.
    """
    length = (end - start).unsqueeze(1)  # (B, 1)
    a = torch.arange(bins, device=start.device).unsqueeze(0)
    lo = start.unsqueeze(1) + torch.div(a * length, bins, rounding_mode="floor")
    hi = start.unsqueeze(1) - torch.div(-(a + 1) * length, bins, rounding_mode="floor")
    pos = torch.arange(size, device=start.device)
    return ((pos >= lo.unsqueeze(-1)) & (pos < hi.unsqueeze(-1))).float()


@torch.no_grad()
def match_concepts(
    labels: Tensor, boxes: Tensor, num_concepts: int, grid: tuple[int, int]
) -> Tensor:
    """Cut the reference view's concept map into each view: (B, H, W) → (B, gh, gw).

    ``boxes`` (B, 5) holds each view's ``[top, left, bottom, right, flip]`` in fractions of
    the reference view. As ConCL's ``match_views_avg_pool``: crop rows round(H·top) to
    round(H·bottom) and columns likewise, average-pool the one-hot map to the view's
    feature grid, take the arg-max concept (a soft majority vote; ties go to the lower
    id), and flip horizontally when the view was flipped.
    """
    batch, height, width = labels.shape
    one_hot = F.one_hot(labels.long(), num_concepts).permute(0, 3, 1, 2).float()
    boxes = boxes.float()
    top = torch.round(height * boxes[:, 0]).long().clamp(0, height - 1)
    left = torch.round(width * boxes[:, 1]).long().clamp(0, width - 1)
    # A crop thinner than one cell would pool nothing; keep at least one row and column.
    bottom = torch.maximum(torch.round(height * boxes[:, 2]).long().clamp(max=height), top + 1)
    right = torch.maximum(torch.round(width * boxes[:, 3]).long().clamp(max=width), left + 1)
    rows = _window_indicators(top, bottom, height, grid[0])  # (B, gh, H)
    cols = _window_indicators(left, right, width, grid[1])  # (B, gw, W)
    votes = torch.einsum("bah,bkhw,bcw->bkac", rows, one_hot, cols)
    matched = votes.argmax(dim=1)
    flipped = (boxes[:, 4] > 0).view(batch, 1, 1)
    return torch.where(flipped, matched.flip(-1), matched)


def paired_prototypes(
    feat_q: Tensor, feat_k: Tensor, map_q: Tensor, map_k: Tensor, num_concepts: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Masked average pooling of each view's features over each concept's cells.

    ``feat_*`` (B, C, h, w) and ``map_*`` (B, h, w) → prototypes (B, K, C) per view and
    ``valid`` (B, K): True where the concept occurs in both views, the only pairs ConCL
    contrasts. Rows of absent concepts are zero. Gradient flows into ``feat_q`` only where
    the caller lets it (ConCL detaches the key side).
    """
    members_q = F.one_hot(map_q.flatten(1), num_concepts).to(feat_q.dtype)  # (B, hw, K)
    members_k = F.one_hot(map_k.flatten(1), num_concepts).to(feat_k.dtype)
    count_q, count_k = members_q.sum(dim=1), members_k.sum(dim=1)  # (B, K)
    valid = (count_q > 0) & (count_k > 0)
    proto_q = torch.einsum("bnk,bcn->bkc", members_q, feat_q.flatten(2))
    proto_k = torch.einsum("bnk,bcn->bkc", members_k, feat_k.flatten(2))
    proto_q = proto_q / count_q.clamp(min=1).unsqueeze(-1)
    proto_k = proto_k / count_k.clamp(min=1).unsqueeze(-1)
    return proto_q, proto_k, valid


@torch.no_grad()
def sample_or_pad(valid: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Indices of ``n`` valid rows to enqueue, and which of them are valid.

    ConCL enqueues a fixed number of key prototypes per process and step (K·B, or 4·B when
    K > 8; ``num_sampled_protos`` in the released ``forward_train``): a random subset
    without replacement when there are at least ``n`` valid ones, else all of them
    followed by random duplicates. Unlike the original (which came up short when
    fewer than n/2 were valid and then let zero rows of the padded all-gather into the
    queue) the count is always ``n``; the returned mask is False only when no row at all is
    valid, and the queue skips those rows.
    """
    m = valid.numel()
    if not 0 < n <= m:
        raise ValueError(f"cannot draw {n} of {m} prototypes")
    score = torch.rand(m, device=valid.device) + 2 * valid.float()
    order = torch.argsort(score, descending=True)[:n]  # valid rows first, in random order
    num_valid = valid.sum()
    pick = (torch.rand(n, device=valid.device) * num_valid).long().clamp(max=n - 1)
    position = torch.arange(n, device=valid.device)
    index = torch.where(position < num_valid, order, order[pick])
    return index, valid[index]
