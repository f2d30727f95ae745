"""Vectorised concept formation against loop transcriptions of the released ConCL code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from methods.concepts import cosine_kmeans, match_concepts, paired_prototypes, sample_or_pad


def _kmeans_loops(x: torch.Tensor, k: int, iters: int, g: torch.Generator) -> torch.Tensor:
    """``batch_cosine_KMeans`` one image and one cluster at a time, same random draws."""
    batch, n, _ = x.shape
    x = F.normalize(x, dim=2)
    seeds = torch.randint(n, (batch, k), generator=g)
    centroids = [[x[b, seeds[b, c]].clone() for c in range(k)] for b in range(batch)]
    labels = torch.zeros(batch, n, dtype=torch.long)
    for _ in range(iters):
        redraw = torch.randint(n, (k,), generator=g)
        for b in range(batch):
            cs = torch.stack([F.normalize(c, dim=0) for c in centroids[b]])
            labels[b] = torch.argmin(1 - x[b] @ cs.T, dim=1)
            for c in range(k):
                members = x[b][labels[b] == c]
                centroids[b][c] = members.mean(0) if len(members) else x[b, redraw[c]]
    return labels


def test_kmeans_equals_the_loop_algorithm_with_empty_cluster_reseeding() -> None:
    # 6 seeds drawn with replacement from 8 points: nearly always two coincide, the tie goes
    # to the lower id and the other cluster is empty, so the re-seeding rule is exercised.
    x = torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(0))
    for seed in range(5):
        expected = _kmeans_loops(x, 6, 4, torch.Generator().manual_seed(seed))
        got = cosine_kmeans(x, 6, 4, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(got, expected), seed


def test_kmeans_recovers_well_separated_clusters_when_seeded_in_each() -> None:
    """Four tight clusters on orthogonal directions, 49 points each (a 7×7 map's worth).

    K-means from random points may seed two centroids in one cluster (it is not
    k-means++); whenever the seeds hit all four clusters the partition is recovered exactly.
    """
    torch.manual_seed(0)
    truth = torch.arange(4).repeat_interleave(49)
    directions = torch.eye(16)[:4] * 5
    recovered = seeded_in_all = 0
    for seed in range(40):
        x = (directions[truth] + 0.3 * torch.randn(196, 16)).unsqueeze(0)
        seeds = torch.randint(196, (1, 4), generator=torch.Generator().manual_seed(seed))
        labels = cosine_kmeans(x, 4, 10, generator=torch.Generator().manual_seed(seed))[0]
        same = (labels[:, None] == labels[None, :]) == (truth[:, None] == truth[None, :])
        if len(set(truth[seeds[0]].tolist())) == 4:
            seeded_in_all += 1
            recovered += int(same.all())
    assert seeded_in_all >= 3
    assert recovered == seeded_in_all


def _match_loops(labels: torch.Tensor, boxes: torch.Tensor, k: int, grid: tuple[int, int]):
    """``match_views_avg_pool`` of the released code, with the grid as a parameter."""
    batch, h, w = labels.shape
    one_hot = F.one_hot(labels, k).permute(0, 3, 1, 2).float()
    out = torch.zeros(batch, *grid, dtype=torch.long)
    for b in range(batch):
        top, left = int(torch.round(h * boxes[b, 0])), int(torch.round(w * boxes[b, 1]))
        bottom, right = int(torch.round(h * boxes[b, 2])), int(torch.round(w * boxes[b, 3]))
        crop = one_hot[b : b + 1, :, top:bottom, left:right]
        out[b] = F.adaptive_avg_pool2d(crop, grid).argmax(dim=1)[0]
        if boxes[b, 4] > 0:
            out[b] = out[b].flip(-1)
    return out


@pytest.mark.parametrize("grid", [(7, 7), (3, 3), (4, 2)])
def test_view_matching_equals_the_loop_algorithm(grid: tuple[int, int]) -> None:
    torch.manual_seed(0)
    batch, k = 16, 8
    # Blocky maps (concepts are regions) so the vote has clear winners and ties alike.
    labels = torch.randint(k, (batch, 7, 7)).repeat_interleave(2, 1).repeat_interleave(2, 2)
    tl = torch.rand(batch, 2) * 0.5
    br = tl + 0.3 + torch.rand(batch, 2) * (0.7 - tl)
    flip = (torch.rand(batch) < 0.5).float()
    boxes = torch.stack([tl[:, 0], tl[:, 1], br[:, 0].clamp(max=1), br[:, 1].clamp(max=1), flip], 1)
    boxes[0] = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0])  # the whole reference view
    assert torch.equal(match_concepts(labels, boxes, k, grid), _match_loops(labels, boxes, k, grid))


def test_view_matching_by_hand() -> None:
    labels = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]])
    right_half = torch.tensor([[0.0, 0.5, 1.0, 1.0, 0.0]])
    assert match_concepts(labels, right_half, 4, (2, 1)).tolist() == [[[1], [3]]]
    whole_flipped = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0]])
    assert match_concepts(labels, whole_flipped, 4, (2, 2)).tolist() == [[[1, 0], [3, 2]]]


def test_prototypes_pair_only_concepts_present_in_both_views() -> None:
    feat_q = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 2, 2)
    feat_k = -feat_q
    map_q = torch.tensor([[[0, 0], [1, 2]], [[3, 3], [3, 3]]])
    map_k = torch.tensor([[[2, 2], [0, 3]], [[3, 1], [1, 1]]])
    proto_q, proto_k, valid = paired_prototypes(feat_q, feat_k, map_q, map_k, 4)
    assert valid.tolist() == [[True, False, True, False], [False, False, False, True]]
    # image 0, concept 0: query cells 0 and 1, key cell 2; concept 2: query cell 3, key 0, 1
    q0 = feat_q[0].flatten(1)
    k0 = feat_k[0].flatten(1)
    assert torch.allclose(proto_q[0, 0], q0[:, :2].mean(1))
    assert torch.allclose(proto_k[0, 0], k0[:, 2])
    assert torch.allclose(proto_q[0, 2], q0[:, 3])
    assert torch.allclose(proto_k[0, 2], k0[:, :2].mean(1))
    assert torch.allclose(proto_q[1, 3], feat_q[1].flatten(1).mean(1))
    assert torch.allclose(proto_k[1, 3], feat_k[1].flatten(1)[:, 0])


def test_prototypes_equal_the_loop_algorithm() -> None:
    torch.manual_seed(1)
    b, c, k = 6, 5, 8
    feat_q, feat_k = torch.randn(b, c, 7, 7), torch.randn(b, c, 7, 7)
    map_q, map_k = torch.randint(k, (b, 7, 7)), torch.randint(k, (b, 7, 7))
    map_k[:, :, 3:] = 0  # leave some concepts out of the key view
    proto_q, proto_k, valid = paired_prototypes(feat_q, feat_k, map_q, map_k, k)
    pairs_q, pairs_k = [], []
    for i in range(b):
        for concept in range(k):
            if (map_q[i] == concept).any() and (map_k[i] == concept).any():
                mq, mk = map_q[i] == concept, map_k[i] == concept
                pairs_q.append((feat_q[i] * mq).sum((1, 2)) / mq.sum())
                pairs_k.append((feat_k[i] * mk).sum((1, 2)) / mk.sum())
    flat = valid.flatten()
    assert torch.allclose(proto_q.flatten(0, 1)[flat], torch.stack(pairs_q), atol=1e-6)
    assert torch.allclose(proto_k.flatten(0, 1)[flat], torch.stack(pairs_k), atol=1e-6)


def test_sample_or_pad_draws_a_fixed_number_of_valid_rows() -> None:
    torch.manual_seed(0)
    many = torch.tensor([True, False, True, True, True, False, True, True])
    index, keep = sample_or_pad(many, 4)
    assert keep.all() and len(set(index.tolist())) == 4 and many[index].all()

    few = torch.tensor([False, True, False, False, True, False, False, False])
    index, keep = sample_or_pad(few, 6)
    assert keep.all() and set(index.tolist()) == {1, 4}  # both, then duplicates of them

    index, keep = sample_or_pad(torch.zeros(8, dtype=torch.bool), 5)
    assert index.shape == (5,) and not keep.any()
