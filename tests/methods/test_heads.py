from __future__ import annotations

import math

import torch
from torch import nn

from methods.heads import DenseHead, LinearHead, MLPHead


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


def test_dense_head_is_a_per_cell_mlp_with_default_conv_init() -> None:
    torch.manual_seed(0)
    head = DenseHead(16, 8, 4)
    torch.manual_seed(0)
    default = [nn.Conv2d(16, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1)]
    assert [type(m) for m in head] == [type(m) for m in default]
    # Not kaiming-initialised: PyTorch's default, draw for draw (DenseCL leaves it alone).
    for ours, ref in zip((head[0], head[2]), (default[0], default[2]), strict=True):
        torch.testing.assert_close(ours.weight, ref.weight, rtol=0, atol=0)
        torch.testing.assert_close(ours.bias, ref.bias, rtol=0, atol=0)
    x = torch.randn(2, 16, 3, 3)
    w0, b0 = head[0].weight.flatten(1), head[0].bias
    w2, b2 = head[2].weight.flatten(1), head[2].bias
    cells = x.permute(0, 2, 3, 1)  # the same two linear maps at every cell
    expected = (torch.relu(cells @ w0.T + b0) @ w2.T + b2).permute(0, 3, 1, 2)
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-5)
