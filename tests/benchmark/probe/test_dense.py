"""Dice / IoU by hand, the gland mask, and a dense head that learns what the features say."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmark.probe.dense import (
    DenseFeatures,
    gland_mask,
    overlap_scores,
    score_dense_head,
    train_dense_head,
)
from benchmark.probe.features import build_trunk


def test_overlap_scores_by_hand():
    truth = np.zeros((4, 4), bool)
    truth[:2, :2] = True  # 4 px
    pred = np.zeros((4, 4), bool)
    pred[:2, 1:3] = True  # 4 px, 2 of them inside
    dice, iou = overlap_scores(pred, truth)
    assert dice == pytest.approx(100 * 2 * 2 / 8)
    assert iou == pytest.approx(100 * 2 / 6)
    assert overlap_scores(np.zeros((2, 2)), np.zeros((2, 2))) == (100.0, 100.0)
    assert overlap_scores(np.ones((2, 2)), np.zeros((2, 2))) == (0.0, 0.0)


def test_gland_mask_is_the_union_of_instances():
    masks = torch.zeros((2, 3, 3), dtype=torch.uint8)
    masks[0, 0, 0] = masks[1, 2, 2] = masks[1, 0, 0] = 1
    out = gland_mask({"masks": masks})
    assert out.dtype == torch.long and out.sum() == 2 and out[0, 0] == out[2, 2] == 1
    assert gland_mask({"masks": torch.zeros((0, 3, 5), dtype=torch.uint8)}).shape == (3, 5)


def _toy(n: int, rng: np.random.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Features whose channel 0 is +1 on glands and -1 elsewhere (plus noise), at 1/4 of
    the mask resolution; the masks are blocks of 4 x 4 pixels."""
    pairs = []
    for _ in range(n):
        coarse = torch.from_numpy(rng.random((6, 8)) < 0.4).long()
        feats = torch.from_numpy(rng.normal(scale=0.5, size=(3, 6, 8))).float()
        feats[0] += coarse * 2.0 - 1.0
        feats[1] *= 100.0  # a channel of noise at a large scale: standardisation copes
        mask = coarse.repeat_interleave(4, 0).repeat_interleave(4, 1)
        pairs.append((feats, mask))
    return pairs


def test_dense_head_learns_a_linearly_decodable_mask_and_is_seeded():
    rng = np.random.default_rng(0)
    train, test = _toy(12, rng), _toy(6, rng)
    head, mean, std = train_dense_head(train, 3, 150, 4, 0.05, 0.0)
    dice, iou = score_dense_head(head, mean, std, test)
    assert len(dice) == len(iou) == 6
    assert min(dice) > 85.0  # bilinear edges cost a little; chance is ~40
    again, *_ = train_dense_head(train, 3, 150, 4, 0.05, 0.0)
    torch.testing.assert_close(again.weight, head.weight, rtol=0, atol=0)
    other, *_ = train_dense_head(train, 4, 150, 4, 0.05, 0.0)
    assert not torch.equal(other.weight, head.weight)


def test_dense_features_concatenate_upsampled_stages_at_the_finest_stride():
    trunk = build_trunk(None, 0, torch.device("cpu"))
    extract = DenseFeatures(trunk, ["layer3", "layer4"], 64, 96, torch.device("cpu"))
    feats = extract(torch.rand(3, 100, 150))  # resized to 64 x 96: layer3 4 x 6
    assert feats.shape == (256 + 512, 4, 6)
