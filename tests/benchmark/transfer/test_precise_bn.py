"""Precise BN: running statistics become the plain average of per-batch statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.transfer.model import ProtocolTransform, build_mask_rcnn
from benchmark.transfer.precise_bn import precise_bn


class TinyDetector(nn.Module):
    """What precise_bn touches of a MaskRCNN: ``transform`` and a BN ``backbone``."""

    def __init__(self) -> None:
        super().__init__()
        self.transform = ProtocolTransform((32, 32), 32, 1333, [0.0] * 3, [1.0] * 3)
        self.backbone = nn.BatchNorm2d(3)


def batches(n: int, size: int = 32, images: int = 2) -> list[tuple[list[torch.Tensor], list]]:
    gen = torch.Generator().manual_seed(1)
    return [
        ([torch.rand(3, size, size, generator=gen) * (i + 1) for _ in range(images)], [{}] * images)
        for i in range(n)
    ]


def per_batch_average(data, feature) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over batches of the per-channel batch mean and unbiased batch variance."""
    means, variances = [], []
    for images, _ in data:
        x = feature(torch.stack(images)).transpose(0, 1).flatten(1)
        means.append(x.mean(1))
        variances.append(x.var(1, unbiased=True))
    return torch.stack(means).mean(0), torch.stack(variances).mean(0)


def test_running_stats_are_the_mean_of_batch_stats() -> None:
    model = TinyDetector().eval()
    bn = model.backbone
    bn.running_mean.fill_(7.0)
    bn.num_batches_tracked.fill_(10)
    data = batches(3)
    assert precise_bn(model, iter(data), num_batches=200) == 3
    mean, var = per_batch_average(data, lambda x: x)
    assert torch.allclose(bn.running_mean, mean, atol=1e-6)
    assert torch.allclose(bn.running_var, var, atol=1e-6)
    # a momentum-0.1 average would weight the last batch (the largest values) far more
    assert bn.momentum == 0.1 and not model.training and not bn.training
    assert int(bn.num_batches_tracked) == 13


def test_num_batches_caps_the_batches_used() -> None:
    model = TinyDetector().train()
    data = batches(4)
    assert precise_bn(model, data, num_batches=2) == 2
    mean, _ = per_batch_average(data[:2], lambda x: x)
    assert torch.allclose(model.backbone.running_mean, mean, atol=1e-6)
    assert model.training


def test_no_batches_keeps_the_old_statistics() -> None:
    model = TinyDetector()
    model.backbone.running_mean.fill_(3.0)
    assert precise_bn(model, [], num_batches=5) == 0
    assert torch.equal(model.backbone.running_mean, torch.full((3,), 3.0))
    assert model.backbone.momentum == 0.1


def test_mask_rcnn_stem_bn_matches_hand_computation() -> None:
    torch.manual_seed(0)
    model = build_mask_rcnn(min_size_train=(64, 64), min_size_test=64).eval()
    body = model.backbone.body
    fpn_bn = next(m for m in model.backbone.fpn.modules() if isinstance(m, nn.BatchNorm2d))
    data = batches(3, size=64)  # 64 px: no resize, no padding

    def stem_conv(x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(model.transform.image_mean)[:, None, None]
        std = torch.tensor(model.transform.image_std)[:, None, None]
        return F.conv2d((x - mean) / std, body.conv1.weight, stride=2, padding=3)

    with torch.no_grad():
        mean, var = per_batch_average(data, stem_conv)
    assert precise_bn(model, data) == 3
    assert torch.allclose(body.bn1.running_mean, mean, atol=1e-5)
    assert torch.allclose(body.bn1.running_var, var, rtol=1e-4, atol=1e-5)
    assert not torch.equal(fpn_bn.running_var, torch.ones_like(fpn_bn.running_var))
    assert not model.training and all(not m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
