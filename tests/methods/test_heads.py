from __future__ import annotations

import math

import torch
from torch import nn

from methods.heads import LinearHead, MLPHead


def test_mlp_head_layout_and_kaiming_fan_in_init() -> None:
    torch.manual_seed(0)
    head = MLPHead(512, 512, 128)
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (head[0].in_features, head[0].out_features) == (512, 512)
    assert (head[2].in_features, head[2].out_features) == (512, 128)
    for linear in (head[0], head[2]):
        assert torch.count_nonzero(linear.bias) == 0
        # kaiming normal, fan_in, relu gain: std = sqrt(2 / fan_in)
        expected = math.sqrt(2.0 / linear.in_features)
        assert abs(linear.weight.std().item() / expected - 1) < 0.02
    x = torch.randn(4, 512)
    torch.testing.assert_close(head(x), head[2](torch.relu(head[0](x))))


def test_linear_head_init() -> None:
    torch.manual_seed(0)
    head = LinearHead(512, 128)
    assert torch.count_nonzero(head.bias) == 0
    assert abs(head.weight.std().item() / math.sqrt(2.0 / 512) - 1) < 0.02
